//! Noise schedulers: the checkpoint's `scheduler_config.json`, overrides on top of it, the
//! [`Scheduler`] trait the denoising loop drives, and the diffusers schedulers Stable
//! Diffusion is used with (one file each under `scheduler/`).
//!
//! A scheduler is made from the checkpoint's config the way diffusers' `from_config` makes
//! one: keys the config has are used as they are, keys it lacks take the chosen
//! scheduler's own defaults (so DDIM made from SD 1.5's PNDM config gets
//! `clip_sample: false` from the file but its own defaults for anything missing). Keys a
//! scheduler does not know are ignored, as diffusers ignores them; a known key holding a
//! value this implementation cannot honour is refused with
//! [`PipelineError::Unsupported`] naming the key.
//!
//! Schedule tables (betas, cumulative alphas, sigmas) are computed with the float32
//! rounding diffusers' torch/numpy code applies, so timesteps and sigmas match exactly.

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod flow_match_euler;
mod lcm;
mod pndm;
mod unipc;

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::noise::NoiseSource;
use super::{read_text, InComponent, PipelineError};
use protocol::families::schedule::{parse_scheduler_config, SCHEDULER_CONFIG};

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use flow_match_euler::{
    calculate_shift, first_kept_step, FlowMatchEulerDiscreteScheduler, FlowSchedule,
};
pub use lcm::LcmScheduler;
pub use pndm::PndmScheduler;
pub use unipc::UniPcMultistepScheduler;

const COMPONENT: &str = "scheduler";

/// Scheduler class names [`build_scheduler`] accepts: the registry in `protocol`, which
/// workflows are checked against before anything loads.
pub use protocol::families::NOISE_SCHEDULERS as SUPPORTED_SCHEDULERS;

/// The contents of diffusers' `scheduler_config.json`. Every field is optional: a missing
/// one takes the default of whichever scheduler is built from the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// The scheduler class the checkpoint ships, e.g. `PNDMScheduler`.
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<usize>,
    /// `leading`, `trailing` or `linspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Every other key (most schedulers' own options), kept so that the config
    /// round-trips; each scheduler reads the ones it knows by name.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json` from a `scheduler` folder.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let file = dir.join(SCHEDULER_CONFIG);
        let text = read_text(&file)?;
        let problem = |problem: String| PipelineError::BadConfig {
            file: file.clone(),
            problem,
        };
        let map = parse_scheduler_config(&text).map_err(problem)?;
        serde_json::from_value(Value::Object(map)).map_err(|e| problem(e.to_string()))
    }

    /// This config with `overrides` applied key by key (diffusers-workflow's
    /// `from_config_args`). A `null` override removes the key, so the scheduler's own
    /// default applies.
    pub fn with_overrides(&self, overrides: &Map<String, Value>) -> Result<Self, PipelineError> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let problem = |error: serde_json::Error| {
            PipelineError::invalid("scheduler overrides", error.to_string())
        };
        let mut merged = match serde_json::to_value(self).map_err(problem)? {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        for (key, value) in overrides {
            if value.is_null() {
                merged.remove(key);
            } else {
                merged.insert(key.clone(), value.clone());
            }
        }
        serde_json::from_value(Value::Object(merged)).map_err(problem)
    }
}

/// One denoising schedule: which timesteps to visit and how to step between them.
///
/// Steps are addressed by their index into [`Scheduler::timesteps`] (a schedule may visit a
/// timestep twice, as PNDM does). A run starting part-way (image-to-image) starts at a later
/// index; stateful schedulers keep their history from the first step they are given.
pub trait Scheduler: Send {
    /// Chooses the timesteps for `num_inference_steps` steps and resets any history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError>;
    /// The timesteps chosen by [`Scheduler::set_timesteps`], in the order to visit them, as
    /// the values the model is conditioned on (fractional for some sigma schedules).
    fn timesteps(&self) -> &[f64];
    /// How many entries of [`Scheduler::timesteps`] make up one inference step (diffusers'
    /// `order`); image-to-image skips `order` entries per skipped step.
    fn order(&self) -> usize {
        1
    }
    /// Standard deviation the initial noise is scaled by (1 unless sigma-based).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the model input for step `step_index` (identity unless sigma-based).
    fn scale_model_input(
        &self,
        sample: Tensor,
        _step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        Ok(sample)
    }
    /// The sample after step `step_index` given the model output for `sample`. Stochastic
    /// schedulers draw their noise from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError>;
    /// Noises clean `original` samples to the noise level of step `step_index` (the forward
    /// diffusion process, used to start image-to-image part-way).
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError>;
}

/// Builds the scheduler `class_name` from `config` (the checkpoint's, possibly overridden).
pub fn build_scheduler(
    class_name: &str,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>, PipelineError> {
    Ok(match class_name {
        "DDIMScheduler" => Box::new(DdimScheduler::new(config)?),
        "PNDMScheduler" => Box::new(PndmScheduler::new(config)?),
        "EulerDiscreteScheduler" => Box::new(EulerDiscreteScheduler::new(config)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(EulerAncestralDiscreteScheduler::new(config)?)
        }
        "DPMSolverMultistepScheduler" => Box::new(DpmSolverMultistepScheduler::new(config)?),
        "UniPCMultistepScheduler" => Box::new(UniPcMultistepScheduler::new(config)?),
        "LCMScheduler" => Box::new(LcmScheduler::new(config)?),
        other => {
            return Err(PipelineError::unsupported(
                "scheduler",
                other,
                SUPPORTED_SCHEDULERS.join(", "),
            ))
        }
    })
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    /// Reads `prediction_type` (default `epsilon`), accepting only `supported`.
    fn read(options: &Options, supported: &[Self]) -> Result<Self, PipelineError> {
        let names: Vec<&str> = supported.iter().map(|kind| kind.name()).collect();
        let name = options.choice("prediction_type", "epsilon", &names)?;
        Ok(supported
            .iter()
            .copied()
            .find(|kind| kind.name() == name)
            .unwrap_or(Self::Epsilon))
    }

    fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

const ALL_PREDICTIONS: &[PredictionType] = &[
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    fn read(options: &Options, default: &str) -> Result<Self, PipelineError> {
        Ok(
            match options.choice(
                "timestep_spacing",
                default,
                &["leading", "trailing", "linspace"],
            )? {
                "leading" => Self::Leading,
                "trailing" => Self::Trailing,
                _ => Self::Linspace,
            },
        )
    }
}

/// Typed, defaulted access to a scheduler config's keys; a key that is absent or `null`
/// takes the scheduler's default.
pub(crate) struct Options {
    map: Map<String, Value>,
}

impl Options {
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        match serde_json::to_value(config) {
            Ok(Value::Object(map)) => Ok(Self { map }),
            Ok(_) => Ok(Self { map: Map::new() }),
            Err(error) => Err(PipelineError::invalid(
                "scheduler config",
                error.to_string(),
            )),
        }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    /// Whether the key holds a value other than `null`.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.value(key).is_some()
    }

    fn wrong_type(key: &str, expected: &str, value: &Value) -> PipelineError {
        PipelineError::invalid(
            format!("scheduler option `{key}`"),
            format!("expected {expected}, got {value}"),
        )
    }

    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_bool()
                .ok_or_else(|| Self::wrong_type(key, "true or false", value)),
        }
    }

    pub(crate) fn f64(&self, key: &str, default: f64) -> Result<f64, PipelineError> {
        Ok(self.optional_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn optional_f64(&self, key: &str) -> Result<Option<f64>, PipelineError> {
        match self.value(key) {
            None => Ok(None),
            Some(value) => value
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong_type(key, "a number", value)),
        }
    }

    pub(crate) fn usize(&self, key: &str, default: usize) -> Result<usize, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_u64()
                .and_then(|number| usize::try_from(number).ok())
                .ok_or_else(|| Self::wrong_type(key, "a non-negative integer", value)),
        }
    }

    pub(crate) fn usize_list(&self, key: &str) -> Result<Vec<usize>, PipelineError> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_u64()
                        .and_then(|number| usize::try_from(number).ok())
                        .ok_or_else(|| Self::wrong_type(key, "a list of integers", item))
                })
                .collect(),
            Some(value) => Err(Self::wrong_type(key, "a list of integers", value)),
        }
    }

    pub(crate) fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, PipelineError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_f64()
                        .ok_or_else(|| Self::wrong_type(key, "a list of numbers", item))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(value) => Err(Self::wrong_type(key, "a list of numbers", value)),
        }
    }

    pub(crate) fn optional_string(&self, key: &str) -> Result<Option<&str>, PipelineError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(found)) => Ok(Some(found.as_str())),
            Some(value) => Err(Self::wrong_type(key, "a string", value)),
        }
    }

    /// A string option that must be one of `supported`.
    pub(crate) fn choice<'a>(
        &'a self,
        key: &str,
        default: &'a str,
        supported: &[&str],
    ) -> Result<&'a str, PipelineError> {
        let found = match self.value(key) {
            None => default,
            Some(Value::String(found)) => found.as_str(),
            Some(value) => {
                return Err(PipelineError::unsupported(
                    key,
                    value.to_string(),
                    supported.join(", "),
                ))
            }
        };
        if supported.contains(&found) {
            Ok(found)
        } else {
            Err(PipelineError::unsupported(key, found, supported.join(", ")))
        }
    }

    /// Refuses a boolean option this implementation only supports as `false`.
    pub(crate) fn require_false(&self, key: &str) -> Result<(), PipelineError> {
        if self.bool(key, false)? {
            return Err(PipelineError::unsupported(key, "true", "false"));
        }
        Ok(())
    }
}

/// The training noise schedule every scheduler starts from.
#[derive(Debug, Clone)]
pub(crate) struct TrainingSchedule {
    /// Cumulative products of `1 - beta`, one per training timestep.
    pub(crate) alphas_cumprod: Vec<f64>,
}

/// A scheduler's defaults for the beta keys.
pub(crate) struct BetaDefaults {
    pub(crate) beta_start: f64,
    pub(crate) beta_end: f64,
    pub(crate) beta_schedule: &'static str,
}

/// The defaults of every scheduler but LCM.
pub(crate) const DEFAULT_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
};

/// How a scheduler treats `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroSnr {
    /// The scheduler has no such option.
    NotAnOption,
    /// Rescaled as asked; the last cumulative alpha becomes 0.
    Rescale,
    /// Rescaled as asked, then the last cumulative alpha is lifted to 2^-24 so the first
    /// sigma stays finite (the sigma-based schedulers).
    RescaleWithFloor,
}

impl TrainingSchedule {
    pub(crate) fn new(
        options: &Options,
        defaults: &BetaDefaults,
        zero_snr: ZeroSnr,
    ) -> Result<Self, PipelineError> {
        let num_train_timesteps = options.usize("num_train_timesteps", 1000)?;
        if num_train_timesteps < 2 {
            return Err(PipelineError::invalid(
                "num_train_timesteps",
                format!("{num_train_timesteps} is below 2"),
            ));
        }
        let betas = match options.f64_list("trained_betas")? {
            Some(betas) if betas.len() == num_train_timesteps => betas
                .into_iter()
                .map(|beta| f64::from(beta as f32))
                .collect(),
            Some(betas) => {
                return Err(PipelineError::invalid(
                    "trained_betas",
                    format!(
                        "has {} values for {num_train_timesteps} training timesteps",
                        betas.len()
                    ),
                ))
            }
            None => {
                let schedule = options.choice(
                    "beta_schedule",
                    defaults.beta_schedule,
                    &["linear", "scaled_linear", "squaredcos_cap_v2"],
                )?;
                beta_schedule(
                    schedule,
                    options.f64("beta_start", defaults.beta_start)?,
                    options.f64("beta_end", defaults.beta_end)?,
                    num_train_timesteps,
                )?
            }
        };
        let mut alphas_cumprod = cumulative_alphas(&betas);
        if zero_snr != ZeroSnr::NotAnOption && options.bool("rescale_betas_zero_snr", false)? {
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod);
            if zero_snr == ZeroSnr::RescaleWithFloor {
                if let Some(last) = alphas_cumprod.last_mut() {
                    *last = 2f64.powi(-24);
                }
            }
        }
        Ok(Self { alphas_cumprod })
    }

    pub(crate) fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The cumulative alpha at a training timestep, or an error naming the timestep.
    pub(crate) fn alpha_cumprod(&self, timestep: usize) -> Result<f64, PipelineError> {
        self.alphas_cumprod.get(timestep).copied().ok_or_else(|| {
            PipelineError::invalid(
                "timestep",
                format!(
                    "{timestep} is outside the {} training timesteps",
                    self.num_train_timesteps()
                ),
            )
        })
    }

    /// `sqrt((1 - alpha) / alpha)` per training timestep, computed in f32 like diffusers.
    pub(crate) fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|alpha| {
                let alpha = *alpha as f32;
                f64::from(((1.0 - alpha) / alpha).sqrt())
            })
            .collect()
    }

    /// `ln` of [`TrainingSchedule::sigmas`], in f32 like numpy on a float32 array.
    pub(crate) fn log_sigmas(&self) -> Vec<f64> {
        self.sigmas()
            .iter()
            .map(|sigma| f64::from((*sigma as f32).ln()))
            .collect()
    }

    /// `sqrt(alpha) * original + sqrt(1 - alpha) * noise` at a training timestep.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: usize,
    ) -> Result<Tensor, PipelineError> {
        let alpha = self.alpha_cumprod(timestep)? as f32;
        let (signal, noise_scale) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        compute(|| (original * f64::from(signal))? + (noise * f64::from(noise_scale))?)
    }
}

/// Checks a requested step count against the training schedule.
pub(crate) fn check_step_count(
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<(), PipelineError> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(PipelineError::invalid(
            "num_inference_steps",
            format!("{num_inference_steps} is not between 1 and {num_train_timesteps}"),
        ));
    }
    Ok(())
}

/// Fails unless `set_timesteps` was called and `step_index` is inside the schedule.
pub(crate) fn check_step_index(step_index: usize, steps: usize) -> Result<(), PipelineError> {
    if steps == 0 {
        return Err(PipelineError::invalid(
            "scheduler",
            "set_timesteps must be called before stepping",
        ));
    }
    if step_index >= steps {
        return Err(PipelineError::invalid(
            "step index",
            format!("{step_index} is past the {steps} scheduled steps"),
        ));
    }
    Ok(())
}

/// Converts integer timesteps to the model's timestep values.
pub(crate) fn as_model_timesteps(timesteps: &[usize]) -> Vec<f64> {
    timesteps.iter().map(|timestep| *timestep as f64).collect()
}

/// Turns integer timesteps computed in i64 into indices of the training schedule.
pub(crate) fn checked_timesteps(
    timesteps: Vec<i64>,
    num_train_timesteps: usize,
) -> Result<Vec<usize>, PipelineError> {
    timesteps
        .into_iter()
        .map(|timestep| {
            usize::try_from(timestep)
                .ok()
                .filter(|timestep| *timestep < num_train_timesteps)
                .ok_or_else(|| {
                    PipelineError::invalid(
                        "steps_offset",
                        format!(
                            "timestep {timestep} falls outside the {num_train_timesteps} training timesteps"
                        ),
                    )
                })
        })
        .collect()
}

/// Fails, naming the first offender, unless every (fractional) timestep lies within the
/// `num_train_timesteps` of the training schedule.
pub(crate) fn check_timesteps_in_range(
    timesteps: &[f64],
    num_train_timesteps: usize,
) -> Result<(), PipelineError> {
    match timesteps
        .iter()
        .find(|timestep| !(0.0..num_train_timesteps as f64).contains(*timestep))
    {
        Some(bad) => Err(PipelineError::invalid(
            "steps_offset",
            format!("timestep {bad} falls outside the {num_train_timesteps} training timesteps"),
        )),
        None => Ok(()),
    }
}

/// `np.linspace(start, end, count)` in f64 (the last value is exactly `end`).
pub fn linspace(start: f64, end: f64, count: usize) -> Vec<f64> {
    match count {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (count - 1) as f64;
            (0..count)
                .map(|index| {
                    if index == count - 1 {
                        end
                    } else {
                        start + index as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// `np.arange(start, 0, -step)` for a positive float step.
/// The timesteps of diffusers' multistep solvers (DPM-Solver, UniPC) for `steps` steps
/// out of `last` usable training timesteps (`train` of them in all), by `spacing`.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    last: usize,
    train: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut values: Vec<f64> = linspace(0.0, last as f64 - 1.0, steps + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            values.reverse();
            values.pop();
            values
        }
        TimestepSpacing::Leading => {
            let ratio = last / (steps + 1);
            (1..=steps)
                .rev()
                .map(|index| (index * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => arange_down_to_zero(last as f64, train as f64 / steps as f64)
            .into_iter()
            .map(|position| position.round_ties_even() - 1.0)
            .collect(),
    }
}

pub(crate) fn arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil().max(0.0) as usize;
    (0..count)
        .map(|index| start - index as f64 * step)
        .collect()
}

/// `np.interp(x, [0, 1, ..., n - 1], values)` for `x` within the range.
pub(crate) fn interpolate(values: &[f64], x: f64) -> f64 {
    let last = values.len().saturating_sub(1);
    if x <= 0.0 {
        return values.first().copied().unwrap_or(0.0);
    }
    if x >= last as f64 {
        return values.last().copied().unwrap_or(0.0);
    }
    let low = x.floor() as usize;
    let fraction = x - low as f64;
    if fraction == 0.0 {
        return values[low];
    }
    values[low] + (values[low + 1] - values[low]) * fraction
}

/// The Karras et al. (2022) sigma ramp from `sigma_max` down to `sigma_min` (rho 7).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, count: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    linspace(0.0, 1.0, count)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating linearly in
/// log-sigma between neighbouring timesteps.
pub(crate) fn sigma_to_timestep(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below_or_at = log_sigmas
        .iter()
        .rposition(|log| log_sigma - log >= 0.0)
        .unwrap_or(0);
    let low_index = below_or_at.min(log_sigmas.len().saturating_sub(2));
    let high_index = low_index + 1;
    let (low, high) = (log_sigmas[low_index], log_sigmas[high_index]);
    let weight = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - weight) * low_index as f64 + weight * high_index as f64
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at noise level `sigma`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Rounds a value through f32, as values stored in float32 tensors are.
pub(crate) fn f32_round_trip(value: f64) -> f64 {
    f64::from(value as f32)
}

/// `sample * a + other * b` on tensors.
pub(crate) fn weighted_sum(
    first: &Tensor,
    first_weight: f64,
    second: &Tensor,
    second_weight: f64,
) -> Result<Tensor, PipelineError> {
    compute(|| (first * first_weight)? + (second * second_weight)?)
}

/// Runs tensor arithmetic, attributing candle errors to the scheduler.
pub(crate) fn compute<T>(
    operation: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    operation().in_component(COMPONENT)
}

/// The betas of a named schedule, computed in f32 like diffusers (torch float32).
fn beta_schedule(
    name: &str,
    beta_start: f64,
    beta_end: f64,
    count: usize,
) -> Result<Vec<f64>, PipelineError> {
    match name {
        "linear" => Ok(linspace_f32(beta_start as f32, beta_end as f32, count)
            .into_iter()
            .map(f64::from)
            .collect()),
        "scaled_linear" => {
            Ok(
                linspace_f32((beta_start as f32).sqrt(), (beta_end as f32).sqrt(), count)
                    .into_iter()
                    .map(|root| f64::from(root * root))
                    .collect(),
            )
        }
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            Ok((0..count)
                .map(|index| {
                    let t1 = index as f64 / count as f64;
                    let t2 = (index + 1) as f64 / count as f64;
                    let beta = (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999);
                    f64::from(beta as f32)
                })
                .collect())
        }
        other => Err(PipelineError::unsupported(
            "beta_schedule",
            other,
            "linear, scaled_linear, squaredcos_cap_v2",
        )),
    }
}

/// `torch.linspace(start, end, count, dtype=float32)`: the first half counted up from
/// `start`, the second half counted down from `end`.
fn linspace_f32(start: f32, end: f32, count: usize) -> Vec<f32> {
    if count == 1 {
        return vec![start];
    }
    let step = (end - start) / (count - 1) as f32;
    let halfway = count / 2;
    (0..count)
        .map(|index| {
            if index < halfway {
                start + step * index as f32
            } else {
                end - step * (count - 1 - index) as f32
            }
        })
        .collect()
}

/// Running products of `1 - beta`, each stored as f32 like torch's `cumprod` on float32.
fn cumulative_alphas(betas: &[f64]) -> Vec<f64> {
    let mut product = 1.0f64;
    betas
        .iter()
        .map(|beta| {
            product *= f64::from(1.0f32 - *beta as f32);
            f64::from(product as f32)
        })
        .collect()
}

/// Shifts the schedule so the last timestep has zero signal (Lin et al., 2023).
fn rescale_zero_terminal_snr(alphas_cumprod: &[f64]) -> Vec<f64> {
    let roots: Vec<f64> = alphas_cumprod.iter().map(|alpha| alpha.sqrt()).collect();
    let (first, last) = (roots[0], roots[roots.len() - 1]);
    let scale = first / (first - last);
    // The products of the rescaled per-step alphas telescope back to the squared roots.
    roots
        .iter()
        .map(|root| {
            let rescaled = (root - last) * scale;
            rescaled * rescaled
        })
        .collect()
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn negative_infinity_reads_as_absent() {
        let text = r#"{"lambda_min_clipped": -Infinity, "note": "-Infinity stays"}"#;
        let map = parse_scheduler_config(text).unwrap();
        let config: SchedulerConfig = serde_json::from_value(Value::Object(map)).unwrap();
        assert_eq!(config.other.get("lambda_min_clipped"), Some(&Value::Null));
        assert_eq!(config.other.get("note"), Some(&json!("-Infinity stays")));
    }

    /// `dwctl validate` and the daemon's pre-load check refuse a step count with
    /// `protocol::families::schedule::check_steps`; the schedulers themselves refuse with
    /// their own arithmetic. Over every scheduler, spacing, offset and the step counts at
    /// both ends, the two must agree, or a workflow would pass validation and fail after
    /// its weights load.
    #[test]
    fn the_shared_step_count_check_agrees_with_every_scheduler() {
        use protocol::families::schedule::check_steps;
        let spacings = [None, Some("leading"), Some("linspace"), Some("trailing")];
        for train in [1000usize, 37] {
            let counts: Vec<usize> = (1..=24).chain(train - 24..=train + 1).collect();
            for class in SUPPORTED_SCHEDULERS {
                for spacing in spacings {
                    for offset in [0usize, 1, 3] {
                        for karras in [false, true] {
                            let mut config = json!({"num_train_timesteps": train,
                                "steps_offset": offset, "use_karras_sigmas": karras,
                                "original_inference_steps": 20});
                            if let Some(spacing) = spacing {
                                config["timestep_spacing"] = json!(spacing);
                            }
                            let map = match &config {
                                Value::Object(map) => map.clone(),
                                _ => unreachable!(),
                            };
                            let typed: SchedulerConfig = serde_json::from_value(config).unwrap();
                            let Ok(mut scheduler) = build_scheduler(class, &typed) else {
                                continue;
                            };
                            for &steps in &counts {
                                let real = scheduler.set_timesteps(steps).is_ok();
                                let shared = check_steps(class, &map, steps).is_ok();
                                assert_eq!(
                                    real, shared,
                                    "{class} {spacing:?} offset {offset} karras {karras}, {steps} of {train} steps"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn numpy_style_ranges() {
        assert_eq!(linspace(0.0, 999.0, 4), [0.0, 333.0, 666.0, 999.0]);
        assert_eq!(
            arange_down_to_zero(1000.0, 250.0),
            [1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(interpolate(&[1.0, 3.0], 0.25), 1.5);
        assert_eq!(interpolate(&[1.0, 3.0], 1.0), 3.0);
    }

    #[test]
    fn sigma_to_timestep_inverts_the_schedule() {
        let log_sigmas: Vec<f64> = [0.1f64, 0.5, 1.0, 4.0].iter().map(|s| s.ln()).collect();
        assert_eq!(sigma_to_timestep(0.5, &log_sigmas), 1.0);
        assert_eq!(sigma_to_timestep(4.0, &log_sigmas), 3.0);
        let between = sigma_to_timestep((0.5f64 * 1.0).sqrt(), &log_sigmas);
        assert!((between - 1.5).abs() < 1e-12, "{between}");
        assert_eq!(sigma_to_timestep(0.01, &log_sigmas), 0.0);
    }
}
