//! What the workflow parser accepts, what it refuses, and where it says the problem is.

use super::*;

const GOOD: &str = r#"{
  "id": "tiny_sd",
  "variables": {
    "prompt": "a fox",
    "steps": 4,
    "guidance": 7.5,
    "fast": false
  },
  "seed": 42,
  "steps": [
    {
      "name": "main",
      "pipeline": {
        "configuration": {"component_type": "StableDiffusionPipeline"},
        "from_pretrained_arguments": {"model_name": "../model", "torch_dtype": "torch.float32"},
        "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}, "from_config_args": {"clip_sample": false}},
        "arguments": {
          "prompt": "variable:prompt",
          "num_inference_steps": "variable:steps",
          "guidance_scale": "variable:guidance"
        }
      },
      "result": {"content_type": "image/png"}
    }
  ]
}"#;

fn parse(src: &str, overrides: &[&str]) -> Result<Workflow, WorkflowError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Workflow::parse(Path::new("flow.json"), src, &overrides)
}

fn error(src: &str, overrides: &[&str]) -> String {
    parse(src, overrides).unwrap_err().to_string()
}

#[test]
fn a_valid_workflow_parses_with_its_variables_substituted() {
    let wf = parse(GOOD, &[]).unwrap();
    assert_eq!(wf.id, "tiny_sd");
    assert_eq!(wf.steps.len(), 1);
    let step = &wf.steps[0];
    assert_eq!(step.name, "main");
    assert_eq!(step.pipeline().unwrap().arguments.prompts(), ["a fox"]);
    assert_eq!(
        step.pipeline()
            .unwrap()
            .arguments
            .integer("num_inference_steps"),
        Some(4)
    );
    assert_eq!(step.pipeline().unwrap().seed, Some(42));
    assert_eq!(
        step.pipeline()
            .unwrap()
            .scheduler
            .as_ref()
            .unwrap()
            .scheduler_type,
        "DDIMScheduler"
    );
    assert_eq!(wf.sha256, sha256_hex(GOOD.as_bytes()));
}

#[test]
fn overrides_are_converted_to_the_type_of_the_default() {
    let wf = parse(
        GOOD,
        &["prompt=a blue fox", "steps=7", "guidance=3", "fast=yes"],
    )
    .unwrap();
    let args = &wf.steps[0].pipeline().unwrap().arguments;
    assert_eq!(args.prompts(), ["a blue fox"]);
    assert_eq!(args.integer("num_inference_steps"), Some(7));
    assert_eq!(args.number("guidance_scale"), Some(3.0));
    assert_eq!(wf.variables["fast"], Value::Bool(true));
}

#[test]
fn an_override_that_does_not_convert_names_the_variable_its_type_and_the_value() {
    let e = error(GOOD, &["steps=many"]);
    assert!(e.starts_with("flow.json:5:14: "), "{e}");
    assert!(
        e.contains("variable `steps` is an integer (default 4)"),
        "{e}"
    );
    assert!(e.contains("`many` is not an integer"), "{e}");
}

#[test]
fn an_unknown_override_lists_the_declared_variables() {
    let e = error(GOOD, &["colour=red"]);
    assert!(e.contains("unknown variable `colour`"), "{e}");
    assert!(
        e.contains("declared variables: fast, guidance, prompt, steps"),
        "{e}"
    );
}

#[test]
fn an_override_without_equals_sign_explains_the_syntax() {
    let e = error(GOOD, &["prompt"]);
    assert!(e.contains("write NAME=VALUE"), "{e}");
}

#[test]
fn an_unknown_variable_reference_points_at_it_and_lists_the_declared_ones() {
    let src = GOOD.replace("variable:steps", "variable:stepz");
    let e = error(&src, &[]);
    assert!(
        e.starts_with("flow.json:19:34: unknown variable `stepz`"),
        "{e}"
    );
    assert!(
        e.contains("declared variables: fast, guidance, prompt, steps"),
        "{e}"
    );
}

#[test]
fn invalid_json_reports_line_and_column() {
    let src = "{\n  \"id\": \"x\",\n  \"steps\": [\n}";
    let e = error(src, &[]);
    assert!(e.starts_with("flow.json:4:1: invalid JSON: "), "{e}");
}

#[test]
fn a_missing_steps_list_is_an_error() {
    let e = error(r#"{"id": "x"}"#, &[]);
    assert!(e.contains("missing `steps`"), "{e}");
    let e = error(r#"{"id": "x", "steps": []}"#, &[]);
    assert!(e.contains("`steps` is empty"), "{e}");
}

#[test]
fn a_step_with_two_kinds_is_refused_at_the_second() {
    let src = r#"{"id": "x", "steps": [{"name": "a", "pipeline": {}, "task": {}}]}"#;
    let e = error(src, &[]);
    assert!(e.contains("step `a` has both `pipeline` and `task`"), "{e}");
    assert!(e.starts_with("flow.json:1:53:"), "{e}");
}

#[test]
fn unsupported_tasks_and_pipeline_classes_are_refused_by_name() {
    let src =
        r#"{"id": "x", "steps": [{"name": "a", "task": {"command": "upscale", "arguments": {}}}]}"#;
    let e = error(src, &[]);
    assert!(
        e.contains("task `upscale` is not supported: it runs a model"),
        "{e}"
    );
    let src = GOOD.replace("\"StableDiffusionPipeline\"", "\"FluxKontextPipeline\"");
    let e = error(&src, &[]);
    assert!(
        e.contains("pipeline class `FluxKontextPipeline` is not supported yet; supported: StableDiffusionPipeline"),
        "{e}"
    );
    // dw/type_helpers.py: a dotted name is module.Class; diffusers is the default module.
    let src = GOOD.replace(
        "\"StableDiffusionPipeline\"",
        "\"diffusers.StableDiffusionPipeline\"",
    );
    assert!(parse(&src, &[]).is_ok());
}

#[test]
fn an_unknown_argument_is_refused_with_the_accepted_list() {
    let src = GOOD.replace(
        "\"guidance_scale\": \"variable:guidance\"",
        "\"guidance_scale\": 5, \"cfg\": 2",
    );
    let e = error(&src, &[]);
    assert!(e.contains("unknown or unsupported argument `cfg`"), "{e}");
    assert!(e.contains("accepted: prompt, negative_prompt"), "{e}");
}

#[test]
fn an_argument_of_the_wrong_type_names_the_value() {
    let src = GOOD.replace(
        "\"num_inference_steps\": \"variable:steps\"",
        "\"num_inference_steps\": \"four\"",
    );
    let e = error(&src, &[]);
    assert!(
        e.contains("`num_inference_steps` must be a whole number from 1 to 1000, found \"four\""),
        "{e}"
    );
}

#[test]
fn previous_result_of_a_later_or_unknown_step_is_refused() {
    let src = GOOD.replace(
        "\"prompt\": \"variable:prompt\"",
        "\"prompt\": \"previous_result:later\"",
    );
    let e = error(&src, &[]);
    assert!(
        e.contains("`previous_result:later` refers to no earlier step"),
        "{e}"
    );
}

#[test]
fn a_file_base_name_that_escapes_the_output_directory_is_refused() {
    for bad in ["../x", "a/b", "..", "a\\\\b"] {
        let src = GOOD.replace(
            "{\"content_type\": \"image/png\"}",
            &format!("{{\"file_base_name\": \"{bad}\"}}"),
        );
        let e = error(&src, &[]);
        assert!(
            e.contains("outputs stay inside the output directory"),
            "{bad}: {e}"
        );
    }
}

// dw/workflow_schema.json: only `pipeline_configuration` has `additionalProperties: false`;
// elsewhere dw passes unknown keys through, so dw warns and goes on.
#[test]
fn an_unknown_key_is_refused_where_dws_schema_is_closed_and_warned_about_elsewhere() {
    let src = GOOD.replace("\"seed\": 42,", "\"seeed\": 42,");
    let wf = parse(&src, &[]).unwrap();
    assert_eq!(wf.notes.len(), 1);
    let note = wf.note_text(&wf.notes[0]);
    assert!(
        note.starts_with("flow.json:9:3: warning: `seeed` is not in diffusers-workflow's schema"),
        "{note}"
    );

    let src = GOOD.replace(
        "{\"component_type\": \"StableDiffusionPipeline\"}",
        "{\"component_type\": \"StableDiffusionPipeline\", \"pipeline_type\": \"x\"}",
    );
    let e = error(&src, &[]);
    assert!(e.starts_with("flow.json:14:72: `pipeline_type` is not a key of diffusers-workflow's `steps[].pipeline.configuration`; its keys are: offload, "), "{e}");
}

#[test]
fn the_most_specific_seed_wins() {
    let src = GOOD.replace("\"name\": \"main\",", "\"name\": \"main\", \"seed\": 7,");
    assert_eq!(
        parse(&src, &[]).unwrap().steps[0].pipeline().unwrap().seed,
        Some(7)
    );
    let src = src.replace("\"arguments\": {", "\"seed\": 9, \"arguments\": {");
    assert_eq!(
        parse(&src, &[]).unwrap().steps[0].pipeline().unwrap().seed,
        Some(9)
    );
}

const TWO_STEPS: &str = r#"{
  "id": "refine",
  "steps": [
    {"name": "base", "pipeline": {
      "configuration": {"component_type": "StableDiffusionPipeline"},
      "from_pretrained_arguments": {"model_name": "m"},
      "arguments": {"prompt": "a fox", "output_type": "{pil}"}}},
    {"name": "refine", "pipeline": {
      "configuration": {"component_type": "StableDiffusionImg2ImgPipeline"},
      "from_pretrained_arguments": {"model_name": "m"},
      "arguments": {"prompt": "a fox, detailed", "image": "previous_result:base", "strength": 0.5}}}
  ]
}"#;

#[test]
fn an_img2img_step_takes_an_earlier_steps_images_and_a_strength() {
    let wf = parse(TWO_STEPS, &[]).unwrap();
    let refine = &wf.steps[1].pipeline().unwrap();
    assert_eq!(refine.class.name, "StableDiffusionImg2ImgPipeline");
    assert_eq!(
        refine.arguments.image("image"),
        Some(&ImageSource::PreviousResult {
            reference: PreviousResult {
                reference: "base".into()
            }
        })
    );
    assert_eq!(refine.arguments.number("strength"), Some(0.5));
    assert_eq!(
        wf.steps[0].pipeline().unwrap().arguments.number("strength"),
        None,
        "text to image takes no strength"
    );
}

#[test]
fn an_img2img_step_needs_an_image_and_refuses_txt2img_only_arguments() {
    let src = TWO_STEPS.replace("\"image\": \"previous_result:base\", ", "");
    assert!(error(&src, &[]).contains("StableDiffusionImg2ImgPipeline needs an `image`"));
    let src = TWO_STEPS.replace("\"strength\": 0.5", "\"strength\": 0.5, \"height\": 64");
    let e = error(&src, &[]);
    assert!(
        e.contains("unknown or unsupported argument `height` for StableDiffusionImg2ImgPipeline"),
        "{e}"
    );
    let src = TWO_STEPS.replace("\"strength\": 0.5", "\"strength\": 1.5");
    assert!(error(&src, &[]).contains("`strength` must be a number from 0 to 1, found 1.5"));
}

#[test]
fn an_image_can_be_a_path_a_location_with_a_size_or_a_url() {
    let with = |image: &str| TWO_STEPS.replace("\"previous_result:base\"", image);
    let wf = parse(&with("\"in.png\""), &[]).unwrap();
    assert_eq!(
        wf.steps[1].pipeline().unwrap().arguments.image("image"),
        Some(&ImageSource::File {
            location: "in.png".into(),
            size: None
        })
    );
    let wf = parse(
        &with(r#"{"location": "in.png", "size": {"width": 64, "height": 48}}"#),
        &[],
    )
    .unwrap();
    assert_eq!(
        wf.steps[1].pipeline().unwrap().arguments.image("image"),
        Some(&ImageSource::File {
            location: "in.png".into(),
            size: Some((64, 48))
        })
    );
    // dw/arguments.py fetch_image: http(s) URLs are loaded too.
    let wf = parse(&with("\"https://example.com/x.png\""), &[]).unwrap();
    assert_eq!(
        wf.steps[1].pipeline().unwrap().arguments.image("image"),
        Some(&ImageSource::Url {
            url: "https://example.com/x.png".into(),
            size: None
        })
    );
    let e = error(&with("\"https:///x.png\""), &[]);
    assert!(e.contains("names no host"), "{e}");
    let e = error(&with("\"previous_result:refine\""), &[]);
    assert!(
        e.contains("refers to no earlier step; steps before this one: base"),
        "{e}"
    );
}

#[test]
fn latent_output_and_a_latents_file_are_accepted_for_text_to_image() {
    let src = TWO_STEPS.replace(
        "\"output_type\": \"{pil}\"",
        "\"output_type\": \"{latent}\", \"latents\": \"noise.safetensors\"",
    );
    let wf = parse(&src, &[]).unwrap();
    let args = &wf.steps[0].pipeline().unwrap().arguments;
    assert_eq!(args.output_type(), OutputType::Latent);
    assert_eq!(args.latents(), Some("noise.safetensors"));
    let src = TWO_STEPS.replace("\"output_type\": \"{pil}\"", "\"output_type\": \"tensor\"");
    assert!(error(&src, &[]).contains("unsupported `output_type` \"tensor\""));
    // dw resolves every `*_type` value as a Python type unless it is written `{...}`
    // (dw/arguments.py realize_args), so a bare "latent" is no value it accepts.
    let src = TWO_STEPS.replace("\"output_type\": \"{pil}\"", "\"output_type\": \"latent\"");
    let e = error(&src, &[]);
    assert!(e.contains("write \"{latent}\""), "{e}");
}

#[test]
fn a_step_can_reuse_components_an_earlier_step_shares() {
    let src = TWO_STEPS
        .replace("\"arguments\": {\"prompt\": \"a fox\", \"output_type\": \"{pil}\"}", "\"shared_components\": [\"vae\", \"text_encoder\"], \"arguments\": {\"prompt\": \"a fox\"}")
        .replace("\"arguments\": {\"prompt\": \"a fox, detailed\"", "\"reused_components\": [\"vae\"], \"arguments\": {\"prompt\": \"a fox, detailed\"");
    let wf = parse(&src, &[]).unwrap();
    assert_eq!(
        wf.steps[0].pipeline().unwrap().shared_components,
        ["vae", "text_encoder"]
    );
    assert_eq!(
        wf.steps[1].pipeline().unwrap().reused_components,
        [("vae".to_string(), "base".to_string())]
    );

    let unshared = src.replace(
        "\"reused_components\": [\"vae\"]",
        "\"reused_components\": [\"unet\"]",
    );
    let e = error(&unshared, &[]);
    assert!(e.contains("names `unet`, which no earlier step lists in `shared_components`; shared so far: vae (from `base`), text_encoder (from `base`)"), "{e}");
    let unknown = src.replace("[\"vae\", \"text_encoder\"]", "[\"vea\"]");
    assert!(error(&unknown, &[]).contains(
        "component \"vea\" cannot be shared: pipelines have tokenizer, text_encoder, unet, vae"
    ));
}

#[test]
fn invalid_json_positions_start_at_column_one_and_count_characters() {
    // serde_json says column 0 when the text ends right after a newline.
    let e = error("", &[]);
    assert!(
        e.starts_with("flow.json:1:1: invalid JSON: EOF while parsing"),
        "{e}"
    );
    let e = error("{\n  \"id\": \"x\",\n", &[]);
    assert!(e.starts_with("flow.json:3:1: invalid JSON: "), "{e}");
    // serde_json counts bytes; `ü` and `✓` are one column each, as in semantic errors.
    let e = error("{\n  \"id\": \"ü/✓\",,\n}", &[]);
    assert!(
        e.starts_with("flow.json:2:15: invalid JSON: key must be a string"),
        "{e}"
    );
}

// dw/arguments.py realize_args: `constant:` imports a Python object; dw refuses it by name.
#[test]
fn a_constant_reference_is_refused_by_name_where_it_is_written() {
    let src = GOOD.replace(
        "\"guidance_scale\": \"variable:guidance\"",
        "\"guidance_scale\": \"constant:diffusers.SOME_VALUE\"",
    );
    let e = error(&src, &[]);
    assert!(
        e.starts_with("flow.json:20:29: `constant:diffusers.SOME_VALUE` is not supported"),
        "{e}"
    );
    let src = GOOD.replace("\"fast\": false", "\"fast\": \"constant:x.Y\"");
    let e = error(&src, &["prompt=a"]);
    assert!(e.contains("`constant:x.Y` is not supported"), "{e}");
}

/// A workflow that uses every implemented key of diffusers-workflow's schema at its level
/// (the pipeline's component slots only as far as a Stable Diffusion pipeline has them).
const EVERY_KEY: &str = r#"{
  "id": "every", "description": "uses every key", "variables": {"p": "a fox"}, "seed": 1,
  "steps": [
    {"name": "gen", "seed": 2, "release_pipeline": false, "release_models": false,
     "pipeline": {
       "configuration": {
         "component_type": "StableDiffusionPipeline", "offload": "model",
         "exclude_from_cpu_offload": ["vae"], "group_offload": {"offload_type": "block_level"},
         "device": "cpu", "no_generator": false,
         "vae": {"enable_slicing": true, "enable_tiling": true, "torch_dtype": "torch.float32"},
         "unet": {"torch_dtype": "torch.float32"}, "transformer": {},
         "text_encoder": {"torch_dtype": "torch.float32"},
         "shared_components": ["unet"], "reused_components": []
       },
       "shared_components": ["vae"], "reused_components": [],
       "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}, "from_config_args": {}},
       "vae": {"configuration": {"component_type": "AutoencoderKL", "device": "cpu"},
               "group_offload": {"offload_type": "leaf_level"},
               "from_pretrained_arguments": {"model_name": "other", "subfolder": "vae"}},
       "unet": {"configuration": {"component_type": "UNet2DConditionModel"},
                "from_pretrained_arguments": {"model_name": "m", "subfolder": "unet"}},
       "text_encoder": {"configuration": {"component_type": "transformers.CLIPTextModel"},
                "from_pretrained_arguments": {"model_name": "m", "subfolder": "text_encoder"}},
       "tokenizer": {"configuration": {"component_type": "transformers.CLIPTokenizer"},
                "from_pretrained_arguments": {"model_name": "m", "subfolder": "tokenizer"}},
       "from_pretrained_arguments": {"model_name": "m", "torch_dtype": "torch.float32",
         "variant": null, "use_safetensors": true, "safety_checker": null,
         "requires_safety_checker": false},
       "loras": [{"model_name": "lora", "weight_name": "l.safetensors", "subfolder": "s",
                  "adapter_name": "style", "scale": "0.5"}],
       "seed": 3,
       "arguments": {"prompt": "variable:p"}
     },
     "result": {"content_type": "image/png", "save": true, "file_base_name": "x_", "embed_metadata": true}},
    {"name": "size", "task": {"command": "get_image_size", "arguments": {"image": "previous_result:gen"}, "inputs": null}},
    {"name": "again", "pipeline_reference": {"reference_name": "gen", "arguments": {"prompt": "a cat"}}},
    {"name": "child", "workflow": {"path": "child.json", "arguments": {}}}
  ]
}"#;

/// Where each level of the schema sits in [`EVERY_KEY`], as JSON pointers.
fn level_pointers(level: &schema::Level) -> &'static [&'static str] {
    match level.path {
        "(top level)" => &[""],
        "steps[]" => &["/steps/0", "/steps/1", "/steps/2", "/steps/3"],
        "steps[].pipeline" => &["/steps/0/pipeline"],
        "steps[].pipeline.configuration" => &["/steps/0/pipeline/configuration"],
        "steps[].pipeline.configuration.vae" => &["/steps/0/pipeline/configuration/vae"],
        "steps[].pipeline.configuration.unet" => &["/steps/0/pipeline/configuration/unet"],
        "steps[].pipeline.configuration.transformer" => {
            &["/steps/0/pipeline/configuration/transformer"]
        }
        "steps[].pipeline.configuration.text_encoder" => {
            &["/steps/0/pipeline/configuration/text_encoder"]
        }
        "steps[].pipeline.<component>" => &["/steps/0/pipeline/vae"],
        "steps[].pipeline.<component>.configuration" => &["/steps/0/pipeline/vae/configuration"],
        "steps[].pipeline.from_pretrained_arguments" => &[
            "/steps/0/pipeline/from_pretrained_arguments",
            "/steps/0/pipeline/vae/from_pretrained_arguments",
        ],
        "steps[].pipeline.loras[]" => &["/steps/0/pipeline/loras/0"],
        "steps[].pipeline.scheduler" => &["/steps/0/pipeline/scheduler"],
        "steps[].pipeline.scheduler.configuration" => {
            &["/steps/0/pipeline/scheduler/configuration"]
        }
        "steps[].result" => &["/steps/0/result"],
        "steps[].task" => &["/steps/1/task"],
        "steps[].pipeline_reference" => &["/steps/2/pipeline_reference"],
        "steps[].workflow" => &["/steps/3/workflow"],
        other => panic!("no place for level {other} in EVERY_KEY"),
    }
}

// dw/workflow_schema.json, key by key: every implemented key is used and accepted, every
// runtime-only key adds one note, every refused key is refused by name with its reason.
#[test]
fn a_workflow_using_every_key_gets_each_keys_documented_fate() {
    let base: Value = serde_json::from_str(EVERY_KEY).unwrap();
    let parsed = parse(EVERY_KEY, &[]).unwrap();
    assert!(parsed.notes.is_empty(), "{:?}", parsed.notes);
    for level in schema::LEVELS {
        let pointers = level_pointers(level);
        for key in level.keys {
            let used = pointers
                .iter()
                .any(|p| base.pointer(p).and_then(|o| o.get(key.name)).is_some());
            let with_key = |value: Value| {
                let mut doc = base.clone();
                let object = doc
                    .pointer_mut(pointers[0])
                    .unwrap()
                    .as_object_mut()
                    .unwrap();
                object.insert(key.name.to_string(), value);
                serde_json::to_string_pretty(&doc).unwrap()
            };
            match key.fate {
                schema::Fate::Implemented => {
                    let other_slot = level.path == "steps[].pipeline"
                        && schema::COMPONENT_SLOTS.contains(&key.name)
                        && crate::families::stable_diffusion::FAMILY
                            .component(key.name)
                            .is_none();
                    if other_slot {
                        let e = error(
                            &with_key(
                                serde_json::json!({"configuration": {"component_type": "X"}, "from_pretrained_arguments": {}}),
                            ),
                            &[],
                        );
                        assert!(
                            e.contains(&format!(
                                "`{}` is not supported here: a Stable Diffusion pipeline has no",
                                key.name
                            )),
                            "{e}"
                        );
                    } else {
                        assert!(
                            used,
                            "EVERY_KEY does not use `{}` at {}",
                            key.name, level.path
                        );
                    }
                }
                schema::Fate::RuntimeOnly => {
                    let wf = parse(&with_key(Value::Bool(true)), &[]).unwrap();
                    assert_eq!(wf.notes.len(), 1, "{}", key.name);
                    assert!(wf.notes[0]
                        .message
                        .starts_with(&format!("`{}` only tunes", key.name)));
                }
                schema::Fate::Unsupported(why) => {
                    let e = error(&with_key(Value::Bool(true)), &[]);
                    assert!(
                        e.contains(&format!("`{}` is not supported: {why}", key.name)),
                        "{}: {e}",
                        key.name
                    );
                }
            }
        }
    }
}

// dw/arguments.py realize_args: a `*_type` value in braces is the plain string inside.
#[test]
fn scheduler_type_values_in_braces_are_unwrapped_as_dw_does() {
    let src = GOOD.replace(
        "{\"clip_sample\": false}",
        "{\"clip_sample\": false, \"prediction_type\": \"{v_prediction}\", \"timestep_spacing\": \"{x}\"}",
    );
    let wf = parse(&src, &[]).unwrap();
    let args = &wf.steps[0]
        .pipeline()
        .unwrap()
        .scheduler
        .as_ref()
        .unwrap()
        .from_config_args;
    assert_eq!(args["prediction_type"], "v_prediction");
    assert_eq!(
        args["timestep_spacing"], "{x}",
        "only `*_type` keys are unwrapped"
    );
}

// diffusers' AutoPipelineForText2Image/Image2Image and DiffusionPipeline resolve from the
// folder's model_index.json; a Stable Diffusion folder maps to the SD pipelines.
#[test]
fn auto_classes_resolve_from_the_folders_class_as_diffusers_resolves_them() {
    use crate::families::{pipeline_class, resolve_auto_class};
    assert_eq!(
        pipeline_class("AutoPipelineForImage2Image").unwrap().name,
        "StableDiffusionImg2ImgPipeline"
    );
    assert_eq!(
        resolve_auto_class("AutoPipelineForImage2Image", "StableDiffusionPipeline")
            .unwrap()
            .name,
        "StableDiffusionImg2ImgPipeline"
    );
    assert_eq!(
        resolve_auto_class("diffusers.DiffusionPipeline", "StableDiffusionPipeline")
            .unwrap()
            .name,
        "StableDiffusionPipeline"
    );
    assert_eq!(
        resolve_auto_class("DiffusionPipeline", "StableDiffusionImg2ImgPipeline")
            .unwrap()
            .name,
        "StableDiffusionImg2ImgPipeline",
        "the folder's own class"
    );
    assert_eq!(
        resolve_auto_class("AutoPipelineForImage2Image", "StableDiffusionXLPipeline")
            .unwrap()
            .name,
        "StableDiffusionXLImg2ImgPipeline",
        "an SDXL base folder runs img2img with SDXL's img2img class"
    );
    assert_eq!(
        resolve_auto_class("DiffusionPipeline", "StableDiffusionXLImg2ImgPipeline")
            .unwrap()
            .name,
        "StableDiffusionXLImg2ImgPipeline",
        "a refiner folder is its own class"
    );
    let e =
        resolve_auto_class("DiffusionPipeline", "StableDiffusionXLInpaintPipeline").unwrap_err();
    assert!(
        e.starts_with("`DiffusionPipeline` resolves to `StableDiffusionXLInpaintPipeline`"),
        "{e}"
    );
    let e = pipeline_class("AutoPipelineForInpainting").unwrap_err();
    assert!(
        e.contains("`AutoPipelineForInpainting` is not supported yet"),
        "{e}"
    );
}

/// SDXL's micro-conditioning sizes are diffusers' `(height, width)` tuples, written as
/// two-number lists; its img2img `image` takes an earlier step's latents as well as images
/// (`examples/archive/sdxl.json` upstream hands the base's `{latent}` output to the
/// refiner), and keeps diffusers' defaults (strength 0.3, aesthetic scores 6 and 2.5).
#[test]
fn sdxl_arguments_take_size_pairs_and_an_image_or_latents() {
    let img2img = crate::families::pipeline_class("StableDiffusionXLImg2ImgPipeline").unwrap();
    let arguments = serde_json::json!({
        "prompt": "a fox",
        "image": "previous_result:base",
        "original_size": [1024, 768],
        "crops_coords_top_left": [0, 16],
    });
    let checked = img2img.check(arguments.as_object().unwrap()).unwrap();
    assert_eq!(checked.pair("original_size"), Some((1024, 768)));
    assert_eq!(checked.pair("crops_coords_top_left"), Some((0, 16)));
    assert_eq!(checked.number("strength"), Some(0.3));
    assert_eq!(checked.number("aesthetic_score"), Some(6.0));
    assert_eq!(checked.number("negative_aesthetic_score"), Some(2.5));
    assert!(matches!(
        checked.image("image"),
        Some(ImageSource::PreviousResult { .. })
    ));
    for bad in [
        serde_json::json!([1024]),
        serde_json::json!([0, 1024]),
        serde_json::json!("1024x1024"),
    ] {
        let arguments = serde_json::json!({"prompt": "a", "image": "x.png", "target_size": bad});
        let e = img2img.check(arguments.as_object().unwrap()).unwrap_err();
        assert_eq!(e.key, "target_size");
        assert!(e.message.contains(&format!("found {bad}")), "{}", e.message);
    }
}

/// Before its folder is read, an auto class may be any class of its task; when no class
/// takes the arguments, the error shown is that of the class that knows every argument
/// written (a value is wrong), not an unknown-argument error from another class.
#[test]
fn an_auto_class_error_comes_from_the_class_that_knows_every_argument() {
    let flow = |arguments: &str| {
        format!(
            r#"{{"id": "a", "steps": [{{"name": "s", "pipeline": {{
            "configuration": {{"component_type": "DiffusionPipeline"}},
            "from_pretrained_arguments": {{"model_name": "m"}},
            "arguments": {arguments}}}}}]}}"#
        )
    };
    let e = error(
        &flow(r#"{"prompt": "a", "image": "x.png", "original_size": [1024]}"#),
        &[],
    );
    assert!(
        e.contains("`original_size` must be two whole numbers"),
        "{e}"
    );
    assert!(
        e.contains("StableDiffusionXLImg2ImgPipeline is the one that takes every argument"),
        "{e}"
    );
    let e = error(
        // SD takes `eta`, FLUX and SD 3 take `max_sequence_length`: no class takes both.
        &flow(r#"{"prompt": "a", "image": "x.png", "eta": 0.5, "max_sequence_length": 32}"#),
        &[],
    );
    assert!(
        e.contains("none of them takes every argument written"),
        "{e}"
    );
}

/// diffusers' `from_pretrained(..., text_encoder_3=None)` as a workflow writes it: the
/// component is recorded as left out, with where it is written; one the class needs, or
/// does not have, is refused by name; an auto class is checked once its folder is known.
#[test]
fn null_components_in_from_pretrained_arguments_are_left_out_or_refused_by_name() {
    let flow = |class: &str, extra: &str| {
        format!(
            r#"{{"id": "a", "steps": [{{"name": "s", "pipeline": {{
            "configuration": {{"component_type": "{class}"}},
            "from_pretrained_arguments": {{"model_name": "m", {extra}}},
            "arguments": {{"prompt": "a"}}}}}}]}}"#
        )
    };
    let wf = parse(
        &flow(
            "StableDiffusion3Pipeline",
            r#""text_encoder_3": null, "tokenizer_3": null"#,
        ),
        &[],
    )
    .unwrap();
    let omitted = &wf.steps[0].pipeline().unwrap().omitted_components;
    let names: Vec<&str> = omitted.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["text_encoder_3", "tokenizer_3"]);
    assert_eq!(omitted[0].at.line, 3);
    assert!(wf.notes.is_empty(), "no unknown-key notes: {:?}", wf.notes);

    let e = error(
        &flow("StableDiffusion3Pipeline", r#""transformer": null"#),
        &[],
    );
    assert!(e.starts_with("flow.json:3:"), "{e}");
    assert!(
        e.contains("`transformer`: null loads the pipeline without it, but a Stable Diffusion 3 pipeline needs it; only tokenizer_3, text_encoder_3 can be left out"),
        "{e}"
    );
    let e = error(
        &flow("StableDiffusionPipeline", r#""text_encoder_3": null"#),
        &[],
    );
    assert!(
        e.contains("a Stable Diffusion pipeline has no `text_encoder_3`"),
        "{e}"
    );
    let e = error(&flow("StableDiffusion3Pipeline", r#""vae": {}"#), &[]);
    assert!(
        e.contains("`vae` in `from_pretrained_arguments` can only be null"),
        "{e}"
    );
    let wf = parse(&flow("DiffusionPipeline", r#""text_encoder_3": null"#), &[]).unwrap();
    assert_eq!(wf.steps[0].pipeline().unwrap().omitted_components.len(), 1);
}

/// diffusers-workflow's `load_loras`: `adapter_name` defaults to the index, `scale` to 1.0
/// and goes through `float()` (a `variable:` may give text); a name used twice, a scale
/// that is no number and a family without LoRAs are refused by name.
#[test]
fn loras_are_read_as_diffusers_workflow_reads_them() {
    let flow = |class: &str, loras: &str| {
        format!(
            r#"{{"id": "a", "variables": {{"s": "0.25"}}, "steps": [{{"name": "s", "pipeline": {{
            "configuration": {{"component_type": "{class}"}},
            "from_pretrained_arguments": {{"model_name": "m"}},
            "loras": {loras},
            "arguments": {{"prompt": "a"}}}}}}]}}"#
        )
    };
    let wf = parse(
        &flow(
            "StableDiffusionPipeline",
            r#"[{"model_name": "a/b"}, {"model_name": "c", "scale": "variable:s", "adapter_name": "x"}]"#,
        ),
        &[],
    )
    .unwrap();
    let loras = &wf.steps[0].pipeline().unwrap().loras;
    assert_eq!(loras.len(), 2);
    assert_eq!((loras[0].adapter_name.as_str(), loras[0].scale), ("0", 1.0));
    assert_eq!(
        (loras[1].adapter_name.as_str(), loras[1].scale),
        ("x", 0.25)
    );
    assert_eq!(loras[0].model_name_at.line, 4);

    let e = error(
        &flow(
            "StableDiffusionPipeline",
            r#"[{"model_name": "a", "adapter_name": "1"}, {"model_name": "b"}]"#,
        ),
        &[],
    );
    // The second one's name defaults to its index, "1": the first one's.
    assert!(e.contains("adapter name `1` is already LoRA 0's"), "{e}");
    let e = error(
        &flow(
            "StableDiffusionPipeline",
            r#"[{"model_name": "a", "scale": "big"}]"#,
        ),
        &[],
    );
    assert!(e.contains("`scale` must be a finite number"), "{e}");
    let e = error(
        &flow("StableDiffusionPipeline", r#"[{"weight_name": "a"}]"#),
        &[],
    );
    assert!(e.contains("missing `model_name`"), "{e}");
    let e = error(
        &flow("DwTestNoisePipeline", r#"[{"model_name": "a"}]"#),
        &[],
    );
    assert!(
        e.contains("`loras` on a test noise pipeline is not built yet; LoRAs run on Stable Diffusion, Stable Diffusion XL, FLUX.1, Stable Diffusion 3 pipelines"),
        "{e}"
    );
    let e = error(
        &flow("StableDiffusionPipeline", r#"{"model_name": "a"}"#),
        &[],
    );
    assert!(e.contains("`loras` must be a list of LoRAs"), "{e}");
}

// diffusers-workflow's `exclude_from_cpu_offload` (dw/workflow_schema.json: an array of
// strings, "Component names (e.g. 'vae', 'text_encoder') to keep resident ... Only applies
// when offload is 'sequential'"; dw/pipeline_processors/pipeline.py appends each to
// `_exclude_from_cpu_offload` before `enable_sequential_cpu_offload`). A name no pipeline
// has would do nothing there, so it is refused where it is written.
#[test]
fn exclude_from_cpu_offload_is_a_list_of_component_names() {
    let with = |value: &str| {
        GOOD.replace(
            r#""configuration": {"component_type": "StableDiffusionPipeline"}"#,
            &format!(
                r#""configuration": {{"component_type": "StableDiffusionPipeline", "offload": "sequential", "exclude_from_cpu_offload": {value}}}"#
            ),
        )
    };
    let workflow = parse(&with(r#"["vae", "text_encoder"]"#), &[]).unwrap();
    let Action::Pipeline(pipeline) = &workflow.steps[0].action else {
        panic!("a pipeline step");
    };
    assert_eq!(
        pipeline.options.exclude_from_cpu_offload,
        ["vae", "text_encoder"]
    );
    let e = error(&with(r#"["vea"]"#), &[]);
    assert!(
        e.contains("flow.json:14:126: component \"vea\" cannot be kept on the device"),
        "{e}"
    );
    let e = error(&with(r#""vae""#), &[]);
    assert!(e.contains("must be a list of component names"), "{e}");
}
