//! The workflow engine: runs a job's steps in order on loaded pipelines.
//!
//! For each step it resolves the model, takes each component from the cache (loading what
//! is missing), runs the pipeline with the step's arguments while reporting progress and
//! honouring cancellation, and hands every output image to the client through a sealed
//! memfd. It returns the run's summary: outcome, timings and cache hits and misses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use protocol::message::{
    CacheCounts, ElementType, ErrorKind, LogLevel, Outcome, OutputDescriptor, Phase, RunError,
    RunSummary, Timings,
};
use protocol::workflow::{OutputType, PipelineStep, Step, WorkflowError};
use serde_json::json;

use crate::cache::{ComponentCache, ComponentKey, FileIdentity, Lookup};
use crate::inputs::{
    images_to_tensor, load_images, load_latents, resolve_path, InputError, StepResults,
};
use crate::models::{hub_cache_dir, resolve_model};
use crate::output::segment_with;
use crate::pipelines::{
    self, images_to_rgb8, ClipTokenizer, GenerateArgs, PipelineError, RgbImage, SchedulerConfig,
    StableDiffusionPipeline, TextEncoder, Unet, Vae,
};
use crate::queue::{CancelReason, Job, JobEvent};

/// Why a job stopped before finishing.
#[derive(Debug)]
enum StepError {
    Invalid(String),
    Failed(String),
    Cancelled(CancelReason),
}

/// Runs jobs on one device with the daemon's component cache.
pub struct Engine {
    pub cache: ComponentCache,
    pub device: Device,
    pub device_name: String,
}

/// Counters of one run.
#[derive(Default)]
struct RunCounters {
    load_ms: u64,
    cache: CacheCounts,
}

/// A pipeline assembled for one step, and how it was configured.
struct PreparedPipeline {
    pipeline: StableDiffusionPipeline,
    model_dir: PathBuf,
}

impl Engine {
    pub fn new(cache: ComponentCache, device: Device) -> Self {
        let device_name = device_name(&device);
        Engine {
            cache,
            device,
            device_name,
        }
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

    /// Resolves the step's model and takes each component from the cache.
    fn prepare(
        &self,
        job: &Job,
        step: &Step,
        counters: &mut RunCounters,
    ) -> Result<PreparedPipeline, StepError> {
        let spec = &step.pipeline;
        let model_dir = resolve_model(
            job.workflow.base_dir(),
            &spec.model_name,
            hub_cache_dir().as_deref(),
        )
        .map_err(|e| {
            StepError::Invalid(
                WorkflowError {
                    file: job.workflow.path.clone(),
                    position: Some(spec.model_name_at),
                    message: e.to_string(),
                }
                .to_string(),
            )
        })?;
        let dtype = self.dtype_for(job, spec);
        let variant = spec.variant.as_deref();
        let dtype_name = format!("{dtype:?}").to_lowercase();
        let load = |i: u32| -> Result<(), StepError> {
            if let Some(reason) = job.cancel.reason() {
                return Err(StepError::Cancelled(reason));
            }
            job.send(JobEvent::Progress {
                step: step.name.clone(),
                phase: Phase::Loading,
                i,
                n: 4,
            });
            Ok(())
        };
        let failed = |e: PipelineError| {
            StepError::Failed(format!(
                "step `{}`: loading {}: {e}",
                step.name,
                model_dir.display()
            ))
        };

        load(0)?;
        let tokenizer_dir = model_dir.join("tokenizer");
        let tokenizer: Arc<ClipTokenizer> = self
            .component(
                counters,
                self.key(
                    "tokenizer",
                    &model_dir,
                    "-",
                    vec![
                        tokenizer_dir.join("vocab.json"),
                        tokenizer_dir.join("merges.txt"),
                    ],
                )
                .map_err(failed)?,
                || ClipTokenizer::load(&tokenizer_dir).map(|t| (t, 0)),
            )
            .map_err(failed)?;

        load(1)?;
        let te_dir = model_dir.join("text_encoder");
        let text_encoder: Arc<TextEncoder> = self
            .component(
                counters,
                self.key(
                    "text_encoder",
                    &model_dir,
                    &dtype_name,
                    with_config(&te_dir, variant).map_err(failed)?,
                )
                .map_err(failed)?,
                || {
                    TextEncoder::load_variant(&te_dir, variant, dtype, &self.device).map(|m| {
                        let b = m.bytes();
                        (m, b)
                    })
                },
            )
            .map_err(failed)?;

        load(2)?;
        let unet_dir = model_dir.join("unet");
        let unet: Arc<Unet> = self
            .component(
                counters,
                self.key(
                    "unet",
                    &model_dir,
                    &dtype_name,
                    with_config(&unet_dir, variant).map_err(failed)?,
                )
                .map_err(failed)?,
                || {
                    Unet::load_variant(&unet_dir, variant, dtype, &self.device).map(|m| {
                        let b = m.bytes();
                        (m, b)
                    })
                },
            )
            .map_err(failed)?;

        load(3)?;
        let vae_dir = model_dir.join("vae");
        let vae: Arc<Vae> = self
            .component(
                counters,
                self.key(
                    "vae",
                    &model_dir,
                    &dtype_name,
                    with_config(&vae_dir, variant).map_err(failed)?,
                )
                .map_err(failed)?,
                || {
                    Vae::load_variant(&vae_dir, variant, dtype, &self.device).map(|m| {
                        let b = m.bytes();
                        (m, b)
                    })
                },
            )
            .map_err(failed)?;

        let scheduler = SchedulerConfig::load(&model_dir.join("scheduler")).map_err(failed)?;
        Ok(PreparedPipeline {
            pipeline: StableDiffusionPipeline {
                tokenizer,
                text_encoder,
                unet,
                vae,
                scheduler,
                device: self.device.clone(),
                dtype,
            },
            model_dir,
        })
    }

    fn key(
        &self,
        component_type: &'static str,
        model: &Path,
        dtype: &str,
        files: Vec<PathBuf>,
    ) -> Result<ComponentKey, PipelineError> {
        let files = files
            .iter()
            .map(|p| FileIdentity::of(p).map_err(|e| missing_or_io(p, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ComponentKey {
            component_type,
            model: model.to_path_buf(),
            dtype: dtype.to_string(),
            device: self.device_name.clone(),
            files,
        })
    }

    fn component<T: Send + Sync + 'static>(
        &self,
        counters: &mut RunCounters,
        key: ComponentKey,
        load: impl FnOnce() -> Result<(T, u64), PipelineError>,
    ) -> Result<Arc<T>, PipelineError> {
        let started = Instant::now();
        let (value, lookup) = self.cache.get_or_load(key, load)?;
        match lookup {
            Lookup::Hit => counters.cache.hits += 1,
            Lookup::Miss => {
                counters.cache.misses += 1;
                counters.load_ms += started.elapsed().as_millis() as u64;
            }
        }
        Ok(value)
    }

    /// The dtype a step runs in: its `torch_dtype`, or f32 where this device does not run
    /// half precision well (with a notice in the run's events).
    fn dtype_for(&self, job: &Job, spec: &PipelineStep) -> DType {
        let asked = match spec.torch_dtype.as_str() {
            "torch.float16" => DType::F16,
            "torch.bfloat16" => DType::BF16,
            _ => DType::F32,
        };
        if asked != DType::F32 && self.device.is_cpu() {
            job.send(JobEvent::Log {
                level: LogLevel::Warn,
                message: format!(
                    "{} is slow or unsupported on the CPU; running in float32 instead",
                    spec.torch_dtype
                ),
            });
            return DType::F32;
        }
        asked
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

/// A component's weight files plus its `config.json`, which also shapes the weights.
fn with_config(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>, PipelineError> {
    let mut files = pipelines::weight_files_variant(dir, variant)?;
    files.push(dir.join("config.json"));
    Ok(files)
}

fn missing_or_io(path: &Path, e: std::io::Error) -> PipelineError {
    if e.kind() == std::io::ErrorKind::NotFound {
        PipelineError::MissingFile {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    } else {
        PipelineError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
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
