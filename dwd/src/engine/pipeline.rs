//! A `pipeline` step: plan and load its components (making room first), then run it once
//! per run of the step, every run drawing from the step's one generator.
//!
//! Nothing here knows a family: the pipeline is a trait object, its arguments are checked
//! against its class's table, and inputs bound from earlier steps go to the arguments
//! whose type takes them.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::families::schedule;
use protocol::message::{LogLevel, Phase};
use protocol::workflow::{ArgDefault, ArgType, PipelineClass, PipelineStep, SchedulerSpec};

use super::context::StepContext;
use super::metadata::{pipeline_metadata, Seeding};
use super::{Engine, RunCounters};
use crate::cache::ComponentKey;
use crate::failure::JobError;
use crate::fanout::{Artifact, Run};
use crate::inputs::{bound_images, images_to_tensor, load_images, load_latents, resolve_path};
use crate::loading::{
    all_keys, load_pipeline, missing, plan_step, LoadCounts, PlanContext, StepPlan,
};
use crate::memory::{available_ram_bytes, device_memory, human_bytes, measured_bytes};
use crate::pipelines::noise::StepGenerator;
use crate::pipelines::{self, images_to_rgb8, Output, Pipeline, PipelineError, Request, RunHost};

/// In debug builds only (the tests'), a job whose prompt is exactly this panics, so tests
/// can prove a panic fails that job alone. Release builds do not contain it.
#[cfg(debug_assertions)]
pub const TEST_PANIC_PROMPT: &str = "__dwd_test_panic__";

/// A pipeline assembled for one step, and how it was configured.
#[derive(Clone)]
pub(super) struct PreparedPipeline {
    pub pipeline: Arc<dyn Pipeline>,
    pub class: &'static PipelineClass,
    pub model_name: String,
    /// The step's `scheduler` block.
    pub scheduler: Option<SchedulerSpec>,
    /// `configuration.vae.enable_slicing` and `enable_tiling`.
    pub vae_slicing: bool,
    pub vae_tiling: bool,
    /// Its components in the cache.
    pub keys: Vec<ComponentKey>,
}

impl Engine {
    /// Resolves the step's model, checks every run's arguments against the class it
    /// resolves to, makes room for what is missing (or refuses before loading anything),
    /// and takes each component from the cache.
    pub(super) fn prepare(
        &self,
        context: &StepContext<'_>,
        spec: &PipelineStep,
        runs: &[Run],
        counters: &mut RunCounters,
    ) -> Result<PreparedPipeline, JobError> {
        let plan = plan_step(&PlanContext {
            workflow: context.workflow,
            step: context.step,
            spec,
            device: &self.device,
            device_name: &self.device_name,
            model_dirs: &counters.model_dirs,
        })?;
        check_runs(context, spec, &plan, runs)?;
        let offloads = pipelines::family(plan.class.family).is_some_and(|f| f.offloads());
        let notices = placement_notices(spec, &self.device_name, offloads);
        for notice in plan.dtype_notice.iter().chain(&notices) {
            context.log(LogLevel::Warn, notice.clone());
        }
        self.make_room(context, &plan)?;
        let mut counts = LoadCounts::default();
        let loaded = self.load(context, &plan, &mut counts);
        counters.count_loads(counts);
        let keys: Vec<ComponentKey> = plan.components.iter().map(|c| c.key.clone()).collect();
        counters.used.extend(keys.iter().cloned());
        let step = &context.step.name;
        counters
            .model_dirs
            .insert(step.clone(), plan.model_dir.clone());
        let pipeline = loaded?;
        if counts.misses > 0 {
            self.baseline.set(measured_bytes(&self.device));
        }
        Ok(PreparedPipeline {
            pipeline,
            class: plan.class,
            model_name: spec.model_name.clone(),
            scheduler: spec.scheduler.clone(),
            vae_slicing: spec.options.vae_slicing,
            vae_tiling: spec.options.vae_tiling,
            keys,
        })
    }

    /// Takes the plan's components from the cache, loading what is missing, with progress
    /// and cancellation between components.
    fn load(
        &self,
        context: &StepContext<'_>,
        plan: &StepPlan,
        counts: &mut LoadCounts,
    ) -> Result<Arc<dyn Pipeline>, JobError> {
        let user = format!("{}:{}", context.workflow.id, context.step.name);
        let mut before_each = |i: usize, n: usize| -> Result<(), JobError> {
            context.check_cancelled()?;
            let step = &context.step.name;
            context
                .host
                .progress(step, Phase::Loading, i as u32, n as u32);
            Ok(())
        };
        load_pipeline(
            plan,
            &self.cache,
            &self.device,
            &user,
            counts,
            &mut before_each,
        )
        .map_err(|e| e.within(&format!("step `{}`", context.step.name)))
    }

    /// Unloads idle components until the plan fits, or refuses with the sizes.
    fn make_room(&self, context: &StepContext<'_>, plan: &StepPlan) -> Result<(), JobError> {
        let offloading = plan
            .components
            .iter()
            .filter(|c| c.key.host && !self.cache.contains(&c.key))
            .map(|c| c.bytes)
            .sum();
        host_room(offloading, available_ram_bytes())
            .map_err(|e| JobError::OverBudget(format!("step `{}`: {e}", context.step.name)))?;
        let (missing_keys, needed) = missing(&[plan], &self.cache);
        if missing_keys.is_empty() {
            return Ok(());
        }
        let evicted = self
            .cache
            .make_room(needed, &all_keys(&[plan]))
            .map_err(|over| {
                JobError::OverBudget(format!("step `{}`: {over}", context.step.name))
            })?;
        for e in evicted {
            context.log(
                LogLevel::Info,
                format!(
                    "unloaded {} of {} ({}) to make room",
                    e.key.component_type,
                    e.key.model.display(),
                    human_bytes(e.bytes)
                ),
            );
        }
        Ok(())
    }

    /// Runs a pipeline once per run, all runs drawing from the step's one generator.
    pub(super) fn run_pipeline(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        runs: &[Run],
        seed: Option<u64>,
        no_generator: bool,
    ) -> Result<Vec<Artifact>, JobError> {
        let seed = match seed.filter(|_| !no_generator) {
            Some(seed) => seed,
            None => {
                let seed = rand::random();
                let step = &context.step.name;
                context.log(
                    LogLevel::Info,
                    format!("step `{step}`: no seed given, using {seed}"),
                );
                seed
            }
        };
        let mut noise = self.generator.seeded(seed);
        let seeding = Seeding {
            seed,
            generator: self.generator.describe(),
        };
        let mut items = Vec::with_capacity(runs.len());
        for (index, run) in runs.iter().enumerate() {
            context.check_cancelled()?;
            let request = self.request(context, prepared, run)?;
            self.admit(context, prepared, &request)?;
            let item = self.generate(context, prepared, &request, &mut noise)?;
            let sizes = match &item {
                Artifact::Images(images) => images.iter().map(|i| (i.width, i.height)).collect(),
                _ => Vec::new(),
            };
            let metadata = pipeline_metadata(context, prepared, &request, &seeding, run, &sizes);
            context.save(index, &item, &metadata)?;
            items.push(item);
        }
        Ok(items)
    }

    /// Refuses a run whose activations would not fit in the memory that is free, before it
    /// starts: a run that fails to allocate would take the daemon and every loaded model
    /// with it.
    fn admit(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        request: &Request,
    ) -> Result<(), JobError> {
        let needed = prepared
            .pipeline
            .activation_bytes(request)
            .map_err(|e| self.pipeline_error(context, e))?;
        let (free, kind) = match device_memory(&self.device) {
            Some((used, total)) => (total.saturating_sub(used), "device memory"),
            None => (available_ram_bytes(), "memory"),
        };
        if free == 0 || needed <= free {
            return Ok(());
        }
        let side = |name: &str| {
            request
                .arguments
                .integer(name)
                .map_or("default".to_string(), |n| n.to_string())
        };
        let images =
            request.arguments.prompts().len().max(1) * request.integer("num_images_per_prompt", 1);
        Err(JobError::OverBudget(format!(
            "step `{}`: this run needs about {} for its work ({images} image(s) of {}x{}), more than the {} of {kind} free; ask for fewer or smaller images, or set `configuration.vae.enable_tiling`",
            context.step.name,
            human_bytes(needed),
            side("width"),
            side("height"),
            human_bytes(free),
        )))
    }

    /// One run's request: its arguments checked against the class, with the images and
    /// latents bound to it.
    fn request(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        run: &Run,
    ) -> Result<Request, JobError> {
        let class = prepared.class;
        let arguments = class
            .check(&run.arguments)
            .map_err(|e| context.refused(format!("`{}`: {}", e.key, e.message)))?;
        let needs_prompt = class
            .argument("prompt")
            .is_some_and(|a| a.default == ArgDefault::Required);
        if needs_prompt && arguments.prompts().is_empty() {
            return Err(context.refused("`prompt` must be text or a list of texts"));
        }
        #[cfg(debug_assertions)]
        if arguments.prompts().iter().any(|p| p == TEST_PANIC_PROMPT) {
            panic!("a test asked this job to panic");
        }
        let mut request = Request {
            class,
            arguments,
            images: HashMap::new(),
            latent_images: HashMap::new(),
            latents: None,
            scheduler: prepared.scheduler.clone(),
            vae_slicing: prepared.vae_slicing,
            vae_tiling: prepared.vae_tiling,
        };
        self.bind_inputs(context, run, &mut request)?;
        Ok(request)
    }

    /// Fills the request's images and latents: from earlier steps' results (`bound`), or
    /// from the files and URLs the arguments name.
    fn bind_inputs(
        &self,
        context: &StepContext<'_>,
        run: &Run,
        request: &mut Request,
    ) -> Result<(), JobError> {
        for (key, artifact) in &run.bound {
            let spec = request.class.argument(key);
            match (spec.map(|a| (a.name, a.ty)), artifact) {
                (Some((name, ArgType::ImageOrLatents)), Artifact::Latents(t)) => {
                    request.latent_images.insert(name, t.clone());
                }
                (Some((name, ty)), artifact) if ty.is_image() => {
                    let images = bound_images(artifact).map_err(|e| context.refused(e))?;
                    let tensor = images_to_tensor(&images).map_err(|e| context.refused(e))?;
                    request.images.insert(name, tensor);
                }
                (Some((_, ArgType::Latents)), Artifact::Latents(t)) => {
                    request.latents = Some(t.clone())
                }
                (Some((_, ArgType::Latents)), other) => {
                    return Err(
                        context.refused(format!("`{key}` takes latents, not {}", other.describe()))
                    )
                }
                (_, other) => {
                    return Err(context.refused(format!(
                        "`{key}` cannot take {} from `previous_result:`",
                        other.describe()
                    )))
                }
            }
        }
        let base_dir = context.workflow.base_dir();
        if let (None, Some(path)) = (&request.latents, request.arguments.latents()) {
            let latents = load_latents(&resolve_path(base_dir, path));
            request.latents = Some(latents.map_err(|e| context.refused(e))?);
        }
        let named: Vec<_> = request
            .arguments
            .images()
            .filter(|(name, _)| {
                !request.images.contains_key(name) && !request.latent_images.contains_key(name)
            })
            .map(|(name, source)| (name, source.clone()))
            .collect();
        for (name, source) in named {
            let images = load_images(&source, base_dir, &self.fetcher);
            let tensor = images.and_then(|i| images_to_tensor(&i));
            request
                .images
                .insert(name, tensor.map_err(|e| context.refused(e))?);
        }
        Ok(())
    }

    /// Runs the pipeline once, reporting progress and stopping when the run is cancelled.
    fn generate(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        request: &Request,
        noise: &mut StepGenerator,
    ) -> Result<Artifact, JobError> {
        let step = &context.step.name;
        let mut progress = |progress: pipelines::Progress| {
            if context.host.cancelled().is_some() {
                return Err(PipelineError::Cancelled);
            }
            let phase = match progress.phase {
                pipelines::Phase::Encoding => Phase::Encoding,
                pipelines::Phase::Denoising => Phase::Denoising,
                pipelines::Phase::Decoding => Phase::Decoding,
            };
            let (i, n) = (progress.step as u32, progress.total as u32);
            context.host.progress(step, phase, i, n);
            Ok(())
        };
        let mut notice = |message: String| context.log(LogLevel::Warn, message);
        let host = RunHost {
            noise,
            notice: &mut notice,
            progress: &mut progress,
        };
        let output = prepared.pipeline.run(request, host);
        match output.map_err(|e| self.pipeline_error(context, e))? {
            Output::Latents(latents) => Ok(Artifact::Latents(latents)),
            Output::Images(images) => {
                let images =
                    images_to_rgb8(&images).map_err(|e| self.pipeline_error(context, e))?;
                Ok(Artifact::Images(images.into_iter().map(Arc::new).collect()))
            }
        }
    }

    fn pipeline_error(&self, context: &StepContext<'_>, e: PipelineError) -> JobError {
        match e {
            PipelineError::Unsupported { .. } | PipelineError::InvalidArgument { .. } => {
                context.refused(e)
            }
            other => JobError::from_pipeline(other, || context.cancel_reason())
                .within(&format!("step `{}`", context.step.name)),
        }
    }
}

/// Whether `needed` bytes of offloaded components fit in the host memory that is `free`
/// (model offload keeps them there, outside the device's budget); 0 free means unknown.
fn host_room(needed: u64, free: u64) -> Result<(), String> {
    if needed == 0 || free == 0 || needed <= free {
        return Ok(());
    }
    Err(format!(
        "model offload keeps {} of components in host memory, more than the {} free; run without `offload` or free memory",
        human_bytes(needed),
        human_bytes(free)
    ))
}

/// Refuses, before anything loads, a run whose arguments its class does not take or whose
/// step count the step's scheduler cannot take: the checks `dwctl validate` makes.
fn check_runs(
    context: &StepContext<'_>,
    spec: &PipelineStep,
    plan: &StepPlan,
    runs: &[Run],
) -> Result<(), JobError> {
    let shipped =
        schedule::read_scheduler_config(&plan.model_dir).map_err(|e| context.refused(e))?;
    let scheduler =
        shipped.map(|shipped| schedule::step_scheduler(shipped, spec.scheduler.as_ref()));
    for run in runs {
        let arguments = plan
            .class
            .check(&run.arguments)
            .map_err(|e| context.refused(format!("`{}`: {}", e.key, e.message)))?;
        let steps = schedule::requested_steps(plan.class, &arguments);
        if let (Some((Some(class), config)), Some(steps)) = (&scheduler, steps) {
            schedule::check_steps(class, config, steps).map_err(|e| context.refused(e))?;
        }
    }
    Ok(())
}

/// Notices for placement options the CPU (or this build) gives no effect. Offload runs
/// where the family builds it (`offloads`), and saves nothing on the CPU, whose memory is
/// the host's.
fn placement_notices(spec: &PipelineStep, device_name: &str, offloads: bool) -> Vec<String> {
    let options = &spec.options;
    let mut notices = Vec::new();
    let cpu = device_name.starts_with("cpu");
    match (options.offload.as_deref(), offloads, cpu) {
        (Some(offload), true, true) => notices.push(format!(
            "`offload: \"{offload}\"` saves no memory on {device_name}, whose memory is the host's: the large components are still placed one at a time"
        )),
        (Some(_), true, false) | (None, _, _) => {}
        (Some(offload), _, true) => notices.push(format!(
            "`offload: \"{offload}\"` has no effect on {device_name}, which is no accelerator: every component stays where the pipeline runs"
        )),
        (Some(offload), false, false) => notices.push(format!(
            "`offload: \"{offload}\"` is built for FLUX.1 and Stable Diffusion 3 pipelines; this pipeline's components stay on {device_name}"
        )),
    }
    if !options.exclude_from_cpu_offload.is_empty()
        && options.offload.as_deref() != Some("sequential")
    {
        notices.push(
            "`exclude_from_cpu_offload` applies only with `offload: \"sequential\"`, as in diffusers-workflow; it has no effect here".to_string(),
        );
    }
    if options.group_offload {
        notices.push(format!("`group_offload` has no effect on {device_name}: every component stays where the pipeline runs"));
    }
    if let Some(device) = options
        .device
        .as_deref()
        .filter(|d| !device_name.starts_with(d))
    {
        notices.push(format!("`device: \"{device}\"` is not this daemon's device; running on {device_name} (start dwd with --device to choose)"));
    }
    notices
}

#[cfg(test)]
mod tests {
    use super::host_room;

    #[test]
    fn offloaded_components_are_refused_when_host_memory_cannot_hold_them() {
        assert!(host_room(0, 10).is_ok());
        assert!(host_room(10, 10).is_ok());
        assert!(
            host_room(10, 0).is_ok(),
            "unknown free memory refuses nothing"
        );
        let e = host_room(3 << 30, 1 << 30).unwrap_err();
        assert!(
            e.contains("keeps 3.0 GiB of components in host memory, more than the 1.0 GiB free"),
            "{e}"
        );
    }
}
