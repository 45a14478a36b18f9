//! The engine runs a workflow for any `Host`, not only for a queued job: these tests drive
//! it directly with a recording host and the test-only `DwTestNoisePipeline` family, and
//! pin down what the engine reports (progress, outputs) and how a host stops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::Device;
use dwd::cache::ComponentCache;
use dwd::engine::{Engine, MemoryPolicy};
use dwd::failure::JobError;
use dwd::host::{CancelReason, Host};
use protocol::message::{LogLevel, OutputDescriptor, Phase};
use protocol::shm::SealedSegment;
use protocol::workflow::Workflow;

/// Remembers what the engine told it; says "cancel" once `cancel` is set.
#[derive(Default)]
struct RecordingHost {
    progress: Mutex<Vec<(String, Phase, u32, u32)>>,
    outputs: Mutex<Vec<OutputDescriptor>>,
    logs: Mutex<Vec<String>>,
    cancel: AtomicBool,
    /// Cancel once this many progress reports came.
    cancel_after: Option<usize>,
}

impl Host for RecordingHost {
    fn job_id(&self) -> u64 {
        7
    }

    fn log(&self, _level: LogLevel, message: String) {
        self.logs.lock().unwrap().push(message);
    }

    fn progress(&self, step: &str, phase: Phase, i: u32, n: u32) {
        let mut progress = self.progress.lock().unwrap();
        progress.push((step.to_string(), phase, i, n));
        if self.cancel_after.is_some_and(|n| progress.len() >= n) {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    fn output(&self, descriptor: OutputDescriptor, _segment: SealedSegment) {
        self.outputs.lock().unwrap().push(descriptor);
    }

    fn cancelled(&self) -> Option<CancelReason> {
        self.cancel
            .load(Ordering::SeqCst)
            .then_some(CancelReason::Client)
    }
}

/// A workflow running the test family from a folder whose model_index.json names it.
fn noise_workflow(dir: &std::path::Path, steps: u32) -> Workflow {
    let model = dir.join("noise-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("model_index.json"),
        r#"{"_class_name": "DwTestNoisePipeline"}"#,
    )
    .unwrap();
    let text = format!(
        r#"{{"id": "noise", "steps": [{{"name": "draw",
            "pipeline": {{"configuration": {{"component_type": "DiffusionPipeline"}},
              "from_pretrained_arguments": {{"model_name": "{}"}},
              "arguments": {{"height": 4, "width": 6, "num_inference_steps": {steps}}}, "seed": 3}},
            "result": {{"content_type": "image/png"}}}}]}}"#,
        model.display()
    );
    let path = dir.join("noise.json");
    Workflow::parse(&path, &text, &[]).unwrap()
}

fn engine() -> Engine {
    Engine::new(
        ComponentCache::with_budget(1 << 30),
        Device::Cpu,
        MemoryPolicy::default(),
    )
}

#[test]
fn the_engine_reports_progress_and_outputs_to_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = noise_workflow(dir.path(), 3);
    let host = RecordingHost::default();
    let report = engine().run(&workflow, None, &host);
    assert!(report.result.is_ok(), "{:?}", report.result);
    let progress = host.progress.lock().unwrap().clone();
    let denoising: Vec<_> = progress
        .iter()
        .filter(|p| p.1 == Phase::Denoising)
        .map(|p| (p.2, p.3))
        .collect();
    assert_eq!(denoising, [(0, 3), (1, 3), (2, 3)]);
    let outputs = host.outputs.lock().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(
        (outputs[0].job_id, outputs[0].shape.clone()),
        (7, vec![4, 6, 3])
    );
}

#[test]
fn a_host_that_cancels_stops_the_run_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = noise_workflow(dir.path(), 50);
    let host = RecordingHost {
        cancel_after: Some(2),
        ..RecordingHost::default()
    };
    let report = engine().run(&workflow, None, &host);
    assert!(
        matches!(
            report.result,
            Err(JobError::Cancelled(CancelReason::Client))
        ),
        "{:?}",
        report.result
    );
    assert!(host.progress.lock().unwrap().len() < 50);
    assert!(host.outputs.lock().unwrap().is_empty());
}
