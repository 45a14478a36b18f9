//! PNDM with its Runge-Kutta warm-up skipped (`skip_prk_steps`, as Stable Diffusion ships
//! it): pseudo linear multi-step (PLMS) steps, as diffusers' `PNDMScheduler`.
//!
//! The schedule visits the second timestep twice: the first step is an Euler-like step
//! whose result is only used to take the second, averaged step from the same sample.

use candle_core::Tensor;

use super::{
    arange_down_to_zero, as_model_timesteps, check_step_count, check_step_index, checked_timesteps,
    compute, linspace, Options, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainingSchedule, ZeroSnr, COMPONENT, DEFAULT_BETAS,
};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

/// diffusers' `PNDMScheduler` with `skip_prk_steps: true`.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    schedule: TrainingSchedule,
    final_alpha_cumprod: f64,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    model_timesteps: Vec<f64>,
    /// Model outputs of the previous steps, oldest first (at most four are used).
    history: Vec<Tensor>,
    /// Steps taken since `set_timesteps`.
    counter: usize,
    /// The sample the first step started from; the second step restarts from it.
    first_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds PNDM from a config, taking PNDM's defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        if !options.bool("skip_prk_steps", false)? {
            return Err(PipelineError::unsupported(
                "skip_prk_steps",
                "false (PNDM's default)",
                "true, as Stable Diffusion checkpoints ship it",
            ));
        }
        let schedule = TrainingSchedule::new(&options, &DEFAULT_BETAS, ZeroSnr::NotAnOption)?;
        let final_alpha_cumprod = if options.bool("set_alpha_to_one", false)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            schedule,
            final_alpha_cumprod,
            prediction_type: PredictionType::read(
                &options,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
            timestep_spacing: TimestepSpacing::read(&options, "leading")?,
            steps_offset: options.usize("steps_offset", 0)?,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            model_timesteps: Vec::new(),
            history: Vec::new(),
            counter: 0,
            first_sample: None,
        })
    }

    /// Inference timesteps in ascending order, before PLMS repeats one.
    fn ascending_timesteps(&self, steps: usize) -> Vec<i64> {
        let train = self.schedule.num_train_timesteps();
        match self.timestep_spacing {
            TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .map(|position| position.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => (0..steps)
                .map(|index| (index * (train / steps) + self.steps_offset) as i64)
                .collect(),
            TimestepSpacing::Trailing => {
                let mut timesteps: Vec<i64> =
                    arange_down_to_zero(train as f64, train as f64 / steps as f64)
                        .into_iter()
                        .map(|position| position.round_ties_even() as i64 - 1)
                        .collect();
                timesteps.reverse();
                timesteps
            }
        }
    }

    fn alpha_cumprod_at(&self, timestep: i64) -> Result<f64, PipelineError> {
        match usize::try_from(timestep) {
            Ok(timestep) => self.schedule.alpha_cumprod(timestep),
            Err(_) => Ok(self.final_alpha_cumprod),
        }
    }

    /// Formula (9) of the PNDM paper: the sample at `previous` from the one at `timestep`.
    fn previous_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        previous: i64,
        model_output: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        let alpha = self.alpha_cumprod_at(timestep)?;
        let alpha_prev = self.alpha_cumprod_at(previous)?;
        let (beta, beta_prev) = (1.0 - alpha, 1.0 - alpha_prev);
        let epsilon = match self.prediction_type {
            PredictionType::VPrediction => {
                compute(|| (model_output * alpha.sqrt())? + (sample * beta.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha).sqrt();
        let denominator = alpha * beta_prev.sqrt() + (alpha * beta * alpha_prev).sqrt();
        compute(|| (sample * sample_coeff)? - (epsilon * ((alpha_prev - alpha) / denominator))?)
    }
}

/// `sum(weight * tensor) / divisor` over the given terms.
fn combine(terms: &[(f64, &Tensor)], divisor: f64) -> Result<Tensor, PipelineError> {
    let mut total: Option<Tensor> = None;
    for (weight, tensor) in terms {
        let term = (*tensor * (*weight / divisor)).in_component(COMPONENT)?;
        total = Some(match total {
            None => term,
            Some(sum) => (sum + term).in_component(COMPONENT)?,
        });
    }
    total.ok_or_else(|| PipelineError::invalid("scheduler", "no terms to combine"))
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let ascending = checked_timesteps(self.ascending_timesteps(num_inference_steps), train)?;
        // PLMS order: all but the last, the second-to-last again, the last; then reversed.
        let count = ascending.len();
        let mut plms: Vec<usize> = ascending[..count - 1].to_vec();
        if count >= 2 {
            plms.push(ascending[count - 2]);
        }
        plms.push(ascending[count - 1]);
        plms.reverse();
        self.model_timesteps = as_model_timesteps(&plms);
        self.timesteps = plms;
        self.num_inference_steps = num_inference_steps;
        self.history.clear();
        self.counter = 0;
        self.first_sample = None;
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
        let stride = (self.schedule.num_train_timesteps() / self.num_inference_steps) as i64;
        let mut timestep = self.timesteps[step_index] as i64;
        let mut previous = timestep - stride;
        if self.counter == 1 {
            // The repeated timestep: step again from the first sample, from one stride up.
            previous = timestep;
            timestep += stride;
        } else {
            if self.history.len() > 3 {
                self.history.drain(..self.history.len() - 3);
            }
            self.history.push(model_output.clone());
        }

        let history = &self.history;
        let last = |back: usize| &history[history.len() - back];
        let mut start = sample.clone();
        let effective_output = match (history.len(), self.counter) {
            (1, 0) => {
                self.first_sample = Some(sample.clone());
                model_output.clone()
            }
            (1, 1) => {
                if let Some(first) = self.first_sample.take() {
                    start = first;
                }
                combine(&[(1.0, model_output), (1.0, last(1))], 2.0)?
            }
            (2, _) => combine(&[(3.0, last(1)), (-1.0, last(2))], 2.0)?,
            (3, _) => combine(&[(23.0, last(1)), (-16.0, last(2)), (5.0, last(3))], 12.0)?,
            _ => combine(
                &[
                    (55.0, last(1)),
                    (-59.0, last(2)),
                    (37.0, last(3)),
                    (-9.0, last(4)),
                ],
                24.0,
            )?,
        };
        let previous_sample =
            self.previous_sample(&start, timestep, previous, &effective_output)?;
        self.counter += 1;
        Ok(previous_sample)
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
