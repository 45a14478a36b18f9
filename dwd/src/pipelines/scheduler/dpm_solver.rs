//! DPM-Solver++ multistep (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type: dpmsolver++`: the model output is turned into a denoised-sample
//! prediction and extrapolated from up to three previous steps in log-SNR time.

use candle_core::Tensor;

use super::{
    alpha_sigma, check_step_count, check_step_index, check_timesteps_in_range, compute,
    f32_round_trip, interpolate, karras_sigmas, multistep_timesteps, sigma_to_timestep, Options,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, TrainingSchedule, ZeroSnr,
    ALL_PREDICTIONS, COMPONENT, DEFAULT_BETAS,
};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

/// Which second-order formula is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    schedule: TrainingSchedule,
    solver_order: usize,
    prediction_type: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    use_karras_sigmas: bool,
    final_sigma_is_min: bool,
    lambda_min_clipped: f64,
    /// Karras timesteps are rounded to integers except with the cosine beta schedule.
    round_karras_timesteps: bool,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Denoised predictions of the last `solver_order` steps, newest last.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds DPM-Solver++ from a config, taking its defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("thresholding")?;
        options.require_false("use_exponential_sigmas")?;
        options.require_false("use_beta_sigmas")?;
        options.require_false("use_lu_lambdas")?;
        options.require_false("use_flow_sigmas")?;
        options.require_false("use_dynamic_shifting")?;
        options.choice("algorithm_type", "dpmsolver++", &["dpmsolver++"])?;
        if let Some(variance) = options.optional_string("variance_type")? {
            return Err(PipelineError::unsupported(
                "variance_type",
                variance,
                "null",
            ));
        }
        // diffusers maps the solver types of its other multistep schedulers to midpoint.
        let solver_type = match options.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )? {
            "heun" => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        let solver_order = options.usize("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(PipelineError::unsupported(
                "solver_order",
                solver_order.to_string(),
                "1, 2, 3",
            ));
        }
        let final_sigma_is_min =
            options.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        Ok(Self {
            schedule: TrainingSchedule::new(&options, &DEFAULT_BETAS, ZeroSnr::RescaleWithFloor)?,
            solver_order,
            prediction_type: PredictionType::read(&options, ALL_PREDICTIONS)?,
            solver_type,
            lower_order_final: options.bool("lower_order_final", true)?,
            euler_at_final: options.bool("euler_at_final", false)?,
            use_karras_sigmas: options.bool("use_karras_sigmas", false)?,
            final_sigma_is_min,
            lambda_min_clipped: options.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
            round_karras_timesteps: options.optional_string("beta_schedule")?
                != Some("squaredcos_cap_v2"),
            timestep_spacing: TimestepSpacing::read(&options, "linspace")?,
            steps_offset: options.usize("steps_offset", 0)?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// The sigmas, one per timestep and a final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The last training timestep (exclusive) not clipped by `lambda_min_clipped`.
    fn last_timestep(&self) -> usize {
        let train = self.schedule.num_train_timesteps();
        // log-SNR decreases with the timestep; count those below the clipping value.
        let clipped = self
            .schedule
            .alphas_cumprod
            .iter()
            .filter(|alpha| {
                let alpha = **alpha as f32;
                let log_snr = alpha.sqrt().ln() - (1.0 - alpha).sqrt().ln();
                f64::from(log_snr) < self.lambda_min_clipped
            })
            .count();
        train - clipped
    }

    /// The denoised-sample prediction at step `step_index`.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        let convert = || -> candle_core::Result<Tensor> {
            match self.prediction_type {
                PredictionType::Epsilon => (sample - (model_output * sigma_t)?)? / alpha_t,
                PredictionType::Sample => Ok(model_output.clone()),
                PredictionType::VPrediction => (sample * alpha_t)? - (model_output * sigma_t)?,
            }
        };
        convert().in_component(COMPONENT)
    }

    /// `(alpha, sigma, lambda)` at `sigmas[index]`.
    fn point(&self, index: usize) -> (f64, f64, f64) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    fn first_order_update(
        &self,
        denoised: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t, lambda_t) = self.point(step_index + 1);
        let (_, sigma_s, lambda_s) = self.point(step_index);
        let h = lambda_t - lambda_s;
        compute(|| (sample * (sigma_t / sigma_s))? - (denoised * (alpha_t * ((-h).exp() - 1.0)))?)
    }

    fn second_order_update(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t, lambda_t) = self.point(step_index + 1);
        let (_, sigma_s0, lambda_s0) = self.point(step_index);
        let (_, _, lambda_s1) = self.point(step_index - 1);
        let count = self.model_outputs.len();
        let (m0, m1) = (
            &self.model_outputs[count - 1],
            &self.model_outputs[count - 2],
        );
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let update = || -> candle_core::Result<Tensor> {
            let d1 = ((m0 - m1)? * (1.0 / r0))?;
            let exp_term = (-h).exp() - 1.0;
            let base = ((sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * exp_term))?)?;
            match self.solver_type {
                SolverType::Midpoint => base - (d1 * (0.5 * alpha_t * exp_term))?,
                SolverType::Heun => base + (d1 * (alpha_t * (exp_term / h + 1.0)))?,
            }
        };
        update().in_component(COMPONENT)
    }

    fn third_order_update(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t, lambda_t) = self.point(step_index + 1);
        let (_, sigma_s0, lambda_s0) = self.point(step_index);
        let (_, _, lambda_s1) = self.point(step_index - 1);
        let (_, _, lambda_s2) = self.point(step_index - 2);
        let count = self.model_outputs.len();
        let (m0, m1, m2) = (
            &self.model_outputs[count - 1],
            &self.model_outputs[count - 2],
            &self.model_outputs[count - 3],
        );
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let update = || -> candle_core::Result<Tensor> {
            let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
            let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
            let d1 = (&d1_0 + ((&d1_0 - &d1_1)? * (r0 / (r0 + r1)))?)?;
            let d2 = ((d1_0 - d1_1)? * (1.0 / (r0 + r1)))?;
            let exp_term = (-h).exp() - 1.0;
            (((sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * exp_term))?)?
                + (d1 * (alpha_t * (exp_term / h + 1.0)))?)?
                - (d2 * (alpha_t * ((exp_term + h) / (h * h) - 0.5)))?
        };
        update().in_component(COMPONENT)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let steps = num_inference_steps;
        let last_timestep = self.last_timestep();
        let mut timesteps = multistep_timesteps(
            self.timestep_spacing,
            last_timestep,
            train,
            steps,
            self.steps_offset,
        );
        let training_sigmas = self.schedule.sigmas();
        let mut sigmas: Vec<f64> = if self.use_karras_sigmas {
            let log_sigmas = self.schedule.log_sigmas();
            let sigma_min = training_sigmas[0];
            let sigma_max = training_sigmas[train - 1];
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            let round = self.round_karras_timesteps;
            timesteps = sigmas
                .iter()
                .map(|sigma| {
                    let timestep = sigma_to_timestep(*sigma, &log_sigmas);
                    if round {
                        timestep.round_ties_even()
                    } else {
                        timestep
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|timestep| interpolate(&training_sigmas, *timestep))
                .collect()
        };
        sigmas.push(if self.final_sigma_is_min {
            training_sigmas[0]
        } else {
            0.0
        });
        // diffusers stores these timesteps as int64 (truncating any fraction).
        self.timesteps = timesteps.into_iter().map(f64::trunc).collect();
        check_timesteps_in_range(&self.timesteps, train)?;
        self.sigmas = sigmas.into_iter().map(f32_round_trip).collect();
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let steps = self.timesteps.len();
        check_step_index(step_index, steps)?;
        let short_schedule = self.lower_order_final && steps < 15;
        let lower_order_final = step_index == steps - 1
            && (self.euler_at_final || short_schedule || !self.final_sigma_is_min);
        let lower_order_second = step_index + 2 == steps && short_schedule;

        let denoised = self.convert_model_output(model_output, sample, step_index)?;
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(denoised.clone());

        let previous = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&denoised, sample, step_index)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(sample, step_index)?
        } else {
            self.third_order_update(sample, step_index)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(previous)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        check_step_index(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        super::weighted_sum(original, alpha_t, noise, sigma_t)
    }
}
