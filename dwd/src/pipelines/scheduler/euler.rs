//! Euler's method on the probability-flow ODE in sigma space, as diffusers'
//! `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).

use candle_core::Tensor;

use super::{
    arange_down_to_zero, check_step_count, check_step_index, compute, f32_round_trip, interpolate,
    karras_sigmas, linspace, sigma_to_timestep, Options, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing, TrainingSchedule, ZeroSnr, ALL_PREDICTIONS, COMPONENT,
    DEFAULT_BETAS,
};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

/// How the sigmas between training timesteps are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interpolation {
    /// Linear in sigma between neighbouring training timesteps.
    Linear,
    /// Evenly spaced in log-sigma over the whole training range.
    LogLinear,
}

/// diffusers' `EulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    schedule: TrainingSchedule,
    prediction_type: PredictionType,
    interpolation: Interpolation,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    final_sigma_is_min: bool,
    timesteps: Vec<f64>,
    /// One per timestep plus the final sigma.
    sigmas: Vec<f64>,
}

impl EulerDiscreteScheduler {
    /// Builds Euler from a config, taking Euler's defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("use_exponential_sigmas")?;
        options.require_false("use_beta_sigmas")?;
        options.choice("timestep_type", "discrete", &["discrete"])?;
        let interpolation =
            match options.choice("interpolation_type", "linear", &["linear", "log_linear"])? {
                "linear" => Interpolation::Linear,
                _ => Interpolation::LogLinear,
            };
        let final_sigma_is_min =
            options.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        Ok(Self {
            schedule: TrainingSchedule::new(&options, &DEFAULT_BETAS, ZeroSnr::RescaleWithFloor)?,
            prediction_type: PredictionType::read(&options, ALL_PREDICTIONS)?,
            interpolation,
            use_karras_sigmas: options.bool("use_karras_sigmas", false)?,
            sigma_min: options.optional_f64("sigma_min")?,
            sigma_max: options.optional_f64("sigma_max")?,
            timestep_spacing: TimestepSpacing::read(&options, "linspace")?,
            steps_offset: options.usize("steps_offset", 0)?,
            final_sigma_is_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// The sigmas, one per timestep and a final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// Timesteps of the Euler family as float32 values, largest first.
pub(super) fn spaced_float_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let train = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f32_round_trip)
            .collect(),
        TimestepSpacing::Leading => (0..steps)
            .rev()
            .map(|index| f32_round_trip((index * (train / steps)) as f64) + steps_offset as f64)
            .map(f32_round_trip)
            .collect(),
        TimestepSpacing::Trailing => arange_down_to_zero(train as f64, train as f64 / steps as f64)
            .into_iter()
            .map(|position| f32_round_trip(position.round_ties_even()) - 1.0)
            .map(f32_round_trip)
            .collect(),
    }
}

/// diffusers' `init_noise_sigma` for the sigma-space schedulers.
pub(super) fn sigma_space_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

/// `sample / sqrt(sigma^2 + 1)`.
pub(super) fn scale_by_sigma(
    sample: Tensor,
    sigmas: &[f64],
    step_index: usize,
) -> Result<Tensor, PipelineError> {
    check_step_index(step_index, sigmas.len().saturating_sub(1))?;
    let sigma = sigmas[step_index];
    (sample / (sigma * sigma + 1.0).sqrt()).in_component(COMPONENT)
}

/// The denoised sample the model output implies at noise level `sigma`.
pub(super) fn predicted_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor, PipelineError> {
    let predict = || -> candle_core::Result<Tensor> {
        match prediction_type {
            PredictionType::Epsilon => sample - (model_output * sigma)?,
            PredictionType::VPrediction => {
                let variance = sigma * sigma + 1.0;
                (model_output * (-sigma / variance.sqrt()))? + (sample / variance)?
            }
            PredictionType::Sample => Ok(model_output.clone()),
        }
    };
    predict().in_component(COMPONENT)
}

/// `original + noise * sigma`.
pub(super) fn add_sigma_noise(
    original: &Tensor,
    noise: &Tensor,
    sigmas: &[f64],
    step_index: usize,
) -> Result<Tensor, PipelineError> {
    check_step_index(step_index, sigmas.len().saturating_sub(1))?;
    compute(|| original + (noise * sigmas[step_index])?)
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let mut timesteps = spaced_float_timesteps(
            self.timestep_spacing,
            train,
            num_inference_steps,
            self.steps_offset,
        );
        let training_sigmas = self.schedule.sigmas();
        let mut sigmas: Vec<f64> = match self.interpolation {
            Interpolation::Linear => timesteps
                .iter()
                .map(|timestep| interpolate(&training_sigmas, *timestep))
                .collect(),
            Interpolation::LogLinear => {
                let (first, last) = (training_sigmas[0], training_sigmas[train - 1]);
                linspace(
                    f32_round_trip(last.ln()),
                    f32_round_trip(first.ln()),
                    num_inference_steps + 1,
                )
                .into_iter()
                .map(|log_sigma| f32_round_trip(f32_round_trip(log_sigma).exp()))
                .collect()
            }
        };
        if self.use_karras_sigmas {
            let log_sigmas = self.schedule.log_sigmas();
            let sigma_min = self
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = self
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|sigma| f32_round_trip(sigma_to_timestep(*sigma, &log_sigmas)))
                .collect();
        }
        let final_sigma = if self.final_sigma_is_min {
            training_sigmas[0]
        } else {
            0.0
        };
        sigmas.push(final_sigma);
        self.sigmas = sigmas.into_iter().map(f32_round_trip).collect();
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let original = predicted_original(self.prediction_type, model_output, sample, sigma)?;
        let step = || -> candle_core::Result<Tensor> {
            let derivative = ((sample - original)? / sigma)?;
            let dt = self.sigmas[step_index + 1] - sigma;
            sample + (derivative * dt)?
        };
        step().in_component(COMPONENT)
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
