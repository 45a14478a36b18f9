//! Noise schedulers: the checkpoint's `scheduler_config.json`, overrides on top of it, and
//! the [`Scheduler`] trait the denoising loop drives.
//!
//! A scheduler is made from the checkpoint's config the way diffusers' `from_config` makes
//! one: keys the config has are used as they are, keys it lacks take the chosen
//! scheduler's own defaults (so DDIM made from SD 1.5's PNDM config gets
//! `clip_sample: false` from the file but its own defaults for anything missing).
//! Only DDIM is implemented so far; other names are rejected with the supported list.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{read_text, InComponent, PipelineError};

const COMPONENT: &str = "scheduler";

/// Scheduler class names [`build_scheduler`] accepts.
pub const SUPPORTED_SCHEDULERS: &[&str] = &["DDIMScheduler"];

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
    /// Keys this implementation does not read (other schedulers' options), kept so that
    /// the config round-trips.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json` from a `scheduler` folder.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let file = dir.join("scheduler_config.json");
        let text = read_text(&file)?;
        serde_json::from_str(&text).map_err(|error| PipelineError::BadConfig {
            file,
            problem: error.to_string(),
        })
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
pub trait Scheduler: Send {
    /// Chooses the timesteps for `num_inference_steps` steps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError>;
    /// The timesteps chosen by [`Scheduler::set_timesteps`], in the order to visit them.
    fn timesteps(&self) -> &[usize];
    /// Standard deviation the initial noise is scaled by.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the model input for timestep `timestep` (identity for DDIM).
    fn scale_model_input(&self, sample: Tensor, timestep: usize) -> Result<Tensor, PipelineError>;
    /// The sample at the previous timestep given the model output at `timestep`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<Tensor, PipelineError>;
}

/// Builds the scheduler `class_name` from `config` (the checkpoint's, possibly overridden).
pub fn build_scheduler(
    class_name: &str,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>, PipelineError> {
    match class_name {
        "DDIMScheduler" => Ok(Box::new(DdimScheduler::new(config)?)),
        other => Err(PipelineError::unsupported(
            "scheduler",
            other,
            SUPPORTED_SCHEDULERS.join(", "),
        )),
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    fn parse(name: &str) -> Result<Self, PipelineError> {
        match name {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(PipelineError::unsupported(
                "prediction_type",
                other,
                "epsilon, v_prediction, sample",
            )),
        }
    }
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    fn parse(name: &str) -> Result<Self, PipelineError> {
        match name {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            other => Err(PipelineError::unsupported(
                "timestep_spacing",
                other,
                "leading, trailing, linspace",
            )),
        }
    }
}

/// Deterministic DDIM (eta = 0), as diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    clip_sample: Option<f64>,
}

impl DdimScheduler {
    /// Builds DDIM from a config, taking DDIM's defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        if config.thresholding == Some(true) {
            return Err(PipelineError::unsupported("thresholding", "true", "false"));
        }
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps == 0 {
            return Err(PipelineError::invalid(
                "num_train_timesteps",
                "must be positive",
            ));
        }
        let betas = match &config.trained_betas {
            Some(betas) if betas.len() == num_train_timesteps => betas.clone(),
            Some(betas) => {
                return Err(PipelineError::invalid(
                    "trained_betas",
                    format!(
                        "has {} values for {num_train_timesteps} training timesteps",
                        betas.len()
                    ),
                ))
            }
            None => beta_schedule(
                config.beta_schedule.as_deref().unwrap_or("linear"),
                config.beta_start.unwrap_or(0.0001),
                config.beta_end.unwrap_or(0.02),
                num_train_timesteps,
            )?,
        };
        let mut alphas_cumprod = cumulative_alphas(&betas);
        if config.rescale_betas_zero_snr == Some(true) {
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod);
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip_sample = config
            .clip_sample
            .unwrap_or(true)
            .then_some(config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            num_train_timesteps,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            prediction_type: PredictionType::parse(
                config.prediction_type.as_deref().unwrap_or("epsilon"),
            )?,
            timestep_spacing: TimestepSpacing::parse(
                config.timestep_spacing.as_deref().unwrap_or("leading"),
            )?,
            steps_offset: config.steps_offset.unwrap_or(0),
            clip_sample,
        })
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn alpha_cumprod_at(&self, timestep: Option<usize>) -> Result<f64, PipelineError> {
        match timestep {
            None => Ok(self.final_alpha_cumprod),
            Some(timestep) => self.alphas_cumprod.get(timestep).copied().ok_or_else(|| {
                PipelineError::invalid(
                    "timestep",
                    format!(
                        "{timestep} is outside the {} training timesteps",
                        self.num_train_timesteps
                    ),
                )
            }),
        }
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > train {
            return Err(PipelineError::invalid(
                "num_inference_steps",
                format!("{num_inference_steps} is not between 1 and {train}"),
            ));
        }
        let steps = num_inference_steps;
        let timesteps: Vec<i64> = match self.timestep_spacing {
            TimestepSpacing::Linspace => {
                let last = (train - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|index| {
                        let position = if steps == 1 {
                            0.0
                        } else if index == steps - 1 {
                            last
                        } else {
                            index as f64 * (last / (steps - 1) as f64)
                        };
                        position.round_ties_even() as i64
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = train / steps;
                (0..steps)
                    .rev()
                    .map(|index| (index * ratio + self.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                (0..steps)
                    .map(|index| (train as f64 - index as f64 * ratio).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        self.timesteps = timesteps
            .into_iter()
            .map(|timestep| {
                usize::try_from(timestep)
                    .ok()
                    .filter(|timestep| *timestep < train)
                    .ok_or_else(|| {
                        PipelineError::invalid(
                            "steps_offset",
                            format!(
                                "timestep {timestep} falls outside the {train} training timesteps"
                            ),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        self.num_inference_steps = steps;
        Ok(())
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: Tensor, _timestep: usize) -> Result<Tensor, PipelineError> {
        Ok(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        if self.num_inference_steps == 0 {
            return Err(PipelineError::invalid(
                "scheduler",
                "set_timesteps must be called before step",
            ));
        }
        let stride = self.num_train_timesteps / self.num_inference_steps;
        let alpha_prod = self.alpha_cumprod_at(Some(timestep))?;
        let alpha_prod_prev = self.alpha_cumprod_at(timestep.checked_sub(stride))?;
        let beta_prod = 1.0 - alpha_prod;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod.sqrt(), beta_prod.sqrt());

        let denoise = || -> candle_core::Result<Tensor> {
            let (predicted_original, predicted_epsilon) = match self.prediction_type {
                PredictionType::Epsilon => (
                    ((sample - (model_output * sqrt_beta)?)? / sqrt_alpha)?,
                    model_output.clone(),
                ),
                PredictionType::Sample => (
                    model_output.clone(),
                    ((sample - (model_output * sqrt_alpha)?)? / sqrt_beta)?,
                ),
                PredictionType::VPrediction => (
                    ((sample * sqrt_alpha)? - (model_output * sqrt_beta)?)?,
                    ((model_output * sqrt_alpha)? + (sample * sqrt_beta)?)?,
                ),
            };
            let predicted_original = match self.clip_sample {
                Some(range) => predicted_original.clamp(-range, range)?,
                None => predicted_original,
            };
            // eta = 0: no noise is added, the direction term takes all of 1 - alpha_prev.
            let direction = (predicted_epsilon * (1.0 - alpha_prod_prev).sqrt())?;
            (predicted_original * alpha_prod_prev.sqrt())? + direction
        };
        denoise().in_component(COMPONENT)
    }
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
