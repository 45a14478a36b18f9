//! Every key of diffusers-workflow's schema (`dw/workflow_schema.json`) and its fate here.
//!
//! A key is either implemented; accepted because it only tunes PyTorch's or diffusers'
//! Python runtime, which dw does not have (the run says so in one info line); or refused
//! by name with the reason. A key the schema does not have at all is refused where dw's
//! schema is closed (`configuration`, whose `additionalProperties` is false) and warned
//! about where it is open, as dw itself would pass it through.
//!
//! The README's key table is checked against these tables by a test, so the two cannot
//! drift apart.

use serde_json::{Map, Value};

use super::positions::pointer_segment;

/// What dw does with a key of diffusers-workflow's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Read and acted on.
    Implemented,
    /// Only tunes a Python runtime dw does not have; accepted with an info line.
    RuntimeOnly,
    /// Refused with "`<key>` is not supported: <why>".
    Unsupported(&'static str),
}

/// One key of an object in the schema.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub fate: Fate,
}

/// One kind of object in the schema: its keys, and whether others are allowed.
#[derive(Debug)]
pub struct Level {
    /// Where it sits, as the README's table names it (`steps[].pipeline.configuration`).
    pub path: &'static str,
    pub keys: &'static [Key],
    /// dw's schema refuses keys it does not list here (`additionalProperties: false`).
    pub closed: bool,
}

/// A remark about the workflow that does not stop it: shown by `validate` and in a run's
/// events, with where it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remark {
    pub pointer: String,
    pub severity: Severity,
    pub message: String,
}

/// How much a [`Remark`] matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
}

/// A refused key: where, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// JSON pointer of the key.
    pub pointer: String,
    pub message: String,
}

const fn done(name: &'static str) -> Key {
    Key {
        name,
        fate: Fate::Implemented,
    }
}

const fn runtime(name: &'static str) -> Key {
    Key {
        name,
        fate: Fate::RuntimeOnly,
    }
}

const fn refused(name: &'static str, why: &'static str) -> Key {
    Key {
        name,
        fate: Fate::Unsupported(why),
    }
}

const VIDEO: &str = "dw runs image pipelines; video and audio output is not built";
const MODULAR: &str = "modular pipelines are not built";
const QUANTIZED: &str =
    "quantized weights are not built; load the model in float32, float16 or bfloat16";
const CACHE: &str = "step caching changes the images; dw runs every step in full";

pub const WORKFLOW: Level = Level {
    path: "(top level)",
    keys: &[
        done("id"),
        done("description"),
        done("variables"),
        done("seed"),
        done("steps"),
    ],
    closed: false,
};

pub const STEP: Level = Level {
    path: "steps[]",
    keys: &[
        done("name"),
        done("seed"),
        done("release_pipeline"),
        done("release_models"),
        done("task"),
        done("pipeline"),
        done("pipeline_reference"),
        done("workflow"),
        done("result"),
    ],
    closed: false,
};

/// Pipeline components a workflow may declare beside `configuration` (`"vae": {...}`).
pub const COMPONENT_SLOTS: &[&str] = &[
    "model",
    "transformer",
    "transformer_2",
    "vae",
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "image_encoder",
    "feature_extractor",
    "prompt_enhancer_head",
];

pub const PIPELINE: Level = Level {
    path: "steps[].pipeline",
    keys: &[
        done("configuration"),
        done("shared_components"),
        done("reused_components"),
        done("scheduler"),
        refused("audio_scheduler", VIDEO),
        done("model"),
        done("transformer"),
        done("transformer_2"),
        done("vae"),
        done("unet"),
        done("text_encoder"),
        done("text_encoder_2"),
        done("text_encoder_3"),
        done("tokenizer"),
        done("tokenizer_2"),
        done("tokenizer_3"),
        done("image_encoder"),
        done("feature_extractor"),
        done("prompt_enhancer_head"),
        refused("controlnet", "ControlNet models are not built"),
        done("loras"),
        refused("ip_adapter", "IP-Adapter image prompts are not built"),
        done("from_pretrained_arguments"),
        refused(
            "remote_text_encoder",
            "dw encodes prompts locally and never sends them to a service",
        ),
        done("seed"),
        refused("chain", VIDEO),
        done("arguments"),
    ],
    closed: false,
};

pub const CONFIGURATION: Level = Level {
    path: "steps[].pipeline.configuration",
    keys: &[
        done("offload"),
        done("exclude_from_cpu_offload"),
        done("group_offload"),
        done("device"),
        done("component_type"),
        done("no_generator"),
        runtime("enable_attention_slicing"),
        runtime("disable_attention_slicing"),
        runtime("attention_backend"),
        refused(
            "prompt_weighting",
            "A1111 prompt weighting is not built; the prompt is encoded as written",
        ),
        runtime("pre_load_modules"),
        refused("load_components", MODULAR),
        refused("configs", MODULAR),
        refused("components", MODULAR),
        runtime("preserve_device_placement"),
        refused("components_manager", MODULAR),
        runtime("sdnq_optimize"),
        refused("cache", CACHE),
        refused("teacache", CACHE),
        done("vae"),
        done("unet"),
        done("transformer"),
        done("text_encoder"),
        done("shared_components"),
        done("reused_components"),
        refused(
            "enable_layerwise_casting",
            "float8 storage is not built; choose a `torch_dtype` instead",
        ),
        refused("inversion", "no pipeline dw runs has invert()"),
        refused("generate", "no pipeline dw runs has generate()"),
    ],
    closed: true,
};

pub const CONFIGURATION_VAE: Level = Level {
    path: "steps[].pipeline.configuration.vae",
    keys: &[
        done("enable_slicing"),
        done("enable_tiling"),
        runtime("channels_last"),
        done("torch_dtype"),
    ],
    closed: false,
};

pub const CONFIGURATION_UNET: Level = Level {
    path: "steps[].pipeline.configuration.unet",
    keys: &[
        runtime("enable_forward_chunking"),
        runtime("channels_last"),
        done("torch_dtype"),
        runtime("attn_processor_type"),
    ],
    closed: false,
};

pub const CONFIGURATION_TRANSFORMER: Level = Level {
    path: "steps[].pipeline.configuration.transformer",
    keys: &[runtime("attn_processor_type")],
    closed: false,
};

pub const CONFIGURATION_TEXT_ENCODER: Level = Level {
    path: "steps[].pipeline.configuration.text_encoder",
    keys: &[done("torch_dtype")],
    closed: false,
};

pub const COMPONENT: Level = Level {
    path: "steps[].pipeline.<component>",
    keys: &[
        done("configuration"),
        done("group_offload"),
        refused(
            "enable_layerwise_casting",
            "float8 storage is not built; choose a `torch_dtype` instead",
        ),
        refused("quantization_config", QUANTIZED),
        done("from_pretrained_arguments"),
    ],
    closed: false,
};

pub const COMPONENT_CONFIGURATION: Level = Level {
    path: "steps[].pipeline.<component>.configuration",
    keys: &[
        done("device"),
        done("component_type"),
        runtime("preserve_device_placement"),
    ],
    closed: false,
};

pub const FROM_PRETRAINED: Level = Level {
    path: "steps[].pipeline.from_pretrained_arguments",
    keys: &[
        done("model_name"),
        refused(
            "from_single_file",
            "single-file checkpoints are not read; give a diffusers folder or hub id as `model_name`",
        ),
        refused("task", "transformers pipelines are not built"),
        done("torch_dtype"),
        done("variant"),
        done("use_safetensors"),
        done("subfolder"),
        runtime("low_cpu_mem_usage"),
        runtime("device_map"),
        refused(
            "revision",
            "dw reads the snapshot the hub cache's refs/main names and never downloads",
        ),
        refused("trust_remote_code", "dw runs no code that comes with a model"),
        refused(
            "custom_pipeline",
            "community pipelines are Python code, and dw runs none",
        ),
        done("safety_checker"),
        done("requires_safety_checker"),
        refused("quantization_config", QUANTIZED),
    ],
    closed: false,
};

pub const LORA: Level = Level {
    path: "steps[].pipeline.loras[]",
    keys: &[
        done("model_name"),
        done("weight_name"),
        done("subfolder"),
        done("adapter_name"),
        done("scale"),
        refused(
            "revision",
            "dw reads the snapshot the hub cache's refs/main names and never downloads",
        ),
    ],
    closed: false,
};

pub const SCHEDULER: Level = Level {
    path: "steps[].pipeline.scheduler",
    keys: &[
        done("configuration"),
        done("from_config_args"),
        refused(
            "shift",
            "setting a flow-matching scheduler's `shift` this way (`set_shift`) is not built yet; give `shift` in `from_config_args` instead",
        ),
    ],
    closed: false,
};

pub const SCHEDULER_CONFIGURATION: Level = Level {
    path: "steps[].pipeline.scheduler.configuration",
    keys: &[done("scheduler_type")],
    closed: false,
};

pub const RESULT: Level = Level {
    path: "steps[].result",
    keys: &[
        done("content_type"),
        done("save"),
        done("file_base_name"),
        runtime("fps"),
        runtime("sample_rate"),
        runtime("audio_sample_rate"),
        runtime("subtype"),
        runtime("compression_level"),
        runtime("bitrate_mode"),
        done("embed_metadata"),
    ],
    closed: false,
};

pub const TASK: Level = Level {
    path: "steps[].task",
    keys: &[done("command"), done("arguments"), done("inputs")],
    closed: false,
};

pub const PIPELINE_REFERENCE: Level = Level {
    path: "steps[].pipeline_reference",
    keys: &[
        done("reference_name"),
        refused("chain", VIDEO),
        done("arguments"),
    ],
    closed: false,
};

pub const WORKFLOW_REFERENCE: Level = Level {
    path: "steps[].workflow",
    keys: &[done("path"), done("arguments")],
    closed: false,
};

/// Every level, in the README's order.
pub const LEVELS: &[&Level] = &[
    &WORKFLOW,
    &STEP,
    &PIPELINE,
    &CONFIGURATION,
    &CONFIGURATION_VAE,
    &CONFIGURATION_UNET,
    &CONFIGURATION_TRANSFORMER,
    &CONFIGURATION_TEXT_ENCODER,
    &COMPONENT,
    &COMPONENT_CONFIGURATION,
    &FROM_PRETRAINED,
    &LORA,
    &SCHEDULER,
    &SCHEDULER_CONFIGURATION,
    &RESULT,
    &TASK,
    &PIPELINE_REFERENCE,
    &WORKFLOW_REFERENCE,
];

/// Why a runtime-only key does nothing here.
const RUNTIME_ONLY: &str =
    "only tunes PyTorch's runtime, which dw does not have; accepted and has no effect";

impl Level {
    pub fn fate(&self, key: &str) -> Option<Fate> {
        self.keys.iter().find(|k| k.name == key).map(|k| k.fate)
    }

    fn names(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks every key of `object` (at `pointer`) against this level: the first refused
    /// key is an error; runtime-only and unknown keys of an open level become remarks.
    pub fn check(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        remarks: &mut Vec<Remark>,
    ) -> Result<(), Refusal> {
        for key in object.keys() {
            let at = format!("{pointer}/{}", pointer_segment(key));
            match self.fate(key) {
                Some(Fate::Implemented) => {}
                Some(Fate::RuntimeOnly) => remarks.push(Remark {
                    pointer: at,
                    severity: Severity::Info,
                    message: format!("`{key}` {RUNTIME_ONLY}"),
                }),
                Some(Fate::Unsupported(why)) => {
                    return Err(Refusal {
                        pointer: at,
                        message: format!("`{key}` is not supported: {why}"),
                    })
                }
                None if self.closed => {
                    return Err(Refusal {
                        pointer: at,
                        message: format!(
                            "`{key}` is not a key of diffusers-workflow's `{}`; its keys are: {}",
                            self.path,
                            self.names()
                        ),
                    })
                }
                None => remarks.push(Remark {
                    pointer: at,
                    severity: Severity::Warning,
                    message: format!(
                        "`{key}` is not in diffusers-workflow's schema at `{}` and is ignored; its keys are: {}",
                        self.path,
                        self.names()
                    ),
                }),
            }
        }
        Ok(())
    }
}

/// The README's table of every key and its fate, one row per key.
pub fn markdown_table() -> String {
    let mut table = String::from("| where | key | fate |\n| --- | --- | --- |\n");
    for level in LEVELS {
        for key in level.keys {
            let fate = match key.fate {
                Fate::Implemented => "implemented".to_string(),
                Fate::RuntimeOnly => "accepted, no effect (tunes PyTorch only)".to_string(),
                Fate::Unsupported(why) => format!("refused: {why}"),
            };
            table.push_str(&format!("| `{}` | `{}` | {fate} |\n", level.path, key.name));
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_key_with_its_fate() {
        let readme = include_str!("../../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's key table is out of date; it should read:\n{table}"
        );
    }

    // Every key of every level gets exactly its fate when it appears.
    #[test]
    fn each_key_gets_its_documented_fate() {
        for level in LEVELS {
            for key in level.keys {
                let object: Map<String, Value> = [(key.name.to_string(), Value::Bool(true))]
                    .into_iter()
                    .collect();
                let mut remarks = Vec::new();
                let outcome = level.check(&object, "", &mut remarks);
                match key.fate {
                    Fate::Implemented => {
                        assert!(
                            outcome.is_ok() && remarks.is_empty(),
                            "{}.{}",
                            level.path,
                            key.name
                        )
                    }
                    Fate::RuntimeOnly => {
                        assert!(outcome.is_ok(), "{}.{}", level.path, key.name);
                        assert_eq!(remarks.len(), 1);
                        assert_eq!(remarks[0].severity, Severity::Info);
                    }
                    Fate::Unsupported(why) => {
                        let refusal = outcome.expect_err(key.name);
                        assert_eq!(
                            refusal.message,
                            format!("`{}` is not supported: {why}", key.name)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn no_level_lists_a_key_twice() {
        for level in LEVELS {
            let mut names: Vec<&str> = level.keys.iter().map(|k| k.name).collect();
            names.sort();
            let before = names.len();
            names.dedup();
            assert_eq!(before, names.len(), "{} lists a key twice", level.path);
        }
    }

    #[test]
    fn a_closed_level_refuses_keys_outside_the_schema_and_an_open_one_warns() {
        let object: Map<String, Value> =
            serde_json::from_str(r#"{"component_type": "X", "colour": 1}"#).unwrap();
        let mut remarks = Vec::new();
        let refusal = CONFIGURATION
            .check(&object, "/c", &mut remarks)
            .unwrap_err();
        assert_eq!(refusal.pointer, "/c/colour");
        assert!(
            refusal.message.starts_with(
                "`colour` is not a key of diffusers-workflow's `steps[].pipeline.configuration`"
            ),
            "{}",
            refusal.message
        );

        let object: Map<String, Value> = serde_json::from_str(r#"{"colour": 1}"#).unwrap();
        RESULT.check(&object, "/r", &mut remarks).unwrap();
        assert_eq!(remarks.len(), 1);
        assert_eq!(remarks[0].severity, Severity::Warning);
        assert_eq!(remarks[0].pointer, "/r/colour");
    }

    #[test]
    fn an_unsupported_key_is_refused_by_name_with_its_reason() {
        let object: Map<String, Value> = serde_json::from_str(r#"{"teacache": {}}"#).unwrap();
        let refusal = CONFIGURATION
            .check(&object, "/c", &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            refusal.message,
            format!("`teacache` is not supported: {CACHE}")
        );
    }

    #[test]
    fn a_runtime_only_key_is_accepted_with_one_info_remark() {
        let object: Map<String, Value> =
            serde_json::from_str(r#"{"enable_attention_slicing": true}"#).unwrap();
        let mut remarks = Vec::new();
        CONFIGURATION.check(&object, "/c", &mut remarks).unwrap();
        assert_eq!(remarks.len(), 1);
        assert_eq!(remarks[0].severity, Severity::Info);
        assert!(remarks[0]
            .message
            .starts_with("`enable_attention_slicing` only tunes"));
    }
}
