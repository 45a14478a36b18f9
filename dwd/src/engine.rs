//! The workflow engine: runs a job's steps in order on loaded pipelines.
//!
//! For each step it resolves the model, takes each component from the cache (loading what
//! is missing), runs the pipeline with the step's arguments while reporting progress and
//! honouring cancellation, and hands every output image to the client through a sealed
//! memfd. It returns the run's summary: outcome, timings and cache hits and misses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use protocol::message::{
    CacheCounts, ElementType, ErrorKind, LogLevel, Outcome, OutputDescriptor, Phase, RunError,
    RunPlan, RunSummary, Timings,
};
use protocol::units::KeepAlive;
use protocol::workflow::{OutputType, Step, Workflow};
use serde_json::json;

use crate::cache::{ComponentCache, ComponentKey};
use crate::inputs::{
    images_to_tensor, load_images, load_latents, resolve_path, InputError, StepResults,
};
use crate::loading::{
    all_keys, evicted_component, load_pipeline, missing, plan_step, planned_component, LoadCounts,
    LoadError, StepPlan,
};
use crate::memory::{human_bytes, measured_bytes, release_freed_memory, Baseline};
use crate::output::segment_with;
use crate::pipelines::{
    self, images_to_rgb8, GenerateArgs, PipelineError, RgbImage, StableDiffusionPipeline,
};
use crate::queue::{CancelReason, Job, JobEvent};

/// Why a job stopped before finishing.
#[derive(Debug)]
enum StepError {
    Invalid(String),
    Failed(String),
    OverBudget(String),
    Cancelled(CancelReason),
}

impl From<LoadError> for StepError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Invalid(message) => StepError::Invalid(message),
            LoadError::Failed(message) => StepError::Failed(message),
        }
    }
}

/// In debug builds only (the tests'), a job whose prompt is exactly this panics, so tests
/// can prove a panic fails that job alone. Release builds do not contain it.
#[cfg(debug_assertions)]
pub const TEST_PANIC_PROMPT: &str = "__dwd_test_panic__";

/// How the daemon treats memory, from its flags.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPolicy {
    /// How long components stay after their last use, unless a run says otherwise.
    pub keep_alive: KeepAlive,
    /// Warn when memory after a run exceeds the post-load baseline by more than this.
    pub growth_warn_bytes: u64,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        MemoryPolicy {
            keep_alive: KeepAlive::For(std::time::Duration::from_secs(30 * 60)),
            growth_warn_bytes: 256 << 20,
        }
    }
}

/// Runs jobs on one device with the daemon's component cache.
pub struct Engine {
    pub cache: ComponentCache,
    pub device: Device,
    pub device_name: String,
    pub policy: MemoryPolicy,
    /// Memory right after the last load.
    pub baseline: Arc<Baseline>,
}

/// Counters of one run.
#[derive(Default)]
struct RunCounters {
    load_ms: u64,
    cache: CacheCounts,
    /// Every component the run used, for its keep-alive.
    used: Vec<ComponentKey>,
    /// Model folders of finished steps, for `reused_components`.
    model_dirs: HashMap<String, PathBuf>,
}

/// A pipeline assembled for one step, and how it was configured.
struct PreparedPipeline {
    pipeline: StableDiffusionPipeline,
    model_dir: PathBuf,
}

impl Engine {
    pub fn new(cache: ComponentCache, device: Device, policy: MemoryPolicy) -> Self {
        let device_name = device_name(&device);
        Engine {
            cache,
            device,
            device_name,
            policy,
            baseline: Arc::default(),
        }
    }

    /// What running `workflow` would load and evict, and whether it fits; loads nothing.
    pub fn plan(&self, workflow: &Workflow) -> Result<RunPlan, String> {
        let mut model_dirs = HashMap::new();
        let mut plans: Vec<(String, StepPlan)> = Vec::new();
        for step in &workflow.steps {
            let plan = plan_step(workflow, step, &self.device, &self.device_name, &model_dirs)
                .map_err(|e| match e {
                    LoadError::Invalid(m) | LoadError::Failed(m) => m,
                })?;
            model_dirs.insert(step.name.clone(), plan.model_dir.clone());
            plans.push((step.name.clone(), plan));
        }
        let refs: Vec<&StepPlan> = plans.iter().map(|(_, p)| p).collect();
        let (_, load_bytes) = missing(&refs, &self.cache);
        let mut seen = Vec::new();
        let mut components = Vec::new();
        for (step, plan) in &plans {
            for load in &plan.components {
                if !seen.contains(&load.key) {
                    seen.push(load.key.clone());
                    components.push(planned_component(step, load, &self.cache));
                }
            }
        }
        let (evict, fits, message) = match self.cache.plan_room(load_bytes, &all_keys(&refs)) {
            Ok(evict) => (evict.iter().map(evicted_component).collect(), true, None),
            Err(over) => (Vec::new(), false, Some(over.to_string())),
        };
        Ok(RunPlan {
            workflow: protocol::message::WorkflowInfo {
                id: workflow.id.clone(),
                path: workflow.path.display().to_string(),
                sha256: workflow.sha256.clone(),
            },
            components,
            load_bytes,
            evict,
            budget_bytes: self.cache.budget(),
            loaded_bytes: self.cache.loaded_bytes(),
            fits,
            message,
        })
    }

    /// Runs every step of `job` and returns its summary. Cancellation is checked before
    /// each step, each component load and each denoising step.
    pub fn run(&self, job: &Job) -> RunSummary {
        let started = Instant::now();
        let mut counters = RunCounters::default();
        let mut results = StepResults::default();
        let mut result = Ok(());
        for step in &job.workflow.steps {
            if let Some(reason) = job.cancel.reason() {
                result = Err(StepError::Cancelled(reason));
                break;
            }
            result = self.run_step(job, step, &mut counters, &mut results);
            if result.is_err() {
                break;
            }
        }
        self.after_run(job, &counters.used);
        let run_ms = started.elapsed().as_millis() as u64;
        let timings = Timings {
            load_ms: counters.load_ms,
            run_ms,
            total_ms: job.accepted_at.elapsed().as_millis() as u64,
        };
        let (outcome, error) = match result {
            Ok(()) => (Outcome::Finished, None),
            Err(StepError::Cancelled(reason)) => {
                let summary = job.cancelled_summary(reason, run_ms);
                return RunSummary {
                    timings,
                    cache: counters.cache,
                    ..summary
                };
            }
            Err(StepError::Invalid(message)) => (
                Outcome::Failed,
                Some(RunError {
                    kind: ErrorKind::InvalidWorkflow,
                    message,
                }),
            ),
            Err(StepError::Failed(message)) => (
                Outcome::Failed,
                Some(RunError {
                    kind: ErrorKind::Failed,
                    message,
                }),
            ),
            Err(StepError::OverBudget(message)) => (
                Outcome::Failed,
                Some(RunError {
                    kind: ErrorKind::OverBudget,
                    message,
                }),
            ),
        };
        RunSummary {
            job_id: job.id,
            outcome,
            workflow: job.workflow_info(),
            timings,
            cache: counters.cache,
            error,
        }
    }

    fn run_step(
        &self,
        job: &Job,
        step: &Step,
        counters: &mut RunCounters,
        results: &mut StepResults,
    ) -> Result<(), StepError> {
        let spec = &step.pipeline;
        let args = &spec.arguments;
        let invalid_input = |e: InputError| {
            StepError::Invalid(format!(
                "{}: step `{}`: {e}",
                job.workflow.path.display(),
                step.name
            ))
        };
        let base_dir = job.workflow.base_dir();
        // Inputs first: a bad file fails the step before anything is loaded.
        let latents = args
            .latents
            .as_deref()
            .map(|p| load_latents(&resolve_path(base_dir, p)))
            .transpose()
            .map_err(invalid_input)?;
        let init_image = match &args.image {
            Some(source) => Some(
                images_to_tensor(&load_images(source, base_dir, results).map_err(invalid_input)?)
                    .map_err(invalid_input)?,
            ),
            None => None,
        };

        #[cfg(debug_assertions)]
        if args.prompt.0.iter().any(|p| p == TEST_PANIC_PROMPT) {
            panic!("a test asked this job to panic");
        }
        let prepared = self.prepare(job, step, counters)?;
        let seed = spec.seed.unwrap_or_else(rand::random);
        if spec.seed.is_none() {
            job.send(JobEvent::Log {
                level: LogLevel::Info,
                message: format!("step `{}`: no seed given, using {seed}", step.name),
            });
        }
        let generate = GenerateArgs {
            prompts: args.prompt.0.clone(),
            negative_prompt: args.negative_prompt.clone(),
            num_inference_steps: args.num_inference_steps,
            guidance_scale: args.guidance_scale,
            height: args.height,
            width: args.width,
            num_images_per_prompt: args.num_images_per_prompt,
            seed,
            latents,
            scheduler_type: spec.scheduler.as_ref().map(|s| s.scheduler_type.clone()),
            scheduler_overrides: spec
                .scheduler
                .as_ref()
                .map(|s| s.from_config_args.clone())
                .unwrap_or_default(),
            init_image,
            strength: args.strength,
            output_latents: args.output_type == OutputType::Latent,
        };
        let scheduler_type = generate
            .scheduler_type
            .clone()
            .or_else(|| prepared.pipeline.scheduler.class_name.clone())
            .unwrap_or_else(|| "DDIMScheduler".to_string());

        let mut on_progress = |progress: pipelines::Progress| {
            if job.cancel.reason().is_some() {
                return Err(PipelineError::Cancelled);
            }
            let phase = match progress.phase {
                pipelines::Phase::Encoding => Phase::Encoding,
                pipelines::Phase::Denoising => Phase::Denoising,
                pipelines::Phase::Decoding => Phase::Decoding,
            };
            job.send(JobEvent::Progress {
                step: step.name.clone(),
                phase,
                i: progress.step as u32,
                n: progress.total as u32,
            });
            Ok(())
        };
        let output = prepared
            .pipeline
            .generate(&generate, &mut on_progress)
            .map_err(|e| pipeline_error(job, e, &step.name))?;

        let metadata = OutputMetadata {
            scheduler_type: &scheduler_type,
            seed,
            dw: json!({
                "workflow_id": job.workflow.id,
                "workflow_sha256": job.workflow.sha256,
                "step": step.name,
                "model": spec.model_name,
                "model_dir": prepared.model_dir.display().to_string(),
                "pipeline_type": spec.pipeline_type,
                "scheduler": scheduler_type,
                "seed": seed,
                "arguments": spec.arguments_json,
            })
            .to_string(),
        };
        if generate.output_latents {
            self.send_latents(job, step, &output, &metadata)?;
        } else {
            let images = images_to_rgb8(&output).map_err(|e| pipeline_error(job, e, &step.name))?;
            for (artifact_index, image) in images.iter().enumerate() {
                self.send_image(job, step, artifact_index, image, &metadata)?;
            }
            results.record_images(&step.name, images);
        }
        Ok(())
    }

    /// Resolves the step's model, makes room for what is missing (or refuses before
    /// loading anything), and takes each component from the cache.
    fn prepare(
        &self,
        job: &Job,
        step: &Step,
        counters: &mut RunCounters,
    ) -> Result<PreparedPipeline, StepError> {
        let plan = plan_step(
            &job.workflow,
            step,
            &self.device,
            &self.device_name,
            &counters.model_dirs,
        )?;
        if let Some(notice) = &plan.dtype_notice {
            job.send(JobEvent::Log {
                level: LogLevel::Warn,
                message: notice.clone(),
            });
        }
        let (missing_keys, needed) = missing(&[&plan], &self.cache);
        if !missing_keys.is_empty() {
            let evicted = self
                .cache
                .make_room(needed, &all_keys(&[&plan]))
                .map_err(|over| StepError::OverBudget(format!("step `{}`: {over}", step.name)))?;
            for e in evicted {
                job.send(JobEvent::Log {
                    level: LogLevel::Info,
                    message: format!(
                        "unloaded {} of {} ({}) to make room",
                        e.key.component_type,
                        e.key.model.display(),
                        human_bytes(e.bytes)
                    ),
                });
            }
        }
        let user = format!("{}:{}", job.workflow.id, step.name);
        let mut counts = LoadCounts::default();
        let mut before_each = |i: usize| -> Result<(), LoadError> {
            if job.cancel.reason().is_some() {
                return Err(LoadError::Failed("cancelled".to_string()));
            }
            job.send(JobEvent::Progress {
                step: step.name.clone(),
                phase: Phase::Loading,
                i: i as u32,
                n: 4,
            });
            Ok(())
        };
        let loaded = load_pipeline(
            &plan,
            &self.cache,
            &self.device,
            step.pipeline.variant.as_deref(),
            &user,
            &mut counts,
            &mut before_each,
        );
        counters.cache.hits += counts.hits;
        counters.cache.misses += counts.misses;
        counters.load_ms += counts.load_ms;
        counters
            .used
            .extend(plan.components.iter().map(|c| c.key.clone()));
        counters
            .model_dirs
            .insert(step.name.clone(), plan.model_dir.clone());
        let pipeline = match loaded {
            Ok(pipeline) => pipeline,
            Err(_) if job.cancel.reason().is_some() => {
                return Err(StepError::Cancelled(
                    job.cancel.reason().unwrap_or(CancelReason::Client),
                ))
            }
            Err(e) => {
                return Err(match StepError::from(e) {
                    StepError::Failed(message) => {
                        StepError::Failed(format!("step `{}`: {message}", step.name))
                    }
                    other => other,
                })
            }
        };
        if counts.misses > 0 {
            self.baseline.set(measured_bytes(&self.device));
        }
        Ok(PreparedPipeline {
            pipeline,
            model_dir: plan.model_dir,
        })
    }

    /// After a run, whatever its outcome: apply its keep-alive to what it used, and warn if
    /// memory grew past the post-load baseline.
    fn after_run(&self, job: &Job, used: &[ComponentKey]) {
        let keep_alive = job
            .keep_alive_ms
            .map(KeepAlive::from_ms)
            .unwrap_or(self.policy.keep_alive);
        let cleared = self.cache.keep_alive(used, keep_alive);
        // The run's intermediate tensors are freed by now (once the device has finished
        // with them); hand their memory back so that between runs the daemon holds what it
        // keeps, not what it once needed.
        let _ = self.device.synchronize();
        release_freed_memory();
        if cleared.unloaded > 0 {
            job.send(JobEvent::Log {
                level: LogLevel::Info,
                message: format!(
                    "keep-alive 0: unloaded {} component(s), {}",
                    cleared.unloaded,
                    human_bytes(cleared.bytes_freed)
                ),
            });
        }
        if let Some(baseline) = self.baseline.get() {
            let now = measured_bytes(&self.device);
            if now > baseline.saturating_add(self.policy.growth_warn_bytes) {
                let message = format!(
                    "memory grew by {} since the models were loaded ({} then, {} now; --growth-warn {})",
                    human_bytes(now - baseline),
                    human_bytes(baseline),
                    human_bytes(now),
                    human_bytes(self.policy.growth_warn_bytes)
                );
                tracing::warn!("{message}");
                job.send(JobEvent::Log {
                    level: LogLevel::Warn,
                    message,
                });
            }
        }
    }

    fn send_image(
        &self,
        job: &Job,
        step: &Step,
        artifact_index: usize,
        image: &RgbImage,
        metadata: &OutputMetadata<'_>,
    ) -> Result<(), StepError> {
        let args = &step.pipeline.arguments;
        let prompt = args
            .prompt
            .0
            .get(artifact_index / args.num_images_per_prompt.max(1))
            .cloned()
            .unwrap_or_default();
        let parameters = a1111_parameters(
            &prompt,
            args.negative_prompt.as_deref().unwrap_or(""),
            args.num_inference_steps,
            metadata.scheduler_type,
            args.guidance_scale,
            metadata.seed,
            image,
            &step.pipeline.model_name,
        );
        let shape = vec![image.height as u64, image.width as u64, 3];
        let output = Output {
            artifact_index,
            content_type: step.result.content_type.clone(),
            element_type: ElementType::U8,
            shape,
            parameters,
        };
        self.send_output(job, step, output, &image.pixels, metadata)
    }

    /// Final latents (`output_type: "latent"`), written by the client as `.safetensors`.
    fn send_latents(
        &self,
        job: &Job,
        step: &Step,
        latents: &Tensor,
        metadata: &OutputMetadata<'_>,
    ) -> Result<(), StepError> {
        let failed = |e: candle_core::Error| {
            StepError::Failed(format!(
                "step `{}`: cannot read the latents back: {e}",
                step.name
            ))
        };
        let latents = latents
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.contiguous())
            .map_err(failed)?;
        let values = latents
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(failed)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = latents.dims().iter().map(|&d| d as u64).collect();
        let output = Output {
            artifact_index: 0,
            content_type: "application/x-safetensors".to_string(),
            element_type: ElementType::F32,
            shape,
            parameters: String::new(),
        };
        self.send_output(job, step, output, &bytes, metadata)
    }

    fn send_output(
        &self,
        job: &Job,
        step: &Step,
        output: Output,
        bytes: &[u8],
        metadata: &OutputMetadata<'_>,
    ) -> Result<(), StepError> {
        let segment = segment_with(bytes)
            .map_err(|e| StepError::Failed(format!("cannot create the output segment: {e}")))?;
        let descriptor = OutputDescriptor {
            job_id: job.id,
            workflow_id: job.workflow.id.clone(),
            step: step.name.clone(),
            step_index: step.index as u32,
            result_index: 0,
            artifact_index: output.artifact_index as u32,
            file_base_name: step.result.file_base_name.clone(),
            content_type: output.content_type,
            element_type: output.element_type,
            shape: output.shape,
            byte_len: bytes.len() as u64,
            embed_metadata: step.result.embed_metadata,
            parameters: output.parameters,
            dw_metadata: metadata.dw.clone(),
        };
        job.send(JobEvent::Output {
            descriptor,
            segment,
        });
        Ok(())
    }
}

/// What every output of a step records about how it was made.
struct OutputMetadata<'a> {
    scheduler_type: &'a str,
    seed: u64,
    /// The `dw` JSON: workflow id and sha256, step, model, scheduler, seed, arguments.
    dw: String,
}

/// One output before it is handed over.
struct Output {
    artifact_index: usize,
    content_type: String,
    element_type: ElementType,
    shape: Vec<u64>,
    parameters: String,
}

fn pipeline_error(job: &Job, e: PipelineError, step: &str) -> StepError {
    match e {
        PipelineError::Cancelled => {
            StepError::Cancelled(job.cancel.reason().unwrap_or(CancelReason::Client))
        }
        PipelineError::Unsupported { .. } | PipelineError::InvalidArgument { .. } => {
            StepError::Invalid(format!(
                "{}: step `{step}`: {e}",
                job.workflow.path.display()
            ))
        }
        other => StepError::Failed(format!("step `{step}`: {other}")),
    }
}

/// The AUTOMATIC1111 `parameters` text that image tools read.
#[allow(clippy::too_many_arguments)]
fn a1111_parameters(
    prompt: &str,
    negative: &str,
    steps: usize,
    scheduler_type: &str,
    cfg: f64,
    seed: u64,
    image: &RgbImage,
    model: &str,
) -> String {
    format!(
        "{prompt}\nNegative prompt: {negative}\nSteps: {steps}, Sampler: {}, CFG scale: {cfg}, Seed: {seed}, Size: {}x{}, Model: {model}",
        sampler_name(scheduler_type),
        image.width,
        image.height
    )
}

/// AUTOMATIC1111's name for a diffusers scheduler class.
fn sampler_name(scheduler_type: &str) -> &str {
    match scheduler_type {
        "DDIMScheduler" => "DDIM",
        "PNDMScheduler" => "PLMS",
        "EulerDiscreteScheduler" => "Euler",
        "EulerAncestralDiscreteScheduler" => "Euler a",
        "DPMSolverMultistepScheduler" => "DPM++ 2M",
        "UniPCMultistepScheduler" => "UniPC",
        "LCMScheduler" => "LCM",
        other => other,
    }
}

/// `cpu`, `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_automatic1111_layout() {
        let image = RgbImage {
            width: 64,
            height: 48,
            pixels: vec![],
        };
        let text = a1111_parameters(
            "a fox",
            "blurry",
            4,
            "DDIMScheduler",
            7.5,
            42,
            &image,
            "tiny",
        );
        assert_eq!(
            text,
            "a fox\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny"
        );
    }
}
