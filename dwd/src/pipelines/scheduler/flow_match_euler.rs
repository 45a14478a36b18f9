//! diffusers' `FlowMatchEulerDiscreteScheduler`, the rectified-flow sampler of FLUX.1 and
//! SD 3: the model predicts a velocity, and each step moves the sample along it from one
//! noise level (sigma) to the next, `x + (sigma_next - sigma) * v`.
//!
//! The schedule is what the pipeline asks for: FLUX passes its own sigmas
//! (`linspace(1, 1/n, n)`) and `mu` from the image's sequence length, which the config's
//! `use_dynamic_shifting` applies as an exponential (or linear) time shift; SD 3 passes
//! neither and gets a static `shift` of the training sigmas. Every array is computed in the
//! precision diffusers computes it in: sigmas given by the pipeline are float32 (numpy
//! `astype(np.float32)`, and numpy keeps Python scalars from widening them); sigmas this
//! scheduler makes are float64 until the final float32 tensor. That is what makes the
//! schedules match diffusers' to the last digit.
//!
//! Not built: `invert_sigmas` and `use_beta_sigmas` (beta needs scipy's inverse beta CDF);
//! each is refused by name.

use candle_core::Tensor;

use super::{linspace, Options, SchedulerConfig};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::{InComponent, PipelineError};

const COMPONENT: &str = "scheduler";

/// How `mu` shifts the sigmas under dynamic shifting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeShift {
    Exponential,
    Linear,
}

/// A spacing that replaces the shifted sigmas (with the same end points).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Shifted,
    Karras,
    Exponential,
}

/// What one run asks of the schedule.
#[derive(Debug, Clone, Default)]
pub struct FlowSchedule {
    pub num_inference_steps: usize,
    /// The pipeline's own sigmas (FLUX's `linspace(1, 1/n, n)`, or a workflow's `sigmas`).
    pub sigmas: Option<Vec<f64>>,
    /// The resolution-dependent shift, required with `use_dynamic_shifting`.
    pub mu: Option<f64>,
}

/// The scheduler, from a checkpoint's config.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    num_train_timesteps: usize,
    shift: f64,
    use_dynamic_shifting: bool,
    time_shift: TimeShift,
    shift_terminal: Option<f64>,
    spacing: Spacing,
    stochastic_sampling: bool,
    /// The first and last training sigmas (after the static shift), as Python floats of
    /// float32 values.
    sigma_max: f64,
    sigma_min: f64,
    timesteps: Vec<f64>,
    /// One more than the timesteps: the last is 0.
    sigmas: Vec<f64>,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self, PipelineError> {
        let options = Options::new(config)?;
        options.require_false("invert_sigmas")?;
        options.require_false("use_beta_sigmas")?;
        let spacing = match (
            options.bool("use_karras_sigmas", false)?,
            options.bool("use_exponential_sigmas", false)?,
        ) {
            (false, false) => Spacing::Shifted,
            (true, false) => Spacing::Karras,
            (false, true) => Spacing::Exponential,
            (true, true) => {
                return Err(PipelineError::unsupported(
                    "use_karras_sigmas",
                    "true together with use_exponential_sigmas",
                    "at most one of use_karras_sigmas, use_exponential_sigmas",
                ))
            }
        };
        let time_shift =
            match options.choice("time_shift_type", "exponential", &["exponential", "linear"])? {
                "linear" => TimeShift::Linear,
                _ => TimeShift::Exponential,
            };
        let num_train_timesteps = options.usize("num_train_timesteps", 1000)?;
        if num_train_timesteps == 0 {
            return Err(PipelineError::unsupported(
                "num_train_timesteps",
                "0",
                "a positive number",
            ));
        }
        let shift = options.f64("shift", 1.0)?;
        let use_dynamic_shifting = options.bool("use_dynamic_shifting", false)?;
        let (sigma_max, sigma_min) =
            training_sigma_range(num_train_timesteps, shift, use_dynamic_shifting);
        Ok(Self {
            num_train_timesteps,
            shift,
            use_dynamic_shifting,
            time_shift,
            shift_terminal: options
                .optional_f64("shift_terminal")?
                .filter(|t| *t != 0.0),
            spacing,
            stochastic_sampling: options.bool("stochastic_sampling", false)?,
            sigma_max,
            sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// Whether the schedule needs `mu` (FLUX's config sets this).
    pub fn uses_dynamic_shifting(&self) -> bool {
        self.use_dynamic_shifting
    }

    /// Sets the schedule for one run, as diffusers' `set_timesteps(n, sigmas=, mu=)`.
    pub fn set_timesteps(&mut self, schedule: &FlowSchedule) -> Result<(), PipelineError> {
        let steps = schedule.num_inference_steps;
        if steps == 0 {
            return Err(PipelineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let sigmas = match &schedule.sigmas {
            Some(given) if given.len() != steps => {
                return Err(PipelineError::invalid(
                    "sigmas",
                    format!(
                        "has {} values for {steps} steps; give one per step",
                        given.len()
                    ),
                ))
            }
            // numpy: np.array(sigmas).astype(np.float32), then float32 arithmetic.
            Some(given) => {
                let given: Vec<f32> = given.iter().map(|s| *s as f32).collect();
                self.shaped(&given, schedule.mu)?
                    .into_iter()
                    .map(f64::from)
                    .collect()
            }
            None => {
                let train = self.num_train_timesteps as f64;
                let timesteps = linspace(self.sigma_max * train, self.sigma_min * train, steps);
                let sigmas: Vec<f64> = timesteps.iter().map(|t| t / train).collect();
                self.shaped(&sigmas, schedule.mu)?
            }
        };
        let sigmas = self.spaced(sigmas, steps);
        // torch.from_numpy(sigmas).to(float32); timesteps = sigmas * N in float32.
        let sigmas: Vec<f32> = sigmas.iter().map(|s| *s as f32).collect();
        let train = self.num_train_timesteps as f32;
        self.timesteps = sigmas.iter().map(|s| f64::from(s * train)).collect();
        self.sigmas = sigmas.iter().map(|s| f64::from(*s)).collect();
        self.sigmas.push(0.0);
        Ok(())
    }

    /// The time shift (dynamic or static), then the stretch to `shift_terminal`, in the
    /// precision of `sigmas`.
    fn shaped<T: Real>(&self, sigmas: &[T], mu: Option<f64>) -> Result<Vec<T>, PipelineError> {
        let one = T::of(1.0);
        let shifted: Vec<T> = match (self.use_dynamic_shifting, mu) {
            (true, None) => {
                return Err(PipelineError::invalid(
                    "mu",
                    "is needed: the scheduler config sets `use_dynamic_shifting`",
                ))
            }
            (true, Some(mu)) => {
                let m = match self.time_shift {
                    TimeShift::Exponential => T::of(mu.exp()),
                    TimeShift::Linear => T::of(mu),
                };
                sigmas.iter().map(|t| m / (m + (one / *t - one))).collect()
            }
            (false, _) => {
                let shift = T::of(self.shift);
                let shift_less_one = T::of(self.shift - 1.0);
                sigmas
                    .iter()
                    .map(|s| shift * *s / (one + shift_less_one * *s))
                    .collect()
            }
        };
        Ok(match (self.shift_terminal, shifted.last()) {
            (Some(terminal), Some(last)) => {
                let scale = (one - *last) / T::of(1.0 - terminal);
                shifted.iter().map(|t| one - (one - *t) / scale).collect()
            }
            _ => shifted,
        })
    }

    /// Karras or exponential spacing between the shifted schedule's end points (float64).
    fn spaced<T: Real>(&self, sigmas: Vec<T>, steps: usize) -> Vec<f64> {
        let as_f64: Vec<f64> = sigmas.iter().map(|s| s.get()).collect();
        let (Some(first), Some(last)) = (as_f64.first().copied(), as_f64.last().copied()) else {
            return as_f64;
        };
        match self.spacing {
            Spacing::Shifted => as_f64,
            Spacing::Karras => {
                let rho = 7.0;
                let (min_inv, max_inv) = (last.powf(1.0 / rho), first.powf(1.0 / rho));
                linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(rho))
                    .collect()
            }
            Spacing::Exponential => linspace(first.ln(), last.ln(), steps)
                .into_iter()
                .map(f64::exp)
                .collect(),
        }
    }

    /// The timesteps the model is conditioned on, `sigma * num_train_timesteps`.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigmas of the steps, and a final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The sample after step `step_index`: `x + (sigma_next - sigma) * v`; with
    /// `stochastic_sampling`, the predicted clean sample re-noised to the next sigma with a
    /// fresh draw.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let (Some(&sigma), Some(&next)) =
            (self.sigmas.get(step_index), self.sigmas.get(step_index + 1))
        else {
            return Err(PipelineError::invalid(
                "step",
                format!(
                    "{step_index} is past the schedule's {} steps",
                    self.timesteps.len()
                ),
            ));
        };
        if self.stochastic_sampling {
            let drawn = noise
                .next(sample.dims())?
                .to_device(sample.device())
                .in_component(COMPONENT)?;
            let one_less = f64::from(1.0f32 - next as f32);
            let renoised = || -> candle_core::Result<Tensor> {
                let x0 = (sample - (model_output * sigma)?)?;
                (x0 * one_less)? + (drawn * next)?
            };
            return renoised().in_component(COMPONENT);
        }
        let dt = f64::from(next as f32 - sigma as f32);
        (model_output * dt)
            .and_then(|moved| sample + moved)
            .in_component(COMPONENT)
    }

    /// Flow matching's forward process at step `step_index`: `sigma * noise + (1 - sigma) *
    /// sample` (diffusers' `scale_noise`, image to image's start).
    pub fn scale_noise(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, PipelineError> {
        let sigma = self.sigmas.get(step_index).copied().ok_or_else(|| {
            PipelineError::invalid("strength", "leaves no step of the schedule to start from")
        })?;
        let keep = f64::from(1.0f32 - sigma as f32);
        let mixed = || (noise * sigma)? + (sample * keep)?;
        mixed().in_component(COMPONENT)
    }
}

/// The first and last of the 1000 training sigmas diffusers' constructor makes (float32,
/// shifted statically unless shifting is dynamic), read back as Python floats.
fn training_sigma_range(train: usize, shift: f64, dynamic: bool) -> (f64, f64) {
    let at = |timestep: f32| -> f64 {
        let sigma = timestep / train as f32;
        let sigma = match dynamic {
            true => sigma,
            false => {
                let shift = shift as f32;
                shift * sigma / (1.0 + (shift - 1.0) * sigma)
            }
        };
        f64::from(sigma)
    };
    (at(train as f32), at(1.0))
}

/// The float types the schedule is computed in, so each array keeps numpy's precision.
trait Real:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(value: f64) -> Self;
    fn get(self) -> f64;
}

impl Real for f32 {
    fn of(value: f64) -> Self {
        value as f32
    }
    fn get(self) -> f64 {
        f64::from(self)
    }
}

impl Real for f64 {
    fn of(value: f64) -> Self {
        value
    }
    fn get(self) -> f64 {
        self
    }
}

/// diffusers' pipelines' `calculate_shift`: `mu` grows linearly with the image's sequence
/// length, from `base_shift` at `base_image_seq_len` to `max_shift` at `max_image_seq_len`
/// (Python floats). The pipeline supplies the default `max_shift` for a config without
/// one: FLUX's is 1.15, SD 3's 1.16.
pub fn calculate_shift(
    image_seq_len: usize,
    config: &SchedulerConfig,
    default_max_shift: f64,
) -> Result<f64, PipelineError> {
    let options = Options::new(config)?;
    let base_len = options.usize("base_image_seq_len", 256)? as f64;
    let max_len = options.usize("max_image_seq_len", 4096)? as f64;
    let base_shift = options.f64("base_shift", 0.5)?;
    let max_shift = options.f64("max_shift", default_max_shift)?;
    if max_len == base_len {
        return Err(PipelineError::invalid(
            "scheduler config",
            "`max_image_seq_len` equals `base_image_seq_len`, so no shift can be computed",
        ));
    }
    let m = (max_shift - base_shift) / (max_len - base_len);
    let b = base_shift - m * base_len;
    Ok(image_seq_len as f64 * m + b)
}

/// diffusers' `get_timesteps` for flow matching (image to image starts part-way): `t_start = int(max(n - min(n * strength,
/// n), 0))`, refused when no step is left.
pub fn first_kept_step(steps: usize, strength: f64) -> Result<usize, PipelineError> {
    let n = steps as f64;
    let start = (n - (n * strength).min(n)).max(0.0) as usize;
    if start >= steps {
        return Err(PipelineError::invalid(
            "strength",
            format!("{strength} with {steps} steps leaves no step to run"),
        ));
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flux_config() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true}"#,
        )
        .expect("config")
    }

    /// tiny-flux's recorded 128x128 / 4-step schedule (`expected.json` → `schedules`).
    #[test]
    fn flux_schedule_matches_diffusers_to_the_last_digit() {
        let config = flux_config();
        let mu = calculate_shift(64, &config, 1.15).expect("mu");
        assert_eq!(mu, 0.46749999999999997);
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config).expect("scheduler");
        let sigmas = linspace(1.0, 1.0 / 4.0, 4);
        scheduler
            .set_timesteps(&FlowSchedule {
                num_inference_steps: 4,
                sigmas: Some(sigmas),
                mu: Some(mu),
            })
            .expect("schedule");
        assert_eq!(
            scheduler.sigmas(),
            [
                1.0,
                0.8272286653518677,
                0.6147918701171875,
                0.34725838899612427,
                0.0
            ]
        );
        assert_eq!(
            scheduler.timesteps(),
            [
                1000.0,
                827.2286376953125,
                614.7918701171875,
                347.2583923339844
            ]
        );
    }

    /// diffusers' `get_timesteps`: 4 steps at 0.6 keep int(4 - 2.4) = 1 out; 28 at 0.6 keep
    /// 11 out; strength 1 runs everything; 0 runs nothing and is refused.
    #[test]
    fn strength_skips_the_steps_diffusers_skips() {
        assert_eq!(first_kept_step(4, 0.6).expect("4 steps"), 1);
        assert_eq!(first_kept_step(28, 0.6).expect("28 steps"), 11);
        assert_eq!(first_kept_step(4, 1.0).expect("all"), 0);
        let error = first_kept_step(4, 0.0).expect_err("none").to_string();
        assert!(error.contains("strength"), "{error}");
    }

    #[test]
    fn dynamic_shifting_without_mu_is_refused_by_name() {
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&flux_config()).expect("new");
        let error = scheduler
            .set_timesteps(&FlowSchedule {
                num_inference_steps: 4,
                sigmas: None,
                mu: None,
            })
            .expect_err("no mu");
        assert!(error.to_string().contains("mu"), "{error}");
    }

    #[test]
    fn options_it_cannot_honour_are_refused_by_name() {
        for key in ["invert_sigmas", "use_beta_sigmas"] {
            let mut config = flux_config();
            config.other.insert(key.into(), true.into());
            let error = FlowMatchEulerDiscreteScheduler::new(&config).expect_err(key);
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    /// SD 3's path: no sigmas from the pipeline, a static shift of 3.0 applied to training
    /// sigmas that the constructor already shifted (diffusers shifts `sigma_min` twice).
    #[test]
    fn static_shift_starts_from_the_constructors_shifted_range() {
        let config: SchedulerConfig =
            serde_json::from_str(r#"{"num_train_timesteps": 1000, "shift": 3.0}"#).expect("config");
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config).expect("new");
        scheduler
            .set_timesteps(&FlowSchedule {
                num_inference_steps: 2,
                sigmas: None,
                mu: None,
            })
            .expect("schedule");
        // sigma_min = 3*0.001/(1+2*0.001) in float32, then linspace(1000, 1000*sigma_min)
        // / 1000 shifted again.
        let sigma_min = f64::from(3.0f32 * 0.001f32 / (1.0 + 2.0 * 0.001f32));
        let shifted = 3.0 * sigma_min / (1.0 + 2.0 * sigma_min);
        assert_eq!(scheduler.sigmas()[0], 1.0);
        assert_eq!(scheduler.sigmas()[1], f64::from(shifted as f32));
        assert_eq!(scheduler.sigmas()[2], 0.0);
    }

    #[test]
    fn a_step_moves_along_the_velocity_by_the_sigma_difference() {
        let config = flux_config();
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config).expect("new");
        scheduler
            .set_timesteps(&FlowSchedule {
                num_inference_steps: 2,
                sigmas: Some(vec![1.0, 0.5]),
                mu: Some(0.0),
            })
            .expect("schedule");
        let sample = Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).expect("sample");
        let velocity = Tensor::new(&[4.0f32, -2.0], &candle_core::Device::Cpu).expect("v");
        let mut noise = crate::pipelines::ReplayNoise::new(Vec::new());
        let next = scheduler
            .step(&velocity, 0, &sample, &mut noise)
            .expect("step")
            .to_vec1::<f32>()
            .expect("values");
        // mu 0: e^0/(e^0 + 1/t - 1) = t, so sigmas are 1.0, 0.5, 0.
        assert_eq!(next, [1.0 - 0.5 * 4.0, 2.0 + 0.5 * 2.0]);
    }
}
