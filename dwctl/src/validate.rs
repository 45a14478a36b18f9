//! `dwctl validate`: everything about a workflow that needs no weights and no daemon.
//!
//! The file is parsed exactly as the daemon parses it (schema, keys, classes, arguments,
//! variables, references, tasks); child workflows are read and checked too; each model it
//! names is looked up where the daemon would find it. A model missing from this machine is
//! a warning, so CI can lint workflows where no models are, unless `--require-models`.

use crate::stdout::outln;
use std::path::Path;

use protocol::families::{self, schedule};
use protocol::models::{hub_cache_dir, resolve_model};
use protocol::workflow::{
    Action, Arguments, Given, PipelineClass, PipelineStep, Position, PreviousResult, Step,
    Workflow, WorkflowError,
};
use serde_json::Value;

use crate::exit::{Failure, EXIT_INVALID, EXIT_OK};

/// How deep child workflows are followed.
const MAX_DEPTH: usize = 8;

/// Checks `path` and prints what it found; the exit code says whether it is valid.
pub fn validate(path: &Path, assignments: &[String], require_models: bool) -> Result<u8, Failure> {
    let workflow = Workflow {
        cwd: std::env::current_dir().ok(),
        ..Workflow::load(path, assignments)
            .map_err(|e| Failure::new(EXIT_INVALID, e.to_string()))?
    };
    let mut problems = Problems::default();
    check(&workflow, 0, &mut problems);
    for warning in &problems.warnings {
        eprintln!("{warning}");
    }
    if let Some(error) = problems.errors.first() {
        return Err(Failure::new(EXIT_INVALID, error.clone()));
    }
    if require_models {
        if let Some(missing) = problems.missing_models.first() {
            return Err(Failure::new(EXIT_INVALID, missing.clone()));
        }
    }
    for missing in &problems.missing_models {
        eprintln!("{missing}");
    }
    let steps: Vec<String> = workflow.steps.iter().map(describe_step).collect();
    outln!(
        "{}: ok: workflow `{}`, {} step(s): {}",
        path.display(),
        workflow.id,
        steps.len(),
        steps.join(", ")
    );
    Ok(EXIT_OK)
}

/// What a check found beyond the parse itself.
#[derive(Default)]
struct Problems {
    warnings: Vec<String>,
    errors: Vec<String>,
    missing_models: Vec<String>,
}

fn check(workflow: &Workflow, depth: usize, problems: &mut Problems) {
    problems
        .warnings
        .extend(workflow.notes.iter().map(|n| workflow.note_text(n)));
    for step in &workflow.steps {
        match &step.action {
            Action::Pipeline(pipeline) => {
                let at = pipeline.model_name_at;
                if let Some(dir) = check_model(workflow, &pipeline.model_name, at, problems) {
                    check_resolved_class(workflow, pipeline, &dir, problems);
                }
                for component in &pipeline.components {
                    check_model(workflow, &component.model_name, component.at, problems);
                }
            }
            Action::Workflow(child) if depth < MAX_DEPTH => {
                check_child(workflow, step, depth, problems)
            }
            Action::Workflow(child) => problems.errors.push(located(
                workflow,
                child.path_at,
                format!(
                    "child workflows nest deeper than {MAX_DEPTH}; does `{}` include itself?",
                    child.path
                ),
            )),
            _ => {}
        }
    }
}

/// An auto class resolved from the model's folder, as the daemon will resolve it, with the
/// arguments checked against the class it resolves to.
fn check_resolved_class(
    workflow: &Workflow,
    pipeline: &PipelineStep,
    dir: &Path,
    problems: &mut Problems,
) {
    let at = pipeline.model_name_at;
    let index = families::ModelIndex::read(dir);
    let class = match families::class_for_folder(&pipeline.component_type, pipeline.class, &index) {
        Ok(class) => class,
        Err(message) => return problems.errors.push(located(workflow, at, message)),
    };
    if let Some(family) = families::family(class.family) {
        let supplied = pipeline.supplied_components();
        if let Err(
            families::FolderComponentError::Missing(m)
            | families::FolderComponentError::WrongClass(m),
        ) = families::check_folder_components(family, &index, &supplied)
        {
            problems.errors.push(located(workflow, at, m));
        }
    }
    match class.check(&pipeline.arguments_json) {
        Ok(arguments) => check_schedule(workflow, pipeline, class, &arguments, dir, problems),
        Err(e) => {
            let message = format!(
                "`{}` resolves to {} here: {}",
                pipeline.component_type, class.name, e.message
            );
            problems.errors.push(located(workflow, at, message));
        }
    }
}

/// The step count against the scheduler the step runs, built from the model folder's
/// `scheduler_config.json` as the daemon builds it, with the same check the daemon makes
/// before loading.
fn check_schedule(
    workflow: &Workflow,
    pipeline: &PipelineStep,
    class: &PipelineClass,
    arguments: &Arguments,
    dir: &Path,
    problems: &mut Problems,
) {
    let at = pipeline.model_name_at;
    let shipped = match schedule::read_scheduler_config(dir) {
        Ok(Some(shipped)) => shipped,
        Ok(None) => return,
        Err(e) => return problems.errors.push(located(workflow, at, e)),
    };
    let (Some(scheduler), config) = schedule::step_scheduler(shipped, pipeline.scheduler.as_ref())
    else {
        return;
    };
    if let Some(steps) = schedule::requested_steps(class, arguments) {
        if let Err(e) = schedule::check_steps(&scheduler, &config, steps) {
            problems.errors.push(located(workflow, at, e));
        }
    }
}

/// The model's folder, or a missing-model warning.
fn check_model(
    workflow: &Workflow,
    name: &str,
    at: Position,
    problems: &mut Problems,
) -> Option<std::path::PathBuf> {
    let hub = hub_cache_dir();
    match resolve_model(name, &workflow.model_places(hub.as_deref())) {
        Ok(dir) => Some(dir),
        Err(e) => {
            problems.missing_models.push(located(
                workflow,
                at,
                format!("warning: {e} (the run needs it; --require-models makes this an error)"),
            ));
            None
        }
    }
}

/// A child workflow is parsed with the arguments that are known now; those that take an
/// earlier step's results are filled in when it runs.
fn check_child(workflow: &Workflow, step: &Step, depth: usize, problems: &mut Problems) {
    let Action::Workflow(child) = &step.action else {
        return;
    };
    let path = workflow.base_dir().join(&child.path);
    let given: Vec<(String, Given)> = child
        .arguments
        .iter()
        .filter(|(_, v)| !mentions_previous_result(v))
        .map(|(k, v)| (k.clone(), Given::Json(v.clone())))
        .collect();
    let parsed = protocol::workflow::read_source(&path)
        .and_then(|source| Workflow::parse_with(&path, &source, &given));
    match parsed {
        Ok(child) => check(
            &Workflow {
                cwd: workflow.cwd.clone(),
                ..child
            },
            depth + 1,
            problems,
        ),
        Err(e) => problems
            .errors
            .push(format!("{}\n  (child workflow of step `{}`)", e, step.name)),
    }
}

fn mentions_previous_result(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(mentions_previous_result),
        Value::Object(map) => map.values().any(mentions_previous_result),
        other => PreviousResult::parse(other).is_some(),
    }
}

fn located(workflow: &Workflow, at: Position, message: String) -> String {
    WorkflowError {
        file: workflow.path.clone(),
        position: Some(at),
        pointer: None,
        message,
    }
    .to_string()
}

/// One step as `validate` lists it: its name and what it runs.
fn describe_step(step: &Step) -> String {
    match &step.action {
        Action::Pipeline(p) => format!("{} ({} on {})", step.name, p.component_type, p.model_name),
        Action::Reference(r) => format!("{} (pipeline of `{}`)", step.name, r.reference_name),
        Action::Workflow(w) => format!("{} (workflow {})", step.name, w.path),
        Action::Task(t) => format!("{} (task {})", step.name, t.command),
    }
}
