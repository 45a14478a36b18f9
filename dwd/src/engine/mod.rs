//! The workflow engine: runs a workflow's steps in order on one device.
//!
//! A step runs once per combination of the earlier results it references ([`fanout`]):
//! a `pipeline` step resolves its model, takes each component from the cache (loading what
//! is missing) and runs every combination from one generator ([`pipeline`]); a
//! `pipeline_reference` runs an earlier step's pipeline again; a `task` runs a command on
//! values; a `workflow` step runs a child file. Each run's result is written as the step's
//! `result` asks ([`saving`](crate::saving)). Events go to a [`Host`]; the engine knows
//! nothing of jobs or connections. A run ends in a [`RunReport`]: timings, cache hits and
//! misses, and the typed error that stopped it.

mod context;
mod metadata;
mod pipeline;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use protocol::message::{CacheCounts, LogLevel, RunPlan, WorkflowInfo};
use protocol::units::KeepAlive;
use protocol::workflow::{read_source, Action, ChildWorkflow, Given, Severity, Step, Workflow};
use serde_json::{json, Map};

use crate::cache::{ComponentCache, ComponentKey};
use crate::failure::JobError;
use crate::fanout::{self, Artifact, Run, StepResults};
use crate::fetch::Fetcher;
use crate::host::Host;
use crate::inputs::resolve_path;
use crate::loading::{
    all_keys, evicted_component, missing, plan_step, planned_component, LoadCounts, PlanContext,
    StepPlan,
};
use crate::memory::{human_bytes, measured_bytes, release_freed_memory, Baseline};
use crate::pipelines::GeneratorKind;
use crate::tasks;
use context::StepContext;
use pipeline::PreparedPipeline;
#[cfg(debug_assertions)]
pub use pipeline::TEST_PANIC_PROMPT;

/// How deep child workflows may nest.
const MAX_WORKFLOW_DEPTH: usize = 8;

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

/// Runs workflows on one device with the daemon's component cache.
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
    /// Which of torch's generators a step's seed draws from.
    pub generator: GeneratorKind,
}

/// How a run went.
#[derive(Debug)]
pub struct RunReport {
    pub load_ms: u64,
    pub run_ms: u64,
    pub cache: CacheCounts,
    pub result: Result<(), JobError>,
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

impl RunCounters {
    fn count_loads(&mut self, counts: LoadCounts) {
        self.cache.hits += counts.hits;
        self.cache.misses += counts.misses;
        self.load_ms += counts.load_ms;
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
            generator: GeneratorKind::Cpu,
        }
    }

    /// What running `workflow` would load and evict, and whether it fits; loads nothing.
    pub fn plan(&self, workflow: &Workflow) -> Result<RunPlan, JobError> {
        let plans = self.plan_steps(workflow)?;
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
            workflow: WorkflowInfo {
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

    /// Each pipeline step's plan, by step name.
    fn plan_steps(&self, workflow: &Workflow) -> Result<Vec<(String, StepPlan)>, JobError> {
        let mut model_dirs = HashMap::new();
        let mut plans = Vec::new();
        for step in &workflow.steps {
            let Some(spec) = step.pipeline() else {
                continue;
            };
            let plan = plan_step(&PlanContext {
                workflow,
                step,
                spec,
                device: &self.device,
                device_name: &self.device_name,
                model_dirs: &model_dirs,
            })?;
            model_dirs.insert(step.name.clone(), plan.model_dir.clone());
            plans.push((step.name.clone(), plan));
        }
        Ok(plans)
    }

    /// Runs every step of `workflow`, reporting to `host`. Cancellation is checked before
    /// each step, each run of a step, each component load and each denoising step. What
    /// the run used stays loaded for `keep_alive` (the daemon's default when `None`).
    pub fn run(
        &self,
        workflow: &Workflow,
        keep_alive: Option<KeepAlive>,
        host: &dyn Host,
    ) -> RunReport {
        let started = Instant::now();
        let mut counters = RunCounters::default();
        let result = self
            .run_workflow(host, workflow, &mut counters, 0)
            .map(|_| ());
        // The run's pipelines hold their components; let go before keep-alive decides.
        counters.pipelines.clear();
        self.after_run(host, &counters.used, keep_alive);
        RunReport {
            load_ms: counters.load_ms,
            run_ms: started.elapsed().as_millis() as u64,
            cache: counters.cache,
            result,
        }
    }

    /// Runs a workflow's steps in order (the job's own, or a child's) and returns the
    /// items of its last step.
    fn run_workflow(
        &self,
        host: &dyn Host,
        workflow: &Workflow,
        counters: &mut RunCounters,
        depth: usize,
    ) -> Result<Vec<Artifact>, JobError> {
        for note in &workflow.notes {
            let level = match note.severity {
                Severity::Info => LogLevel::Info,
                Severity::Warning => LogLevel::Warn,
            };
            host.log(level, workflow.note_text(note));
        }
        let mut results = StepResults::default();
        let mut last = Vec::new();
        for step in &workflow.steps {
            let context = StepContext {
                host,
                workflow,
                step,
                results: &results,
                depth,
            };
            context.check_cancelled()?;
            let items = self.run_step(&context, counters)?;
            if step.release_pipeline {
                self.release_pipeline(host, step, counters);
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
    ) -> Result<Vec<Artifact>, JobError> {
        let step = context.step;
        let runs = step_runs(context)?;
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
                let prepared = self.prepare(context, spec, &runs, counters)?;
                let no_generator = spec.options.no_generator;
                let items =
                    self.run_pipeline(context, &prepared, &runs, spec.seed, no_generator)?;
                counters.pipelines.insert(step.name.clone(), prepared);
                Ok(items)
            }
            Action::Reference(spec) => {
                let prepared = counters
                    .pipelines
                    .get(&spec.reference_name)
                    .ok_or_else(|| {
                        context.refused(format!(
                            "the pipeline of step `{}` is not loaded (was it released?)",
                            spec.reference_name
                        ))
                    })?;
                self.run_pipeline(context, &prepared.clone(), &runs, spec.seed, false)
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
    ) -> Result<Vec<Artifact>, JobError> {
        let mut items = Vec::new();
        let metadata = context.metadata(json!({"task_command": command}));
        let workflow = context.workflow;
        let places = tasks::Places {
            workflow_dir: workflow.base_dir().to_path_buf(),
            cwd: workflow
                .cwd
                .clone()
                .unwrap_or_else(|| workflow.base_dir().to_path_buf()),
        };
        for run in runs {
            let output =
                tasks::run(command, run, &places, &self.fetcher).map_err(|e| context.refused(e))?;
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
    ) -> Result<Vec<Artifact>, JobError> {
        if context.depth >= MAX_WORKFLOW_DEPTH {
            return Err(context.refused(format!(
                "child workflows nest deeper than {MAX_WORKFLOW_DEPTH}; does `{}` include itself?",
                child.path
            )));
        }
        let path = resolve_path(context.workflow.base_dir(), &child.path);
        let source = read_source(&path).map_err(|e| context.refused(e))?;
        let mut items = Vec::new();
        for run in runs {
            let workflow = child_workflow(context, &path, &source, run)?;
            let depth = context.depth + 1;
            for item in self.run_workflow(context.host, &workflow, counters, depth)? {
                context.save(items.len(), &item, &context.metadata(json!({})))?;
                items.push(item);
            }
        }
        Ok(items)
    }

    /// Drops a step's pipeline once the step is done (`release_pipeline`).
    fn release_pipeline(&self, host: &dyn Host, step: &Step, counters: &mut RunCounters) {
        // The pipeline holds its components: let go of it before unloading them.
        let Some(keys) = counters.pipelines.remove(&step.name).map(|p| p.keys) else {
            return;
        };
        let cleared = self
            .cache
            .keep_alive(&keys, KeepAlive::For(std::time::Duration::ZERO));
        host.log(
            LogLevel::Info,
            format!(
                "step `{}`: released its pipeline ({} component(s), {})",
                step.name,
                cleared.unloaded,
                human_bytes(cleared.bytes_freed)
            ),
        );
    }

    /// After a run, whatever its outcome: apply its keep-alive to what it used, and warn if
    /// memory grew past the post-load baseline.
    fn after_run(&self, host: &dyn Host, used: &[ComponentKey], keep_alive: Option<KeepAlive>) {
        let keep_alive = keep_alive.unwrap_or(self.policy.keep_alive);
        let cleared = self.cache.keep_alive(used, keep_alive);
        // The run's intermediate tensors are freed by now (once the device has finished
        // with them); hand their memory back so that between runs the daemon holds what it
        // keeps, not what it once needed.
        let _ = self.device.synchronize();
        release_freed_memory();
        if cleared.unloaded > 0 {
            host.log(
                LogLevel::Info,
                format!(
                    "keep-alive 0: unloaded {} component(s), {}",
                    cleared.unloaded,
                    human_bytes(cleared.bytes_freed)
                ),
            );
        }
        if let Some(message) = self.growth_warning() {
            tracing::warn!("{message}");
            host.log(LogLevel::Warn, message);
        }
    }

    /// A warning when memory grew past the post-load baseline by more than the policy allows.
    fn growth_warning(&self) -> Option<String> {
        let baseline = self.baseline.get()?;
        let now = measured_bytes(&self.device);
        (now > baseline.saturating_add(self.policy.growth_warn_bytes)).then(|| {
            format!(
                "memory grew by {} since the models were loaded ({} then, {} now; --growth-warn {})",
                human_bytes(now - baseline),
                human_bytes(baseline),
                human_bytes(now),
                human_bytes(self.policy.growth_warn_bytes)
            )
        })
    }
}

/// The runs of a step: one per combination of the earlier results its arguments name (a
/// task's `inputs` list its runs itself).
fn step_runs(context: &StepContext<'_>) -> Result<Vec<Run>, JobError> {
    match &context.step.action {
        Action::Task(task) => match &task.inputs {
            Some(inputs) => Ok(fanout::input_runs(inputs)),
            None => context.runs(task.arguments.as_ref().unwrap_or(&Map::new())),
        },
        Action::Pipeline(spec) => context.runs(&spec.arguments_json),
        Action::Reference(spec) => context.runs(&spec.arguments_json),
        Action::Workflow(child) => context.runs(&child.arguments),
    }
}

/// A child workflow parsed with one run's arguments as its variables, taking its parent
/// step's seed unless it has its own.
fn child_workflow(
    context: &StepContext<'_>,
    path: &std::path::Path,
    source: &str,
    run: &Run,
) -> Result<Workflow, JobError> {
    if let Some((unbound, artifact)) = run.bound.iter().next() {
        return Err(context.refused(format!(
            "`{unbound}` takes {} from `previous_result:`; a child workflow's arguments take JSON values",
            artifact.describe()
        )));
    }
    let given: Vec<(String, Given)> = run
        .arguments
        .iter()
        .map(|(k, v)| (k.clone(), Given::Json(v.clone())))
        .collect();
    let mut workflow =
        Workflow::parse_with(path, source, &given).map_err(|e| JobError::refused(e.to_string()))?;
    if context.step.seed.is_some() {
        inherit_seed(&mut workflow, context.step.seed);
    }
    Ok(workflow)
}

/// A child workflow takes its parent step's seed unless it has its own.
fn inherit_seed(workflow: &mut Workflow, seed: Option<u64>) {
    for step in &mut workflow.steps {
        if step.seed.is_none() {
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

/// `cpu`, `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
