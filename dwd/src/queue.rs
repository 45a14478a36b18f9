//! The job queue: one FIFO executor per device, cancellation, and what status reports.
//!
//! Connections submit jobs and read their events from a channel; a single executor thread
//! takes jobs in order and runs them, so two jobs never compete for the device. A job can be
//! cancelled at any time (its client hung up or asked, its timeout passed, the daemon is
//! stopping): the running job sees it before its next denoising step, a queued one when it
//! comes up.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::message::{
    ErrorKind, LogLevel, Outcome, OutputDescriptor, Phase, QueuedJob, RunError, RunSummary,
    Timings, WorkflowInfo,
};
use protocol::shm::SealedSegment;
use protocol::units::KeepAlive;
use protocol::workflow::Workflow;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::RunReport;
use crate::failure::JobError;
use crate::host::Host;

pub use crate::host::CancelReason;

/// A reason as the token stores it.
trait ReasonCode: Sized {
    fn code(self) -> u8;
    fn from_code(code: u8) -> Option<Self>;
}

impl ReasonCode for CancelReason {
    fn code(self) -> u8 {
        match self {
            CancelReason::Client => 1,
            CancelReason::Timeout => 2,
            CancelReason::Shutdown => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(CancelReason::Client),
            2 => Some(CancelReason::Timeout),
            3 => Some(CancelReason::Shutdown),
            _ => None,
        }
    }
}

/// Shared flag that says whether, and why, a job should stop. The first reason wins.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    state: Arc<AtomicU8>,
    deadline: Option<Instant>,
}

impl CancelToken {
    pub fn with_deadline(deadline: Option<Instant>) -> Self {
        CancelToken {
            state: Arc::default(),
            deadline,
        }
    }

    pub fn cancel(&self, reason: CancelReason) {
        let _ = self
            .state
            .compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the job must stop, if it must; a passed deadline counts as a timeout.
    pub fn reason(&self) -> Option<CancelReason> {
        if let Some(reason) = CancelReason::from_code(self.state.load(Ordering::SeqCst)) {
            return Some(reason);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.cancel(CancelReason::Timeout);
            return CancelReason::from_code(self.state.load(Ordering::SeqCst));
        }
        None
    }
}

/// What a job reports while it runs; the connection turns each into a frame.
pub enum JobEvent {
    Log {
        level: LogLevel,
        message: String,
    },
    Progress {
        step: String,
        phase: Phase,
        i: u32,
        n: u32,
    },
    Output {
        descriptor: OutputDescriptor,
        segment: SealedSegment,
    },
    Done(RunSummary),
}

/// A job: a parsed workflow and where its events go.
pub struct Job {
    pub id: u64,
    pub workflow: Workflow,
    pub cancel: CancelToken,
    pub accepted_at: Instant,
    pub events: UnboundedSender<JobEvent>,
    pub timeout_ms: Option<u64>,
    /// How long what the job used stays loaded (milliseconds, negative: forever); `None`
    /// for the daemon's default.
    pub keep_alive_ms: Option<i64>,
    /// The submitting client's session (its parent process).
    pub session: Option<u32>,
}

/// What a client asked of a job besides its workflow.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobOptions {
    pub timeout_ms: Option<u64>,
    pub keep_alive_ms: Option<i64>,
    pub session: Option<u32>,
}

/// The job the executor is running.
struct RunningJob {
    id: u64,
    workflow_id: String,
    session: Option<u32>,
    cancel: CancelToken,
}

impl Job {
    /// Sends an event to the job's client; a client that is gone is not an error (the job
    /// is being cancelled and will notice at its next check).
    pub fn send(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    pub fn workflow_info(&self) -> WorkflowInfo {
        WorkflowInfo {
            id: self.workflow.id.clone(),
            path: self.workflow.path.display().to_string(),
            sha256: self.workflow.sha256.clone(),
        }
    }

    /// How long what the job used stays loaded; `None` for the daemon's default.
    pub fn keep_alive(&self) -> Option<KeepAlive> {
        self.keep_alive_ms.map(KeepAlive::from_ms)
    }

    /// The summary of a finished, failed or cancelled run.
    pub fn summarize(&self, report: RunReport) -> RunSummary {
        let timings = Timings {
            load_ms: report.load_ms,
            run_ms: report.run_ms,
            total_ms: self.accepted_at.elapsed().as_millis() as u64,
        };
        let error = match report.result {
            Ok(()) => None,
            Err(JobError::Cancelled(reason)) => Some(self.cancel_error(reason)),
            Err(JobError::Refused { message, pointer }) => Some(RunError {
                kind: ErrorKind::InvalidWorkflow,
                message,
                pointer,
            }),
            Err(other) => Some(RunError::new(other.kind(), other.to_string())),
        };
        let outcome = match &error {
            None => Outcome::Finished,
            Some(e) if e.kind == ErrorKind::Cancelled => Outcome::Cancelled,
            Some(_) => Outcome::Failed,
        };
        RunSummary {
            job_id: self.id,
            outcome,
            workflow: self.workflow_info(),
            timings,
            cache: report.cache,
            error,
        }
    }

    /// The summary of a job that stopped before it ran, for `reason`.
    pub fn cancelled_summary(&self, reason: CancelReason) -> RunSummary {
        self.summarize(RunReport {
            load_ms: 0,
            run_ms: 0,
            cache: Default::default(),
            result: Err(JobError::Cancelled(reason)),
        })
    }

    /// What a cancellation for `reason` reports.
    fn cancel_error(&self, reason: CancelReason) -> RunError {
        let message = match reason {
            CancelReason::Client => "cancelled by its client".to_string(),
            CancelReason::Timeout => format!(
                "timed out after {} s (--timeout) and was cancelled",
                self.timeout_ms.unwrap_or(0) as f64 / 1000.0
            ),
            CancelReason::Shutdown => "the daemon is shutting down".to_string(),
        };
        RunError::new(JobError::Cancelled(reason).kind(), message)
    }
}

impl Host for Job {
    fn job_id(&self) -> u64 {
        self.id
    }

    fn log(&self, level: LogLevel, message: String) {
        self.send(JobEvent::Log { level, message });
    }

    fn progress(&self, step: &str, phase: Phase, i: u32, n: u32) {
        self.send(JobEvent::Progress {
            step: step.to_string(),
            phase,
            i,
            n,
        });
    }

    fn output(&self, descriptor: OutputDescriptor, segment: SealedSegment) {
        self.send(JobEvent::Output {
            descriptor,
            segment,
        });
    }

    fn cancelled(&self) -> Option<CancelReason> {
        self.cancel.reason()
    }
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<Job>,
    running: Option<RunningJob>,
    next_id: u64,
    closed: bool,
    runs: u64,
    /// When a job was last submitted or finished; `None` before the first.
    last_activity: Option<Instant>,
}

/// The queue shared by connections (which submit and cancel) and the executor (which runs).
#[derive(Clone, Default)]
pub struct JobQueue {
    inner: Arc<(Mutex<QueueState>, Condvar)>,
}

/// Returned when the queue no longer accepts jobs.
#[derive(Debug)]
pub struct QueueClosed;

impl JobQueue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; returns its id, its position (0: it runs next) and its cancel token.
    pub fn submit(
        &self,
        workflow: Workflow,
        options: JobOptions,
        events: UnboundedSender<JobEvent>,
    ) -> Result<(u64, u32, CancelToken), QueueClosed> {
        let JobOptions {
            timeout_ms,
            keep_alive_ms,
            session,
        } = options;
        let mut state = self.state();
        if state.closed {
            return Err(QueueClosed);
        }
        state.next_id += 1;
        let id = state.next_id;
        let accepted_at = Instant::now();
        let deadline = timeout_ms.map(|ms| accepted_at + std::time::Duration::from_millis(ms));
        let cancel = CancelToken::with_deadline(deadline);
        let position = state.pending.len() as u32 + u32::from(state.running.is_some());
        state.pending.push_back(Job {
            id,
            workflow,
            cancel: cancel.clone(),
            accepted_at,
            events,
            timeout_ms,
            keep_alive_ms,
            session,
        });
        state.last_activity = Some(Instant::now());
        drop(state);
        self.inner.1.notify_one();
        Ok((id, position, cancel))
    }

    /// Cancels `job_id`; without one, the latest job submitted from `session` (or, with no
    /// session either, the latest job). Returns the ids cancelled.
    pub fn cancel(&self, job_id: Option<u64>, session: Option<u32>) -> Vec<u64> {
        let state = self.state();
        let mut all: Vec<(u64, Option<u32>, &CancelToken)> = state
            .running
            .iter()
            .map(|r| (r.id, r.session, &r.cancel))
            .collect();
        all.extend(state.pending.iter().map(|j| (j.id, j.session, &j.cancel)));
        let target = match (job_id, session) {
            (Some(id), _) => all.into_iter().find(|(jid, _, _)| *jid == id),
            (None, Some(session)) => all
                .into_iter()
                .filter(|(_, s, _)| *s == Some(session))
                .max_by_key(|(jid, _, _)| *jid),
            (None, None) => all.into_iter().max_by_key(|(jid, _, _)| *jid),
        };
        match target {
            Some((id, _, token)) => {
                token.cancel(CancelReason::Client);
                vec![id]
            }
            None => Vec::new(),
        }
    }

    /// How long the queue has been empty with nothing running (counted from the first
    /// call when no job ever came), if it is.
    pub fn idle_for(&self) -> Option<Duration> {
        let mut state = self.state();
        if state.running.is_some() || !state.pending.is_empty() {
            return None;
        }
        Some(
            state
                .last_activity
                .get_or_insert_with(Instant::now)
                .elapsed(),
        )
    }

    /// The running job (position 0) and those waiting, in order.
    pub fn snapshot(&self) -> Vec<QueuedJob> {
        let state = self.state();
        let mut jobs: Vec<QueuedJob> = state
            .running
            .iter()
            .map(|r| QueuedJob {
                job_id: r.id,
                workflow_id: r.workflow_id.clone(),
                state: "running".into(),
                position: 0,
            })
            .collect();
        let offset = jobs.len() as u32;
        jobs.extend(state.pending.iter().enumerate().map(|(i, j)| QueuedJob {
            job_id: j.id,
            workflow_id: j.workflow.id.clone(),
            state: "queued".into(),
            position: offset + i as u32,
        }));
        jobs
    }

    /// Whether `job_id` is still waiting for its turn.
    pub fn is_waiting(&self, job_id: u64) -> bool {
        self.state().pending.iter().any(|job| job.id == job_id)
    }

    /// Jobs finished since the daemon started, whatever their outcome.
    pub fn runs(&self) -> u64 {
        self.state().runs
    }

    /// Stops accepting jobs and cancels the running and waiting ones.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        if let Some(running) = &state.running {
            running.cancel.cancel(CancelReason::Shutdown);
        }
        for job in &state.pending {
            job.cancel.cancel(CancelReason::Shutdown);
        }
        drop(state);
        self.inner.1.notify_all();
    }

    /// Waits for the next job and marks it running; `None` once closed and drained.
    fn next(&self) -> Option<Job> {
        let mut state = self.state();
        loop {
            if let Some(job) = state.pending.pop_front() {
                state.running = Some(RunningJob {
                    id: job.id,
                    workflow_id: job.workflow.id.clone(),
                    session: job.session,
                    cancel: job.cancel.clone(),
                });
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.inner.1.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finished(&self) {
        let mut state = self.state();
        state.running = None;
        state.runs += 1;
        state.last_activity = Some(Instant::now());
    }
}

/// Runs jobs one at a time until the queue is closed and drained. `run` executes one job
/// and returns its summary; a panic inside it fails that job only.
pub fn run_executor(queue: JobQueue, mut run: impl FnMut(&Job) -> RunSummary) {
    while let Some(job) = queue.next() {
        let summary = match job.cancel.reason() {
            Some(reason) => job.cancelled_summary(reason),
            None => {
                match catch_unwind(AssertUnwindSafe(|| run(&job))) {
                    Ok(summary) => summary,
                    Err(panic) => {
                        let message = panic_message(panic.as_ref());
                        tracing::error!(job = job.id, "job panicked: {message}");
                        let message = format!("the job panicked: {message} (the daemon kept running; please report this)");
                        let error = RunError::new(ErrorKind::Panicked, message);
                        let total_ms = job.accepted_at.elapsed().as_millis() as u64;
                        RunSummary::failed(job.id, job.workflow_info(), error, total_ms)
                    }
                }
            }
        };
        queue.finished();
        job.send(JobEvent::Done(summary));
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::sync::mpsc::unbounded_channel;

    fn workflow() -> Workflow {
        let src = r#"{"id": "w", "steps": [{"name": "s", "pipeline": {
            "configuration": {"component_type": "StableDiffusionPipeline"},
            "from_pretrained_arguments": {"model_name": "m"},
            "arguments": {"prompt": "p"}}}]}"#;
        Workflow::parse(Path::new("w.json"), src, &[]).unwrap()
    }

    #[test]
    fn jobs_run_in_submission_order_and_positions_count_up() {
        let queue = JobQueue::default();
        let mut receivers = Vec::new();
        for expected_position in 0..3 {
            let (tx, rx) = unbounded_channel();
            let (_, position, _) = queue.submit(workflow(), JobOptions::default(), tx).unwrap();
            assert_eq!(position, expected_position);
            receivers.push(rx);
        }
        queue.close_after_drain_for_test();
        let mut order = Vec::new();
        run_executor(queue.clone(), |job| {
            order.push(job.id);
            job.cancelled_summary(CancelReason::Client)
        });
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(queue.runs(), 3);
        for mut rx in receivers {
            assert!(matches!(rx.try_recv(), Ok(JobEvent::Done(_))));
        }
    }

    #[test]
    fn a_panicking_job_fails_alone_and_the_next_job_still_runs() {
        let queue = JobQueue::default();
        let (tx1, mut rx1) = unbounded_channel();
        let (tx2, mut rx2) = unbounded_channel();
        queue
            .submit(workflow(), JobOptions::default(), tx1)
            .unwrap();
        queue
            .submit(workflow(), JobOptions::default(), tx2)
            .unwrap();
        queue.close_after_drain_for_test();
        run_executor(queue, |job| {
            if job.id == 1 {
                panic!("boom in job one");
            }
            RunSummary {
                outcome: Outcome::Finished,
                error: None,
                ..job.cancelled_summary(CancelReason::Client)
            }
        });
        let Ok(JobEvent::Done(first)) = rx1.try_recv() else {
            panic!("no summary for job 1")
        };
        assert_eq!(first.error.as_ref().unwrap().kind, ErrorKind::Panicked);
        assert!(first.error.unwrap().message.contains("boom in job one"));
        let Ok(JobEvent::Done(second)) = rx2.try_recv() else {
            panic!("no summary for job 2")
        };
        assert_eq!(second.outcome, Outcome::Finished);
    }

    #[test]
    fn a_job_cancelled_while_queued_never_runs() {
        let queue = JobQueue::default();
        let (tx, mut rx) = unbounded_channel();
        let (id, _, _) = queue.submit(workflow(), JobOptions::default(), tx).unwrap();
        assert_eq!(queue.cancel(None, None), vec![id]);
        queue.close_after_drain_for_test();
        run_executor(queue, |_| panic!("a cancelled job must not run"));
        let Ok(JobEvent::Done(summary)) = rx.try_recv() else {
            panic!("no summary")
        };
        assert_eq!(summary.outcome, Outcome::Cancelled);
    }

    #[test]
    fn a_passed_deadline_reads_as_a_timeout_and_the_first_reason_wins() {
        let token = CancelToken::with_deadline(Some(Instant::now()));
        assert_eq!(token.reason(), Some(CancelReason::Timeout));
        token.cancel(CancelReason::Client);
        assert_eq!(token.reason(), Some(CancelReason::Timeout));
    }

    #[test]
    fn cancel_without_an_id_takes_the_latest_job_of_the_callers_session() {
        let queue = JobQueue::default();
        let mut receivers = Vec::new();
        for session in [Some(7), Some(7), Some(8)] {
            let (tx, rx) = unbounded_channel();
            queue
                .submit(
                    workflow(),
                    JobOptions {
                        session,
                        ..Default::default()
                    },
                    tx,
                )
                .unwrap();
            receivers.push(rx);
        }
        assert_eq!(queue.cancel(None, Some(7)), vec![2]);
        assert_eq!(queue.cancel(None, Some(9)), Vec::<u64>::new());
        assert_eq!(
            queue.cancel(Some(1), Some(9)),
            vec![1],
            "an explicit id wins"
        );
    }

    #[test]
    fn the_queue_is_idle_only_with_nothing_queued_or_running() {
        let queue = JobQueue::default();
        assert!(queue.idle_for().is_some());
        let (tx, _rx) = unbounded_channel();
        queue.submit(workflow(), JobOptions::default(), tx).unwrap();
        assert_eq!(queue.idle_for(), None);
    }

    #[test]
    fn a_closed_queue_refuses_new_jobs() {
        let queue = JobQueue::default();
        queue.close();
        let (tx, _rx) = unbounded_channel();
        assert!(queue.submit(workflow(), JobOptions::default(), tx).is_err());
    }

    impl JobQueue {
        /// Closes the queue without cancelling, so the executor drains it and returns.
        fn close_after_drain_for_test(&self) {
            self.state().closed = true;
        }
    }
}
