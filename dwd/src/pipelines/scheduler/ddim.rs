//! Deterministic DDIM (eta = 0), as diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::{
    as_model_timesteps, check_step_count, check_step_index, checked_timesteps, Options,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, TrainingSchedule, ZeroSnr,
    ALL_PREDICTIONS, COMPONENT, DEFAULT_BETAS,
};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

/// Deterministic DDIM (eta = 0), as diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    schedule: TrainingSchedule,
    final_alpha_cumprod: f64,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    model_timesteps: Vec<f64>,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    clip_sample: Option<f64>,
}

impl DdimScheduler {
    /// Builds DDIM from a config, taking DDIM's defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("thresholding")?;
        let schedule = TrainingSchedule::new(&options, &DEFAULT_BETAS, ZeroSnr::Rescale)?;
        let final_alpha_cumprod = if options.bool("set_alpha_to_one", true)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip_sample = options
            .bool("clip_sample", true)?
            .then(|| options.f64("clip_sample_range", 1.0))
            .transpose()?;
        Ok(Self {
            schedule,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            model_timesteps: Vec::new(),
            prediction_type: PredictionType::read(&options, ALL_PREDICTIONS)?,
            timestep_spacing: TimestepSpacing::read(&options, "leading")?,
            steps_offset: options.usize("steps_offset", 0)?,
            clip_sample,
        })
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn alpha_cumprod_at(&self, timestep: Option<usize>) -> Result<f64, PipelineError> {
        match timestep {
            None => Ok(self.final_alpha_cumprod),
            Some(timestep) => self.schedule.alpha_cumprod(timestep),
        }
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
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
        self.timesteps = checked_timesteps(timesteps, train)?;
        self.model_timesteps = as_model_timesteps(&self.timesteps);
        self.num_inference_steps = steps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.model_timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        let timestep = self.timesteps[step_index];
        let stride = self.schedule.num_train_timesteps() / self.num_inference_steps;
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

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        self.schedule
            .add_noise(original, noise, self.timesteps[step_index])
    }
}
