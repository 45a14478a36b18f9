//! The workflow engine: runs a job's steps in order.
//!
//! A step runs once per combination of the earlier results it references ([`fanout`]):
//! a `pipeline` step resolves its model, takes each component from the cache (loading what
//! is missing) and runs every combination from one generator; a `pipeline_reference` runs
//! an earlier step's pipeline again; a `task` runs a command on values; a `workflow` step
//! runs a child file. Each run's result is written as the step's `result` asks
//! ([`saving`]). The engine returns the run's summary: outcome, timings and cache hits and
//! misses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use protocol::message::{
    CacheCounts, ErrorKind, LogLevel, Outcome, Phase, RunError, RunPlan, RunSummary, Timings,
};
use protocol::units::KeepAlive;
use protocol::workflow::{
    read_source, Action, ChildWorkflow, Given, OutputType, PipelineKind, PipelineStep,
    SchedulerSpec, Severity, StableDiffusionArguments, Step, Workflow,
};
use serde_json::{json, Map, Value};

use crate::cache::{ComponentCache, ComponentKey};
use crate::fanout::{self, Artifact, Run, StepResults};
use crate::fetch::Fetcher;
use crate::inputs::{bound_images, images_to_tensor, load_images, load_latents, resolve_path};
use crate::loading::{
    all_keys, evicted_component, load_pipeline, missing, plan_step, planned_component, LoadCounts,
    LoadError, StepPlan,
};
use crate::memory::{
    available_ram_bytes, device_memory, human_bytes, measured_bytes, release_freed_memory, Baseline,
};
use crate::pipelines::noise::SeededNoise;
use crate::pipelines::{
    self, images_to_rgb8, GenerateArgs, PipelineError, RgbImage, StableDiffusionPipeline,
};
use crate::queue::{CancelReason, Job, JobEvent};
use crate::saving::{Destination, Metadata};
use crate::tasks;

/// How deep child workflows may nest.
const MAX_WORKFLOW_DEPTH: usize = 8;

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
            LoadError::Cancelled => StepError::Cancelled(CancelReason::Client),
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
    /// How images named by URL are fetched.
    pub fetcher: Fetcher,
    /// What the memory budget is a share of, for status.
    pub budget_source: String,
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
    /// Pipelines of finished `pipeline` steps, for `pipeline_reference` (child workflows
    /// share them, as in diffusers-workflow).
    pipelines: HashMap<String, PreparedPipeline>,
}

/// A pipeline assembled for one step, and how it was configured.
#[derive(Clone)]
struct PreparedPipeline {
    pipeline: Arc<StableDiffusionPipeline>,
    kind: PipelineKind,
    model_name: String,
    scheduler: Option<SchedulerSpec>,
    /// `configuration.vae.enable_slicing`.
    vae_slicing: bool,
    /// `configuration.vae.enable_tiling`.
    vae_tiling: bool,
    /// Its components in the cache.
    keys: Vec<ComponentKey>,
}

/// The step being run, and where it sits.
struct StepContext<'a> {
    job: &'a Job,
    workflow: &'a Workflow,
    step: &'a Step,
    results: &'a StepResults,
    depth: usize,
}

impl StepContext<'_> {
    fn log(&self, level: LogLevel, message: String) {
        self.job.send(JobEvent::Log { level, message });
    }

    /// An invalid input of this step: `file: step `name`: what`.
    fn invalid(&self, e: impl std::fmt::Display) -> StepError {
        StepError::Invalid(format!(
            "{}: step `{}`: {e}",
            self.workflow.path.display(),
            self.step.name
        ))
    }

    fn runs(&self, template: &Map<String, Value>) -> Result<Vec<Run>, StepError> {
        fanout::runs(template, self.results).map_err(|e| self.invalid(e))
    }

    fn save(&self, run: usize, item: &Artifact, metadata: &Metadata) -> Result<(), StepError> {
        let destination = Destination {
            job: self.job,
            workflow_id: &self.workflow.id,
            step: self.step,
        };
        destination
            .save(run, item, metadata)
            .map_err(|e| StepError::Failed(format!("{}: {e}", self.workflow.path.display())))
    }

    /// diffusers-workflow's metadata JSON (`step_name`, plus `extra`), with ours.
    fn metadata(&self, extra: Value) -> Metadata {
        let mut dw = json!({
            "step_name": self.step.name,
            "workflow_id": self.workflow.id,
            "workflow_sha256": self.workflow.sha256,
        });
        if let (Value::Object(dw), Value::Object(extra)) = (&mut dw, extra) {
            dw.extend(extra);
        }
        Metadata {
            parameters: Vec::new(),
            dw: crate::saving::bounded_json(&dw, crate::saving::MAX_METADATA_BYTES / 8).to_string(),
        }
    }

    /// Metadata of one pipeline run: dw's `model_name` and `arguments`, the seed and
    /// scheduler, and the AUTOMATIC1111 text for each image.
    fn pipeline_metadata(
        &self,
        prepared: &PreparedPipeline,
        args: &GenerateArgs,
        seed: u64,
        run: &Run,
        output: &Generated,
    ) -> Metadata {
        let scheduler_type = args
            .scheduler_type
            .clone()
            .or_else(|| prepared.pipeline.scheduler.class_name.clone())
            .unwrap_or_else(|| "DDIMScheduler".to_string());
        let mut metadata = self.metadata(json!({
            "model_name": prepared.model_name,
            "arguments": run.arguments,
            "seed": seed,
            "scheduler": scheduler_type,
        }));
        if let Generated::Images(images) = output {
            let per_prompt = args.num_images_per_prompt.max(1);
            metadata.parameters = images
                .iter()
                .enumerate()
                .map(|(i, image)| {
                    let prompt = args
                        .prompts
                        .get(i / per_prompt)
                        .map(String::as_str)
                        .unwrap_or("");
                    a1111_parameters(&Generation {
                        prompt,
                        negative: args.negative_prompt.as_deref().unwrap_or(""),
                        steps: args.num_inference_steps,
                        scheduler_type: &scheduler_type,
                        cfg: args.guidance_scale,
                        seed,
                        width: image.width,
                        height: image.height,
                        model: &prepared.model_name,
                    })
                })
                .collect();
        }
        metadata
    }
}

/// A child workflow takes its parent step's seed unless it has its own.
fn inherit_seed(workflow: &mut Workflow, seed: Option<u64>) {
    for step in &mut workflow.steps {
        let inherited = step.seed.is_none();
        if inherited {
            step.seed = seed;
        }
        let pipeline_seed = match &mut step.action {
            Action::Pipeline(p) => &mut p.seed,
            Action::Reference(r) => &mut r.seed,
            _ => continue,
        };
        if pipeline_seed.is_none() {
            *pipeline_seed = seed;
        }
    }
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
            fetcher: Fetcher::default(),
            budget_source: String::new(),
        }
    }

    /// What running `workflow` would load and evict, and whether it fits; loads nothing.
    pub fn plan(&self, workflow: &Workflow) -> Result<RunPlan, String> {
        let mut model_dirs = HashMap::new();
        let mut plans: Vec<(String, StepPlan)> = Vec::new();
        for step in &workflow.steps {
            let Some(spec) = step.pipeline() else {
                continue;
            };
            let plan = plan_step(
                workflow,
                step,
                spec,
                &self.device,
                &self.device_name,
                &model_dirs,
            )
            .map_err(|e| e.to_string())?;
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
    /// each step, each run of a step, each component load and each denoising step.
    pub fn run(&self, job: &Job) -> RunSummary {
        let started = Instant::now();
        let mut counters = RunCounters::default();
        let result = self
            .run_workflow(job, &job.workflow, &mut counters, 0)
            .map(|_| ());
        // The run's pipelines hold their components; let go before keep-alive decides.
        counters.pipelines.clear();
        self.after_run(job, &counters.used);
        let run_ms = started.elapsed().as_millis() as u64;
        let timings = Timings {
            load_ms: counters.load_ms,
            run_ms,
            total_ms: job.accepted_at.elapsed().as_millis() as u64,
        };
        let error = match result {
            Ok(()) => None,
            Err(StepError::Cancelled(reason)) => {
                let summary = job.cancelled_summary(reason, run_ms);
                return RunSummary {
                    timings,
                    cache: counters.cache,
                    ..summary
                };
            }
            Err(StepError::Invalid(message)) => Some((ErrorKind::InvalidWorkflow, message)),
            Err(StepError::Failed(message)) => Some((ErrorKind::Failed, message)),
            Err(StepError::OverBudget(message)) => Some((ErrorKind::OverBudget, message)),
        };
        RunSummary {
            job_id: job.id,
            outcome: if error.is_some() {
                Outcome::Failed
            } else {
                Outcome::Finished
            },
            workflow: job.workflow_info(),
            timings,
            cache: counters.cache,
            error: error.map(|(kind, message)| RunError { kind, message }),
        }
    }

    /// Runs a workflow's steps in order (the job's own, or a child's) and returns the
    /// items of its last step.
    fn run_workflow(
        &self,
        job: &Job,
        workflow: &Workflow,
        counters: &mut RunCounters,
        depth: usize,
    ) -> Result<Vec<Artifact>, StepError> {
        for note in &workflow.notes {
            let level = match note.severity {
                Severity::Info => LogLevel::Info,
                Severity::Warning => LogLevel::Warn,
            };
            job.send(JobEvent::Log {
                level,
                message: workflow.note_text(note),
            });
        }
        let mut results = StepResults::default();
        let mut last = Vec::new();
        for step in &workflow.steps {
            if let Some(reason) = job.cancel.reason() {
                return Err(StepError::Cancelled(reason));
            }
            let context = StepContext {
                job,
                workflow,
                step,
                results: &results,
                depth,
            };
            let items = self.run_step(&context, counters)?;
            if step.release_pipeline {
                self.release_pipeline(job, step, counters);
            }
            results.record(&step.name, items.clone());
            last = items;
        }
        Ok(last)
    }

    fn run_step(
        &self,
        context: &StepContext<'_>,
        counters: &mut RunCounters,
    ) -> Result<Vec<Artifact>, StepError> {
        let step = context.step;
        let runs = match &step.action {
            Action::Task(task) => match &task.inputs {
                Some(inputs) => fanout::input_runs(inputs),
                None => context.runs(task.arguments.as_ref().unwrap_or(&Map::new()))?,
            },
            Action::Pipeline(spec) => context.runs(&spec.arguments_json)?,
            Action::Reference(spec) => context.runs(&spec.arguments_json)?,
            Action::Workflow(child) => context.runs(&child.arguments)?,
        };
        if runs.is_empty() {
            context.log(
                LogLevel::Warn,
                format!(
                    "step `{}`: its `previous_result:` references hold nothing, so it does not run",
                    step.name
                ),
            );
            return Ok(Vec::new());
        }
        match &step.action {
            Action::Pipeline(spec) => {
                let prepared = self.prepare(context, spec, counters)?;
                let items = self.run_pipeline(
                    context,
                    &prepared,
                    &runs,
                    spec.seed,
                    spec.options.no_generator,
                )?;
                counters.pipelines.insert(step.name.clone(), prepared);
                Ok(items)
            }
            Action::Reference(spec) => {
                let prepared = counters
                    .pipelines
                    .get(&spec.reference_name)
                    .cloned()
                    .ok_or_else(|| {
                        StepError::Invalid(format!(
                            "step `{}`: the pipeline of step `{}` is not loaded (was it released?)",
                            step.name, spec.reference_name
                        ))
                    })?;
                let prepared = PreparedPipeline {
                    kind: spec.kind,
                    ..prepared
                };
                self.run_pipeline(context, &prepared, &runs, spec.seed, false)
            }
            Action::Task(task) => self.run_task(context, &task.command, &runs),
            Action::Workflow(child) => self.run_child(context, child, &runs, counters),
        }
    }

    fn run_task(
        &self,
        context: &StepContext<'_>,
        command: &str,
        runs: &[Run],
    ) -> Result<Vec<Artifact>, StepError> {
        let mut items = Vec::new();
        let metadata = context.metadata(json!({"task_command": command}));
        let places = tasks::Places {
            workflow_dir: context.workflow.base_dir().to_path_buf(),
            cwd: context
                .workflow
                .cwd
                .clone()
                .unwrap_or_else(|| context.workflow.base_dir().to_path_buf()),
        };
        for run in runs {
            let output =
                tasks::run(command, run, &places, &self.fetcher).map_err(|e| context.invalid(e))?;
            for item in output {
                context.save(items.len(), &item, &metadata)?;
                items.push(item);
            }
        }
        Ok(items)
    }

    /// A child workflow runs once per run of the step, with the run's arguments as its
    /// variables; its own steps write under its own id, and its last step's items are
    /// this step's result.
    fn run_child(
        &self,
        context: &StepContext<'_>,
        child: &ChildWorkflow,
        runs: &[Run],
        counters: &mut RunCounters,
    ) -> Result<Vec<Artifact>, StepError> {
        if context.depth >= MAX_WORKFLOW_DEPTH {
            return Err(context.invalid(format!(
                "child workflows nest deeper than {MAX_WORKFLOW_DEPTH}; does `{}` include itself?",
                child.path
            )));
        }
        let path = resolve_path(context.workflow.base_dir(), &child.path);
        let source = read_source(&path).map_err(|e| context.invalid(e))?;
        let mut items = Vec::new();
        for run in runs {
            if let Some(unbound) = run.bound.keys().next() {
                return Err(context.invalid(format!("`{unbound}` takes {} from `previous_result:`; a child workflow's arguments take JSON values", run.bound[unbound].describe())));
            }
            let given: Vec<(String, Given)> = run
                .arguments
                .iter()
                .map(|(k, v)| (k.clone(), Given::Json(v.clone())))
                .collect();
            let mut workflow = Workflow::parse_with(&path, &source, &given)
                .map_err(|e| StepError::Invalid(e.to_string()))?;
            if context.step.seed.is_some() {
                inherit_seed(&mut workflow, context.step.seed);
            }
            for item in self.run_workflow(context.job, &workflow, counters, context.depth + 1)? {
                context.save(items.len(), &item, &context.metadata(json!({})))?;
                items.push(item);
            }
        }
        Ok(items)
    }

    /// Drops a step's pipeline once the step is done (`release_pipeline`).
    fn release_pipeline(&self, job: &Job, step: &Step, counters: &mut RunCounters) {
        // The pipeline holds its components: let go of it before unloading them.
        let Some(keys) = counters.pipelines.remove(&step.name).map(|p| p.keys) else {
            return;
        };
        let cleared = self
            .cache
            .keep_alive(&keys, KeepAlive::For(std::time::Duration::ZERO));
        job.send(JobEvent::Log {
            level: LogLevel::Info,
            message: format!(
                "step `{}`: released its pipeline ({} component(s), {})",
                step.name,
                cleared.unloaded,
                human_bytes(cleared.bytes_freed)
            ),
        });
    }

    /// Runs a pipeline once per run, all runs drawing from the step's one generator.
    fn run_pipeline(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        runs: &[Run],
        seed: Option<u64>,
        no_generator: bool,
    ) -> Result<Vec<Artifact>, StepError> {
        let step = context.step;
        let seed = match seed.filter(|_| !no_generator) {
            Some(seed) => seed,
            None => {
                let seed = rand::random();
                context.log(
                    LogLevel::Info,
                    format!("step `{}`: no seed given, using {seed}", step.name),
                );
                seed
            }
        };
        let mut noise = SeededNoise::new(seed);
        let mut items = Vec::with_capacity(runs.len());
        for (index, run) in runs.iter().enumerate() {
            if let Some(reason) = context.job.cancel.reason() {
                return Err(StepError::Cancelled(reason));
            }
            let generate = self.generate_args(context, prepared, run)?;
            self.admit(context, prepared, &generate)?;
            let output = self.generate(context, prepared, &generate, &mut noise)?;
            let metadata = context.pipeline_metadata(prepared, &generate, seed, run, &output);
            let item = match output {
                Generated::Images(images) => {
                    Artifact::Images(images.into_iter().map(Arc::new).collect())
                }
                Generated::Latents(latents) => Artifact::Latents(latents),
            };
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
        generate: &GenerateArgs,
    ) -> Result<(), StepError> {
        let needed = prepared
            .pipeline
            .activation_bytes(generate)
            .map_err(|e| pipeline_error(context, e))?;
        let (free, kind) = match device_memory(&self.device) {
            Some((used, total)) => (total.saturating_sub(used), "device memory"),
            None => (available_ram_bytes(), "memory"),
        };
        if free == 0 || needed <= free {
            return Ok(());
        }
        Err(StepError::OverBudget(format!(
            "step `{}`: this run needs about {} for its work ({} image(s) of {}x{}), more than the {} of {kind} free; ask for fewer or smaller images, or set `configuration.vae.enable_tiling`",
            context.step.name,
            human_bytes(needed),
            generate.prompts.len() * generate.num_images_per_prompt,
            generate.width.map_or("default".to_string(), |w| w.to_string()),
            generate.height.map_or("default".to_string(), |h| h.to_string()),
            human_bytes(free),
        )))
    }

    /// One run's typed arguments, with the images and latents bound to it.
    fn generate_args(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        run: &Run,
    ) -> Result<GenerateArgs, StepError> {
        let args = StableDiffusionArguments::from_json(&run.arguments, prepared.kind)
            .map_err(|e| context.invalid(format!("`{}`: {}", e.key, e.message)))?;
        if let Some((key, value)) = run
            .bound
            .iter()
            .find(|(k, _)| *k != "image" && *k != "latents")
        {
            return Err(context.invalid(format!(
                "`{key}` cannot take {} from `previous_result:`",
                value.describe()
            )));
        }
        if args.prompt.0.is_empty() {
            return Err(context.invalid("`prompt` must be text or a list of texts"));
        }
        let base_dir = context.workflow.base_dir();
        let latents = match (run.bound.get("latents"), args.latents.as_deref()) {
            (Some(Artifact::Latents(t)), _) => Some(t.clone()),
            (Some(other), _) => {
                return Err(
                    context.invalid(format!("`latents` takes latents, not {}", other.describe()))
                )
            }
            (None, Some(path)) => {
                Some(load_latents(&resolve_path(base_dir, path)).map_err(|e| context.invalid(e))?)
            }
            (None, None) => None,
        };
        let init_image = match (&args.image, run.bound.get("image")) {
            (_, Some(artifact)) => Some(
                images_to_tensor(&bound_images(artifact).map_err(|e| context.invalid(e))?)
                    .map_err(|e| context.invalid(e))?,
            ),
            (Some(source), None) => Some(
                images_to_tensor(
                    &load_images(source, base_dir, &self.fetcher)
                        .map_err(|e| context.invalid(e))?,
                )
                .map_err(|e| context.invalid(e))?,
            ),
            (None, None) => None,
        };
        #[cfg(debug_assertions)]
        if args.prompt.0.iter().any(|p| p == TEST_PANIC_PROMPT) {
            panic!("a test asked this job to panic");
        }
        let scheduler = prepared.scheduler.as_ref();
        Ok(GenerateArgs {
            prompts: args.prompt.0.clone(),
            negative_prompt: args.negative_prompt.clone(),
            num_inference_steps: args.num_inference_steps,
            guidance_scale: args.guidance_scale,
            height: args.height,
            width: args.width,
            num_images_per_prompt: args.num_images_per_prompt,
            seed: 0,
            latents,
            scheduler_type: scheduler.map(|s| s.scheduler_type.clone()),
            scheduler_overrides: scheduler
                .map(|s| s.from_config_args.clone())
                .unwrap_or_default(),
            init_image,
            strength: args.strength,
            output_latents: args.output_type == OutputType::Latent,
            vae_slicing: prepared.vae_slicing,
            vae_tiling: prepared.vae_tiling,
        })
    }

    fn generate(
        &self,
        context: &StepContext<'_>,
        prepared: &PreparedPipeline,
        generate: &GenerateArgs,
        noise: &mut SeededNoise,
    ) -> Result<Generated, StepError> {
        let job = context.job;
        let step = &context.step.name;
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
                step: step.clone(),
                phase,
                i: progress.step as u32,
                n: progress.total as u32,
            });
            Ok(())
        };
        let output = prepared
            .pipeline
            .generate_with_noise(generate, noise, &mut on_progress)
            .map_err(|e| pipeline_error(context, e))?;
        if generate.output_latents {
            return Ok(Generated::Latents(output));
        }
        images_to_rgb8(&output)
            .map(Generated::Images)
            .map_err(|e| pipeline_error(context, e))
    }

    /// Resolves the step's model, makes room for what is missing (or refuses before
    /// loading anything), and takes each component from the cache.
    fn prepare(
        &self,
        context: &StepContext<'_>,
        spec: &PipelineStep,
        counters: &mut RunCounters,
    ) -> Result<PreparedPipeline, StepError> {
        let step = context.step;
        let plan = plan_step(
            context.workflow,
            step,
            spec,
            &self.device,
            &self.device_name,
            &counters.model_dirs,
        )?;
        for notice in plan
            .dtype_notice
            .iter()
            .chain(&placement_notices(spec, &self.device_name))
        {
            context.log(LogLevel::Warn, notice.clone());
        }
        self.make_room(context, &plan)?;
        let mut counts = LoadCounts::default();
        let loaded = self.load(context, spec, &plan, &mut counts);
        counters.cache.hits += counts.hits;
        counters.cache.misses += counts.misses;
        counters.load_ms += counts.load_ms;
        let keys: Vec<ComponentKey> = plan.components.iter().map(|c| c.key.clone()).collect();
        counters.used.extend(keys.iter().cloned());
        counters
            .model_dirs
            .insert(step.name.clone(), plan.model_dir.clone());
        let pipeline = loaded?;
        if counts.misses > 0 {
            self.baseline.set(measured_bytes(&self.device));
        }
        Ok(PreparedPipeline {
            pipeline: Arc::new(pipeline),
            kind: spec.kind,
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
        spec: &PipelineStep,
        plan: &StepPlan,
        counts: &mut LoadCounts,
    ) -> Result<StableDiffusionPipeline, StepError> {
        let (job, step) = (context.job, context.step);
        let user = format!("{}:{}", context.workflow.id, step.name);
        let mut before_each = |i: usize| -> Result<(), LoadError> {
            if job.cancel.reason().is_some() {
                return Err(LoadError::Cancelled);
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
            plan,
            &self.cache,
            &self.device,
            spec.variant.as_deref(),
            &user,
            counts,
            &mut before_each,
        );
        loaded.map_err(|e| match e {
            LoadError::Cancelled => {
                StepError::Cancelled(job.cancel.reason().unwrap_or(CancelReason::Client))
            }
            LoadError::Failed(message) => {
                StepError::Failed(format!("step `{}`: {message}", step.name))
            }
            other => StepError::from(other),
        })
    }

    /// Unloads idle components until the plan fits, or refuses with the sizes.
    fn make_room(&self, context: &StepContext<'_>, plan: &StepPlan) -> Result<(), StepError> {
        let (missing_keys, needed) = missing(&[plan], &self.cache);
        if missing_keys.is_empty() {
            return Ok(());
        }
        let evicted = self
            .cache
            .make_room(needed, &all_keys(&[plan]))
            .map_err(|over| {
                StepError::OverBudget(format!("step `{}`: {over}", context.step.name))
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
}

/// What a pipeline run gave back.
enum Generated {
    Images(Vec<RgbImage>),
    Latents(Tensor),
}

fn pipeline_error(context: &StepContext<'_>, e: PipelineError) -> StepError {
    match e {
        PipelineError::Cancelled => {
            StepError::Cancelled(context.job.cancel.reason().unwrap_or(CancelReason::Client))
        }
        PipelineError::Unsupported { .. } | PipelineError::InvalidArgument { .. } => {
            context.invalid(e)
        }
        other => StepError::Failed(format!("step `{}`: {other}", context.step.name)),
    }
}

/// Notices for placement options the CPU (or this build) gives no effect.
fn placement_notices(spec: &PipelineStep, device_name: &str) -> Vec<String> {
    let options = &spec.options;
    let mut notices = Vec::new();
    if let Some(offload) = &options.offload {
        notices.push(format!("`offload: \"{offload}\"` has no effect on {device_name}: every component stays where the pipeline runs"));
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

/// What an image's AUTOMATIC1111 `parameters` text records.
struct Generation<'a> {
    prompt: &'a str,
    negative: &'a str,
    steps: usize,
    scheduler_type: &'a str,
    cfg: f64,
    seed: u64,
    width: usize,
    height: usize,
    model: &'a str,
}

/// The AUTOMATIC1111 `parameters` text that image tools read.
fn a1111_parameters(g: &Generation<'_>) -> String {
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        g.prompt,
        g.negative,
        g.steps,
        sampler_name(g.scheduler_type),
        g.cfg,
        g.seed,
        g.width,
        g.height,
        g.model
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
        let text = a1111_parameters(&Generation {
            prompt: "a fox",
            negative: "blurry",
            steps: 4,
            scheduler_type: "DDIMScheduler",
            cfg: 7.5,
            seed: 42,
            width: 64,
            height: 48,
            model: "tiny",
        });
        assert_eq!(
            text,
            "a fox\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny"
        );
    }
}
