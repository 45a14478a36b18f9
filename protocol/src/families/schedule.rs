//! How many inference steps a checkpoint's scheduler can take: the check `dwctl validate`
//! and the daemon both make before any weight loads.
//!
//! diffusers' integer-timestep schedulers space their timesteps evenly over the
//! `num_train_timesteps` of training. With "leading" spacing they then add `steps_offset`
//! (1 in Stable Diffusion's shipped `scheduler_config.json`), so near
//! `num_train_timesteps` steps the last timestep lands past the training schedule and
//! diffusers fails part-way with an index error. `LCMScheduler` picks its steps from the
//! `original_inference_steps` it was distilled with, so it takes no more than those.
//! The daemon's schedulers refuse the same cases; a test in `dwd` runs every scheduler
//! against [`check_steps`] so that the two cannot drift apart.

use std::path::Path;

use serde_json::{Map, Value};

use crate::workflow::{ArgDefault, Arguments, PipelineClass, SchedulerSpec};

/// The scheduler's folder inside a diffusers model folder.
pub const SCHEDULER_DIR: &str = "scheduler";
/// The config file in it.
pub const SCHEDULER_CONFIG: &str = "scheduler_config.json";

/// `scheduler/scheduler_config.json` of a model folder as a JSON object; `None` where the
/// folder has none (a family that ships its scheduler elsewhere, or a bare checkpoint).
pub fn read_scheduler_config(model_dir: &Path) -> Result<Option<Map<String, Value>>, String> {
    let file = model_dir.join(SCHEDULER_DIR).join(SCHEDULER_CONFIG);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    parse_scheduler_config(&text)
        .map(Some)
        .map_err(|problem| format!("{}: {problem}", file.display()))
}

/// Parses a `scheduler_config.json` text as diffusers writes it. Python's json module
/// writes `-inf` (DPM-Solver's default `lambda_min_clipped`) as the bare word `-Infinity`,
/// which is not JSON; a key holding it is read as `null`, which means the scheduler's own
/// default (that same `-inf`).
pub fn parse_scheduler_config(text: &str) -> Result<Map<String, Value>, String> {
    let parsed = serde_json::from_str::<Value>(text)
        .or_else(|error| serde_json::from_str(&without_negative_infinity(text)).map_err(|_| error))
        .map_err(|error| error.to_string())?;
    match parsed {
        Value::Object(map) => Ok(map),
        _ => Err("is not a JSON object".to_string()),
    }
}

/// The config with a step's `from_config_args` applied key by key; a `null` override
/// removes the key, so the scheduler's own default applies.
pub fn with_overrides(
    mut config: Map<String, Value>,
    overrides: &Map<String, Value>,
) -> Map<String, Value> {
    for (key, value) in overrides {
        if value.is_null() {
            config.remove(key);
        } else {
            config.insert(key.clone(), value.clone());
        }
    }
    config
}

/// The scheduler a step runs: the class its `scheduler` block names, else the one the
/// checkpoint ships; with the config it is built from.
pub fn step_scheduler(
    shipped: Map<String, Value>,
    requested: Option<&SchedulerSpec>,
) -> (Option<String>, Map<String, Value>) {
    let shipped_class = shipped
        .get("_class_name")
        .and_then(Value::as_str)
        .map(str::to_string);
    match requested {
        Some(spec) => (
            Some(spec.scheduler_type.clone()),
            with_overrides(shipped, &spec.from_config_args),
        ),
        None => (shipped_class, shipped),
    }
}

/// The `num_inference_steps` a run asks for: its own, else its class's default.
pub fn requested_steps(class: &PipelineClass, arguments: &Arguments) -> Option<usize> {
    arguments.integer("num_inference_steps").or_else(|| {
        match class.argument("num_inference_steps")?.default {
            ArgDefault::Integer(steps) => usize::try_from(steps).ok(),
            _ => None,
        }
    })
}

/// Fails, saying why and what would work, where `scheduler` built from `config` cannot
/// take `steps` inference steps. Schedulers this module does not know pass: other checks
/// name them.
pub fn check_steps(
    scheduler: &str,
    config: &Map<String, Value>,
    steps: usize,
) -> Result<(), String> {
    let keys = Keys::read(config);
    let train = keys.num_train_timesteps;
    let counted = matches!(
        scheduler,
        "DDIMScheduler"
            | "PNDMScheduler"
            | "EulerDiscreteScheduler"
            | "EulerAncestralDiscreteScheduler"
            | "DPMSolverMultistepScheduler"
            | "UniPCMultistepScheduler"
            | "LCMScheduler"
    );
    if counted && (steps == 0 || steps > train) {
        return Err(format!(
            "`num_inference_steps` {steps} is not between 1 and the {train} training timesteps of {scheduler}"
        ));
    }
    if scheduler == "LCMScheduler" && steps > keys.original_inference_steps {
        return Err(format!(
            "`num_inference_steps` {steps} exceeds LCMScheduler's `original_inference_steps` ({}): LCM picks its steps from those it was distilled with",
            keys.original_inference_steps
        ));
    }
    if let Some(last) = last_timestep(scheduler, &keys, steps).filter(|last| *last >= train) {
        return Err(past_the_schedule(scheduler, &keys, steps, last));
    }
    if trailing_overshoots(scheduler, &keys, steps) {
        let fits = |n: &usize| !trailing_overshoots(scheduler, &keys, *n);
        let nearest: Vec<String> = [(1..steps).rev().find(fits), (steps + 1..=train).find(fits)]
            .into_iter()
            .flatten()
            .map(|n| n.to_string())
            .collect();
        return Err(format!(
            "`num_inference_steps` {steps} with {scheduler}'s \"trailing\" `timestep_spacing` over {train} training timesteps hits a floating-point edge of numpy's arange, which makes one timestep more than asked for, the last of them -1; use {} steps",
            nearest.join(" or ")
        ));
    }
    Ok(())
}

/// Whether numpy's `arange(train, 0, -train / steps)`, which the multistep solvers and PNDM
/// space "trailing" timesteps with, yields one value too many (a rounding of
/// `train / (train / steps)` just above `steps`), whose timestep is then -1.
fn trailing_overshoots(scheduler: &str, keys: &Keys, steps: usize) -> bool {
    let uses_arange = match scheduler {
        "PNDMScheduler" => keys.timestep_spacing.as_deref() == Some("trailing"),
        "DPMSolverMultistepScheduler" | "UniPCMultistepScheduler" => {
            keys.timestep_spacing.as_deref() == Some("trailing")
                && !keys.use_karras_sigmas
                && !keys.clipped
        }
        _ => false,
    };
    if !uses_arange {
        return false;
    }
    let start = keys.num_train_timesteps as f64;
    let step = start / steps as f64;
    let count = (start / step).ceil().max(0.0);
    let smallest = start - (count - 1.0) * step;
    smallest.round_ties_even() - 1.0 < 0.0
}

/// The config keys the step count depends on, with diffusers' defaults.
struct Keys {
    num_train_timesteps: usize,
    steps_offset: usize,
    timestep_spacing: Option<String>,
    original_inference_steps: usize,
    use_karras_sigmas: bool,
    /// DPM-Solver's `lambda_min_clipped` is set (finite): it shortens the schedule by an
    /// amount only the betas tell.
    clipped: bool,
}

impl Keys {
    fn read(config: &Map<String, Value>) -> Self {
        let count = |key: &str, default: usize| {
            config
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(default)
        };
        Keys {
            num_train_timesteps: count("num_train_timesteps", 1000),
            steps_offset: count("steps_offset", 0),
            timestep_spacing: config
                .get("timestep_spacing")
                .and_then(Value::as_str)
                .map(str::to_string),
            original_inference_steps: count("original_inference_steps", 50),
            use_karras_sigmas: config
                .get("use_karras_sigmas")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            clipped: config
                .get("lambda_min_clipped")
                .and_then(Value::as_f64)
                .is_some_and(f64::is_finite),
        }
    }
}

/// The largest integer timestep `scheduler` visits for `steps` steps where it can pass the
/// training schedule ("leading" spacing plus `steps_offset`); `None` where it cannot.
fn last_timestep(scheduler: &str, keys: &Keys, steps: usize) -> Option<usize> {
    let train = keys.num_train_timesteps;
    let spacing = |default: &str| keys.timestep_spacing.as_deref().unwrap_or(default) == "leading";
    match scheduler {
        // range(0, steps) * (train // steps) + steps_offset
        "DDIMScheduler" | "PNDMScheduler" if spacing("leading") => {
            Some((steps - 1) * (train / steps) + keys.steps_offset)
        }
        // range(1, steps + 1) * (last // (steps + 1)) + steps_offset, unless Karras sigmas
        // replace the timesteps
        "DPMSolverMultistepScheduler" | "UniPCMultistepScheduler"
            if spacing("linspace") && !keys.use_karras_sigmas && !keys.clipped =>
        {
            Some(steps * (train / (steps + 1)) + keys.steps_offset)
        }
        _ => None,
    }
}

fn past_the_schedule(scheduler: &str, keys: &Keys, steps: usize, last: usize) -> String {
    let train = keys.num_train_timesteps;
    let fits = (1..steps)
        .rev()
        .find(|fewer| last_timestep(scheduler, keys, *fewer).is_some_and(|t| t < train));
    let fewer = fits.map_or(String::new(), |n| format!("use at most {n} steps, or "));
    format!(
        "`num_inference_steps` {steps} is too many for {scheduler} with \"leading\" `timestep_spacing` and `steps_offset` {}: its last timestep would be {last}, past the {train} training timesteps (diffusers fails on it too); {fewer}set `timestep_spacing` to \"trailing\" in the scheduler's `from_config_args`",
        keys.steps_offset
    )
}

/// `text` with every `-Infinity` outside a string replaced by `null`.
fn without_negative_infinity(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(character) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if character == '\\' {
                escaped = true;
            } else if character == '"' {
                in_string = false;
            }
        } else if character == '"' {
            in_string = true;
        } else if rest.starts_with("-Infinity") {
            out.push_str("null");
            rest = &rest["-Infinity".len()..];
            continue;
        }
        out.push(character);
        rest = &rest[character.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("a test config is an object"),
        }
    }

    /// Stable Diffusion 1.5's shipped scheduler: PNDM, leading spacing, `steps_offset` 1.
    fn sd15() -> Map<String, Value> {
        config(
            json!({"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
            "steps_offset": 1, "skip_prk_steps": true}),
        )
    }

    #[test]
    fn pndm_with_an_offset_refuses_the_step_count_that_reaches_timestep_1000() {
        let message = check_steps("PNDMScheduler", &sd15(), 1000).unwrap_err();
        assert!(message.contains("`num_inference_steps` 1000"), "{message}");
        assert!(message.contains("last timestep would be 1000"), "{message}");
        assert!(message.contains("use at most 999 steps"), "{message}");
        assert!(message.contains("\"trailing\""), "{message}");
        check_steps("PNDMScheduler", &sd15(), 999).unwrap();
        check_steps("PNDMScheduler", &sd15(), 50).unwrap();
    }

    #[test]
    fn trailing_spacing_or_no_offset_takes_every_step_count() {
        let trailing = with_overrides(sd15(), &config(json!({"timestep_spacing": "trailing"})));
        let no_offset = with_overrides(sd15(), &config(json!({"steps_offset": null})));
        for steps in [1, 2, 999, 1000] {
            check_steps("DDIMScheduler", &trailing, steps).unwrap();
            check_steps("PNDMScheduler", &no_offset, steps).unwrap();
        }
    }

    #[test]
    fn step_counts_outside_the_training_schedule_are_refused_for_every_noise_scheduler() {
        let small = config(json!({"num_train_timesteps": 10}));
        for scheduler in [
            "EulerDiscreteScheduler",
            "UniPCMultistepScheduler",
            "LCMScheduler",
        ] {
            let message = check_steps(scheduler, &small, 11).unwrap_err();
            assert!(message.contains("not between 1 and the 10"), "{message}");
        }
        check_steps("FlowMatchEulerDiscreteScheduler", &small, 11).unwrap();
    }

    #[test]
    fn multistep_solvers_count_the_offset_on_their_own_leading_spacing() {
        let leading = config(json!({"timestep_spacing": "leading", "steps_offset": 1}));
        // range(1, 1000) * (1000 // 1000) + 1 ends at 1000.
        let message = check_steps("UniPCMultistepScheduler", &leading, 999).unwrap_err();
        assert!(message.contains("last timestep would be 1000"), "{message}");
        check_steps("UniPCMultistepScheduler", &leading, 998).unwrap();
        let karras = with_overrides(leading, &config(json!({"use_karras_sigmas": true})));
        check_steps("DPMSolverMultistepScheduler", &karras, 999).unwrap();
    }

    #[test]
    fn trailing_spacing_refuses_the_counts_where_arange_makes_a_timestep_too_many() {
        let trailing = config(json!({"timestep_spacing": "trailing"}));
        let message = check_steps("DPMSolverMultistepScheduler", &trailing, 976).unwrap_err();
        assert!(message.contains("use 973 or 977 steps"), "{message}");
        check_steps("DPMSolverMultistepScheduler", &trailing, 973).unwrap();
        check_steps("DPMSolverMultistepScheduler", &trailing, 30).unwrap();
        check_steps("DDIMScheduler", &trailing, 976).unwrap();
    }

    #[test]
    fn lcm_takes_no_more_than_its_original_inference_steps() {
        let lcm = config(json!({"original_inference_steps": 8}));
        check_steps("LCMScheduler", &lcm, 8).unwrap();
        let message = check_steps("LCMScheduler", &lcm, 9).unwrap_err();
        assert!(
            message.contains("`original_inference_steps` (8)"),
            "{message}"
        );
    }

    #[test]
    fn a_step_scheduler_block_replaces_the_class_and_overrides_the_config() {
        let spec = SchedulerSpec {
            scheduler_type: "DDIMScheduler".into(),
            from_config_args: config(json!({"timestep_spacing": "trailing"})),
        };
        let (class, merged) = step_scheduler(sd15(), Some(&spec));
        assert_eq!(class.as_deref(), Some("DDIMScheduler"));
        assert_eq!(merged["timestep_spacing"], "trailing");
        assert_eq!(merged["steps_offset"], 1);
        let (class, _) = step_scheduler(sd15(), None);
        assert_eq!(class.as_deref(), Some("PNDMScheduler"));
    }

    #[test]
    fn python_negative_infinity_reads_as_null_outside_strings() {
        let parsed =
            parse_scheduler_config(r#"{"lambda_min_clipped": -Infinity, "note": "-Infinity"}"#)
                .unwrap();
        assert_eq!(parsed["lambda_min_clipped"], Value::Null);
        assert_eq!(parsed["note"], "-Infinity");
    }
}
