//! Latent consistency model sampling, as diffusers' `LCMScheduler`: each step jumps to a
//! denoised estimate through the consistency boundary condition, then (except on the last
//! step) re-noises it to the next timestep with fresh noise.

use candle_core::Tensor;

use super::{
    as_model_timesteps, check_step_count, check_step_index, compute, linspace, BetaDefaults,
    Options, PredictionType, Scheduler, SchedulerConfig, TrainingSchedule, ZeroSnr,
    ALL_PREDICTIONS, COMPONENT,
};
use crate::pipelines::noise::{draw_like, NoiseSource};
use crate::pipelines::{InComponent, PipelineError};

/// LCM's own beta defaults (those of Stable Diffusion).
const LCM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
};

/// `sigma_data` of the consistency model boundary condition.
const SIGMA_DATA: f64 = 0.5;

/// diffusers' `LCMScheduler`.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    schedule: TrainingSchedule,
    original_inference_steps: usize,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    timestep_scaling: f64,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    model_timesteps: Vec<f64>,
}

impl LcmScheduler {
    /// Builds LCM from a config, taking LCM's defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("thresholding")?;
        let schedule = TrainingSchedule::new(&options, &LCM_BETAS, ZeroSnr::Rescale)?;
        // `set_alpha_to_one` only matters for a timestep below 0, which LCM never steps to.
        let original_inference_steps = options.usize("original_inference_steps", 50)?;
        if original_inference_steps == 0
            || original_inference_steps > schedule.num_train_timesteps()
        {
            return Err(PipelineError::invalid(
                "original_inference_steps",
                format!(
                    "{original_inference_steps} is not between 1 and the {} training timesteps",
                    schedule.num_train_timesteps()
                ),
            ));
        }
        let clip_sample = options
            .bool("clip_sample", false)?
            .then(|| options.f64("clip_sample_range", 1.0))
            .transpose()?;
        Ok(Self {
            schedule,
            original_inference_steps,
            prediction_type: PredictionType::read(&options, ALL_PREDICTIONS)?,
            clip_sample,
            timestep_scaling: options.f64("timestep_scaling", 10.0)?,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            model_timesteps: Vec::new(),
        })
    }

    /// `(c_skip, c_out)` of the boundary condition at `timestep`.
    fn boundary_scalings(&self, timestep: usize) -> (f64, f64) {
        let scaled = timestep as f64 * self.timestep_scaling;
        let data_variance = SIGMA_DATA * SIGMA_DATA;
        let c_skip = data_variance / (scaled * scaled + data_variance);
        let c_out = scaled / (scaled * scaled + data_variance).sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let original = self.original_inference_steps;
        if num_inference_steps > original {
            return Err(PipelineError::invalid(
                "num_inference_steps",
                format!(
                    "{num_inference_steps} exceeds LCM's original_inference_steps ({original})"
                ),
            ));
        }
        // The distillation schedule: every k-th training timestep, largest first.
        let stride = train / original;
        let origin: Vec<usize> = (1..=original)
            .rev()
            .map(|index| index * stride - 1)
            .collect();
        self.timesteps = linspace(0.0, origin.len() as f64, num_inference_steps + 1)
            .into_iter()
            .take(num_inference_steps)
            .map(|position| origin[position.floor() as usize])
            .collect();
        self.model_timesteps = as_model_timesteps(&self.timesteps);
        self.num_inference_steps = num_inference_steps;
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        let timestep = self.timesteps[step_index];
        let previous = self
            .timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(timestep);
        let alpha = self.schedule.alpha_cumprod(timestep)?;
        let alpha_prev = self.schedule.alpha_cumprod(previous)?;
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let denoise = || -> candle_core::Result<Tensor> {
            let original = match self.prediction_type {
                PredictionType::Epsilon => ((sample - (model_output * sqrt_beta)?)? / sqrt_alpha)?,
                PredictionType::Sample => model_output.clone(),
                PredictionType::VPrediction => {
                    ((sample * sqrt_alpha)? - (model_output * sqrt_beta)?)?
                }
            };
            let original = match self.clip_sample {
                Some(range) => original.clamp(-range, range)?,
                None => original,
            };
            (original * c_out)? + (sample * c_skip)?
        };
        let denoised = denoise().in_component(COMPONENT)?;
        if step_index + 1 == self.num_inference_steps {
            return Ok(denoised);
        }
        let fresh = draw_like(noise, model_output)?;
        compute(|| (denoised * alpha_prev.sqrt())? + (fresh * (1.0 - alpha_prev).sqrt())?)
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
