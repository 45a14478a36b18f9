//! Ancestral Euler sampling, as diffusers' `EulerAncestralDiscreteScheduler`: each step
//! goes down to a lower sigma deterministically, then adds fresh noise back up to the next
//! sigma, so it draws noise on every step.

use candle_core::Tensor;

use super::euler::{
    add_sigma_noise, predicted_original, scale_by_sigma, sigma_space_init_noise_sigma,
    spaced_float_timesteps,
};
use super::{
    check_step_count, check_step_index, compute, f32_round_trip, interpolate, Options,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, TrainingSchedule, ZeroSnr,
    COMPONENT, DEFAULT_BETAS,
};
use crate::pipelines::noise::{draw_like, NoiseSource};
use crate::pipelines::{InComponent, PipelineError};

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    schedule: TrainingSchedule,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds Euler ancestral from a config, taking its defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        Ok(Self {
            schedule: TrainingSchedule::new(&options, &DEFAULT_BETAS, ZeroSnr::RescaleWithFloor)?,
            prediction_type: PredictionType::read(
                &options,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
            timestep_spacing: TimestepSpacing::read(&options, "linspace")?,
            steps_offset: options.usize("steps_offset", 0)?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let timesteps = spaced_float_timesteps(
            self.timestep_spacing,
            train,
            num_inference_steps,
            self.steps_offset,
        );
        let training_sigmas = self.schedule.sigmas();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|timestep| f32_round_trip(interpolate(&training_sigmas, *timestep)))
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        sigma_space_init_noise_sigma(&self.sigmas, self.timestep_spacing)
    }

    fn scale_model_input(
        &self,
        sample: Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        scale_by_sigma(sample, &self.sigmas, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        let original = predicted_original(self.prediction_type, model_output, sample, sigma_from)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let deterministic = || -> candle_core::Result<Tensor> {
            let derivative = ((sample - original)? / sigma_from)?;
            sample + (derivative * (sigma_down - sigma_from))?
        };
        let stepped = deterministic().in_component(COMPONENT)?;
        let fresh = draw_like(noise, model_output)?;
        compute(|| stepped + (fresh * sigma_up)?)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        add_sigma_noise(original, noise, &self.sigmas, step_index)
    }
}
