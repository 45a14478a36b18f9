//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`: a multistep
//! predictor (UniP) whose result is corrected (UniC) with the next model output before the
//! next prediction, in log-SNR time with the B(h) = e^h - 1 (`bh2`) or B(h) = h (`bh1`)
//! variants.

use candle_core::Tensor;

use super::{
    alpha_sigma, check_step_count, check_step_index, check_timesteps_in_range, compute,
    f32_round_trip, interpolate, karras_sigmas, multistep_timesteps, sigma_to_timestep, Options,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, TrainingSchedule, ZeroSnr,
    ALL_PREDICTIONS, COMPONENT, DEFAULT_BETAS,
};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

/// diffusers' `UniPCMultistepScheduler`.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    schedule: TrainingSchedule,
    solver_order: usize,
    prediction_type: PredictionType,
    predict_x0: bool,
    /// `bh2` when true, `bh1` otherwise.
    exponential_b: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_is_min: bool,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Converted model outputs of the last `solver_order` steps, newest last.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    /// The sample the last prediction started from, for the next correction.
    last_sample: Option<Tensor>,
    /// The order the last prediction used.
    this_order: usize,
}

impl UniPcMultistepScheduler {
    /// Builds UniPC from a config, taking its defaults for missing keys.
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("thresholding")?;
        options.require_false("use_exponential_sigmas")?;
        options.require_false("use_beta_sigmas")?;
        options.require_false("use_flow_sigmas")?;
        options.require_false("use_dynamic_shifting")?;
        if options.has("solver_p") {
            return Err(PipelineError::unsupported(
                "solver_p",
                "a scheduler",
                "null (UniPC's own predictor)",
            ));
        }
        // diffusers maps the solver types of its other multistep schedulers to bh2.
        let exponential_b = options.choice(
            "solver_type",
            "bh2",
            &["bh1", "bh2", "midpoint", "heun", "logrho"],
        )? != "bh1";
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
            predict_x0: options.bool("predict_x0", true)?,
            exponential_b,
            lower_order_final: options.bool("lower_order_final", true)?,
            disable_corrector: options.usize_list("disable_corrector")?,
            use_karras_sigmas: options.bool("use_karras_sigmas", false)?,
            sigma_min: options.optional_f64("sigma_min")?,
            sigma_max: options.optional_f64("sigma_max")?,
            final_sigma_is_min,
            timestep_spacing: TimestepSpacing::read(&options, "linspace")?,
            steps_offset: options.usize("steps_offset", 0)?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        })
    }

    /// The sigmas, one per timestep and a final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `(alpha, sigma, lambda)` at `sigmas[index]`.
    fn point(&self, index: usize) -> (f64, f64, f64) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// The data prediction (or noise prediction without `predict_x0`) at `step_index`.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        let convert = || -> candle_core::Result<Tensor> {
            match (self.predict_x0, self.prediction_type) {
                (true, PredictionType::Epsilon) => (sample - (model_output * sigma_t)?)? / alpha_t,
                (true, PredictionType::Sample) => Ok(model_output.clone()),
                (true, PredictionType::VPrediction) => {
                    (sample * alpha_t)? - (model_output * sigma_t)?
                }
                (false, PredictionType::Epsilon) => Ok(model_output.clone()),
                (false, PredictionType::Sample) => (sample - (model_output * alpha_t)?)? / sigma_t,
                (false, PredictionType::VPrediction) => {
                    (model_output * alpha_t)? + (sample * sigma_t)?
                }
            }
        };
        convert().in_component(COMPONENT)
    }

    /// The coefficients both updates share: `hh` (signed step), `h * phi_1(hh)`, `B(h)`,
    /// and the right-hand side `b` of the order conditions.
    fn coefficients(&self, h: f64, order: usize) -> (f64, f64, f64, Vec<f64>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.exponential_b { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut rhs = Vec::with_capacity(order);
        for index in 1..=order {
            rhs.push(h_phi_k * factorial / b_h);
            factorial *= (index + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (hh, h_phi_1, b_h, rhs)
    }

    /// `x_t_` of both updates: the first-order step from `x` with `m0`.
    fn first_order_part(
        &self,
        x: &Tensor,
        m0: &Tensor,
        target: (f64, f64),
        source: (f64, f64),
        h_phi_1: f64,
    ) -> candle_core::Result<Tensor> {
        let ((alpha_t, sigma_t), (alpha_s0, sigma_s0)) = (target, source);
        if self.predict_x0 {
            (x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?
        } else {
            (x * (alpha_t / alpha_s0))? - (m0 * (sigma_t * h_phi_1))?
        }
    }

    /// The scale of the higher-order terms: `alpha_t * B(h)` or `sigma_t * B(h)`.
    fn residual_scale(&self, alpha_t: f64, sigma_t: f64, b_h: f64) -> f64 {
        if self.predict_x0 {
            alpha_t * b_h
        } else {
            sigma_t * b_h
        }
    }

    /// UniP: the sample at step `step_index + 1` from `sample`.
    fn predict(
        &self,
        sample: &Tensor,
        step_index: usize,
        order: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t, lambda_t) = self.point(step_index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(step_index);
        let h = lambda_t - lambda_s0;
        let count = self.model_outputs.len();
        let m0 = &self.model_outputs[count - 1];
        let mut ratios = Vec::new();
        let mut differences = Vec::new();
        for back in 1..order {
            let (_, _, lambda_si) = self.point(step_index - back);
            let ratio = (lambda_si - lambda_s0) / h;
            let previous = &self.model_outputs[count - 1 - back];
            differences.push(compute(|| (previous - m0)? / ratio)?);
            ratios.push(ratio);
        }
        ratios.push(1.0);
        let (_, h_phi_1, b_h, rhs) = self.coefficients(h, order);
        let base = self
            .first_order_part(
                sample,
                m0,
                (alpha_t, sigma_t),
                (alpha_s0, sigma_s0),
                h_phi_1,
            )
            .in_component(COMPONENT)?;
        if differences.is_empty() {
            return Ok(base);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let size = order - 1;
            solve(order_matrix(&ratios, order, size), rhs[..size].to_vec())?
        };
        let residual = weighted(&rhos, &differences)?;
        let scale = self.residual_scale(alpha_t, sigma_t, b_h);
        compute(|| base - (residual * scale)?)
    }

    /// UniC: corrects `this_sample` (at `step_index`) with its converted model output.
    fn correct(
        &self,
        this_output: &Tensor,
        last_sample: &Tensor,
        step_index: usize,
        order: usize,
    ) -> Result<Tensor, PipelineError> {
        let (alpha_t, sigma_t, lambda_t) = self.point(step_index);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(step_index - 1);
        let h = lambda_t - lambda_s0;
        let count = self.model_outputs.len();
        let m0 = &self.model_outputs[count - 1];
        let mut ratios = Vec::new();
        let mut differences = Vec::new();
        for back in 1..order {
            let (_, _, lambda_si) = self.point(step_index - (back + 1));
            let ratio = (lambda_si - lambda_s0) / h;
            let previous = &self.model_outputs[count - 1 - back];
            differences.push(compute(|| (previous - m0)? / ratio)?);
            ratios.push(ratio);
        }
        ratios.push(1.0);
        let (_, h_phi_1, b_h, rhs) = self.coefficients(h, order);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(order_matrix(&ratios, order, order), rhs)?
        };
        let base = self
            .first_order_part(
                last_sample,
                m0,
                (alpha_t, sigma_t),
                (alpha_s0, sigma_s0),
                h_phi_1,
            )
            .in_component(COMPONENT)?;
        let last_rho = rhos[rhos.len() - 1];
        let mut correction = compute(|| (this_output - m0)? * last_rho)?;
        if !differences.is_empty() {
            let residual = weighted(&rhos[..rhos.len() - 1], &differences)?;
            correction = (residual + correction).in_component(COMPONENT)?;
        }
        let scale = self.residual_scale(alpha_t, sigma_t, b_h);
        compute(|| base - (correction * scale)?)
    }
}

/// The order-condition matrix: row `i` holds `ratio^i` for each ratio (first `size` rows
/// and columns).
fn order_matrix(ratios: &[f64], order: usize, size: usize) -> Vec<Vec<f64>> {
    (0..order.min(size))
        .map(|power| {
            ratios[..size]
                .iter()
                .map(|ratio| ratio.powi(power as i32))
                .collect()
        })
        .collect()
}

/// Solves a small dense linear system by Gaussian elimination with partial pivoting.
fn solve(mut matrix: Vec<Vec<f64>>, mut rhs: Vec<f64>) -> Result<Vec<f64>, PipelineError> {
    let size = rhs.len();
    for column in 0..size {
        let pivot = (column..size)
            .max_by(|a, b| {
                matrix[*a][column]
                    .abs()
                    .total_cmp(&matrix[*b][column].abs())
            })
            .unwrap_or(column);
        if matrix[pivot][column] == 0.0 {
            return Err(PipelineError::invalid(
                "scheduler",
                "UniPC's order conditions are singular for these sigmas",
            ));
        }
        matrix.swap(column, pivot);
        rhs.swap(column, pivot);
        let pivot_row = matrix[column].clone();
        for row in column + 1..size {
            let factor = matrix[row][column] / pivot_row[column];
            for (entry, pivot_entry) in matrix[row].iter_mut().zip(&pivot_row).skip(column) {
                *entry -= factor * pivot_entry;
            }
            rhs[row] -= factor * rhs[column];
        }
    }
    let mut solution = vec![0.0; size];
    for row in (0..size).rev() {
        let known: f64 = (row + 1..size).map(|k| matrix[row][k] * solution[k]).sum();
        solution[row] = (rhs[row] - known) / matrix[row][row];
    }
    Ok(solution)
}

/// `sum(weights[k] * tensors[k])`.
fn weighted(weights: &[f64], tensors: &[Tensor]) -> Result<Tensor, PipelineError> {
    let mut total: Option<Tensor> = None;
    for (weight, tensor) in weights.iter().zip(tensors) {
        let term = (tensor * *weight).in_component(COMPONENT)?;
        total = Some(match total {
            None => term,
            Some(sum) => (sum + term).in_component(COMPONENT)?,
        });
    }
    total.ok_or_else(|| PipelineError::invalid("scheduler", "no terms to combine"))
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), PipelineError> {
        let train = self.schedule.num_train_timesteps();
        check_step_count(num_inference_steps, train)?;
        let steps = num_inference_steps;
        let mut timesteps = multistep_timesteps(
            self.timestep_spacing,
            train,
            train,
            steps,
            self.steps_offset,
        );
        let training_sigmas = self.schedule.sigmas();
        let mut sigmas: Vec<f64> = if self.use_karras_sigmas {
            let log_sigmas = self.schedule.log_sigmas();
            let sigma_min = self.sigma_min.unwrap_or(training_sigmas[0]);
            let sigma_max = self.sigma_max.unwrap_or(training_sigmas[train - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|sigma| sigma_to_timestep(*sigma, &log_sigmas).round_ties_even())
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|timestep| interpolate(&training_sigmas, *timestep))
                .collect()
        };
        let final_sigma = match (self.final_sigma_is_min, self.use_karras_sigmas) {
            (false, _) => 0.0,
            (true, true) => sigmas.last().copied().unwrap_or(0.0),
            (true, false) => training_sigmas[0],
        };
        sigmas.push(final_sigma);
        check_timesteps_in_range(&timesteps, train)?;
        self.timesteps = timesteps;
        self.sigmas = sigmas.into_iter().map(f32_round_trip).collect();
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 1;
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
        let converted = self.convert_model_output(model_output, sample, step_index)?;
        let corrected = match &self.last_sample {
            Some(last_sample)
                if step_index > 0 && !self.disable_corrector.contains(&(step_index - 1)) =>
            {
                self.correct(&converted, last_sample, step_index, self.this_order)?
            }
            _ => sample.clone(),
        };
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(converted);
        let order = if self.lower_order_final {
            self.solver_order.min(steps - step_index)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let predicted = self.predict(&corrected, step_index, self.this_order)?;
        self.last_sample = Some(corrected);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(predicted)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_finds_the_solution_with_pivoting() {
        let matrix = vec![
            vec![0.0, 1.0, 1.0],
            vec![2.0, 1.0, 0.0],
            vec![1.0, 3.0, 2.0],
        ];
        // x = (1, 2, 3)
        let solution = solve(matrix, vec![5.0, 4.0, 13.0]).unwrap();
        for (got, want) in solution.iter().zip([1.0, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-12, "{solution:?}");
        }
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }

    #[test]
    fn order_matrix_holds_powers_of_the_ratios() {
        let ratios = [0.5, 2.0, 1.0];
        assert_eq!(
            order_matrix(&ratios, 3, 3),
            [
                vec![1.0, 1.0, 1.0],
                vec![0.5, 2.0, 1.0],
                vec![0.25, 4.0, 1.0]
            ]
        );
        assert_eq!(
            order_matrix(&ratios, 3, 2),
            [vec![1.0, 1.0], vec![0.5, 2.0]]
        );
    }
}
