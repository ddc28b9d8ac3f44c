//! A stage's unit of work as data: which tasks ran, how often, with what outcome, and
//! what to do next. Pure: no clock, no randomness, no I/O.
//!
//! The orchestrator feeds it replies, timeouts and "no agent serves this intent", passing
//! `now`, a jitter sample and fresh correlation ids; it answers with the requests to
//! dispatch. Deadlines and retry times live in the state, so timers survive a restart by
//! being read back from the store.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::backoff::retry_delay;
use crate::domain::command::ErrorPayload;
use crate::domain::journey::Stage;
use crate::domain::playbook::{InputContext, StageWork, TaskSpec, resolve_input};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Dispatched,
    WaitingRetry,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkStatus {
    Running,
    Completed,
    Failed,
    /// Stopped on purpose (rollback, cancel); replies still in flight are ignored.
    Cancelled,
}

/// Whether a unit of work carries a journey through its stage or undoes the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WorkKind {
    #[default]
    Stage,
    Rollback,
}

/// Stored in every journey record, rewritten on every reply: absent fields are left out
/// to keep the hot record small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub task_id: String,
    pub intent: String,
    pub status: TaskStatus,
    /// Attempts dispatched so far (the first dispatch is attempt 1).
    pub attempts: u32,
    /// The correlation id of the attempt in flight; replies carrying another are stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// When the attempt in flight times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// When the attempt in flight was dispatched (for the round-trip histogram).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When the next attempt is due, while waiting to retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Correlation ids of earlier attempts: a late reply to one of them is recognised and
    /// ignored rather than reported as unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub past_correlations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitOfWork {
    pub work_id: String,
    /// The stage this work runs (or, for a rollback, undoes).
    pub stage: Stage,
    #[serde(default)]
    pub kind: WorkKind,
    pub status: WorkStatus,
    pub tasks: Vec<TaskState>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it failed, naming the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A task request to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub task_id: String,
    pub intent: String,
    pub correlation_id: String,
    pub attempt: u32,
    pub input: Value,
    pub deadline: DateTime<Utc>,
}

/// What a reply did to the unit of work.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyEffect {
    /// The task completed.
    Completed { task_id: String },
    /// The attempt failed and another is scheduled at `retry_at`.
    RetryScheduled {
        task_id: String,
        attempt: u32,
        retry_at: DateTime<Utc>,
        error: String,
    },
    /// The task failed for good, and with it the unit of work.
    TaskFailed { task_id: String, error: String },
    /// The reply is for an attempt that is no longer current (duplicate, late after a
    /// timeout or retry, or the work already ended): recorded and ignored.
    Stale { task_id: String, why: &'static str },
    /// The correlation id belongs to no task of this unit of work.
    Unknown,
}

/// Inputs the work needs from the journey to build task inputs.
pub struct JourneyView<'a> {
    pub client_id: &'a str,
    pub context: &'a Value,
}

impl UnitOfWork {
    pub fn new(work_id: String, stage: Stage, spec: &StageWork, now: DateTime<Utc>) -> Self {
        Self {
            work_id,
            stage,
            kind: WorkKind::Stage,
            status: WorkStatus::Running,
            tasks: spec
                .tasks
                .iter()
                .map(|t| TaskState {
                    task_id: t.task_id.clone(),
                    intent: t.intent.clone(),
                    status: TaskStatus::Pending,
                    attempts: 0,
                    correlation_id: None,
                    deadline: None,
                    dispatched_at: None,
                    retry_at: None,
                    output: None,
                    last_error: None,
                    past_correlations: Vec::new(),
                })
                .collect(),
            created_at: now,
            completed_at: None,
            failure: None,
        }
    }

    pub fn task(&self, id: &str) -> Option<&TaskState> {
        self.tasks.iter().find(|t| t.task_id == id)
    }

    fn task_mut(&mut self, id: &str) -> Option<&mut TaskState> {
        self.tasks.iter_mut().find(|t| t.task_id == id)
    }

    pub fn completed_count(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .count()
    }

    /// Dispatches every task that can run now: pending tasks whose dependencies are done,
    /// and retries that are due. A task whose input cannot be built fails the work.
    pub fn advance(
        &mut self,
        spec: &StageWork,
        journey: &JourneyView,
        now: DateTime<Utc>,
        new_correlation: &mut dyn FnMut() -> String,
    ) -> Vec<Dispatch> {
        let mut out = Vec::new();
        if self.status != WorkStatus::Running {
            return out;
        }
        let done: BTreeSet<String> = self
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .map(|t| t.task_id.clone())
            .collect();
        if done.len() == self.tasks.len() {
            self.status = WorkStatus::Completed;
            self.completed_at = Some(now);
            return out;
        }
        let outputs: BTreeMap<String, Value> = self
            .tasks
            .iter()
            .filter_map(|t| t.output.clone().map(|o| (t.task_id.clone(), o)))
            .collect();
        let stage = self.stage.as_str();
        for t_spec in &spec.tasks {
            let Some(state) = self.task(&t_spec.task_id) else {
                continue;
            };
            let due = match state.status {
                TaskStatus::Pending => t_spec.depends_on.iter().all(|d| done.contains(d)),
                TaskStatus::WaitingRetry => state.retry_at.is_none_or(|at| at <= now),
                _ => false,
            };
            if !due {
                continue;
            }
            let ctx = InputContext {
                client_id: journey.client_id,
                stage,
                context: journey.context,
                outputs: &outputs,
            };
            match resolve_input(&t_spec.input, &ctx) {
                Ok(input) => {
                    let d = self.start_attempt(t_spec, input, now, new_correlation());
                    out.push(d);
                }
                Err(e) => {
                    let msg = format!("cannot build the input of task {}: {e}", t_spec.task_id);
                    self.fail(&t_spec.task_id, msg, now);
                    return Vec::new();
                }
            }
        }
        out
    }

    /// The attempts in flight (dispatched, not answered yet) as they were dispatched: the
    /// runtime publishes them again after a restart, since the outbox does not copy task
    /// requests. Inputs are rebuilt from the same spec, context and outputs, so they are the
    /// same bytes of meaning as the first time.
    pub fn in_flight(&self, spec: &StageWork, journey: &JourneyView) -> Vec<Dispatch> {
        if self.status != WorkStatus::Running {
            return Vec::new();
        }
        let outputs: BTreeMap<String, Value> = self
            .tasks
            .iter()
            .filter_map(|t| t.output.clone().map(|o| (t.task_id.clone(), o)))
            .collect();
        let ctx = InputContext {
            client_id: journey.client_id,
            stage: self.stage.as_str(),
            context: journey.context,
            outputs: &outputs,
        };
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Dispatched)
            .filter_map(|t| {
                let t_spec = spec.task(&t.task_id)?;
                let input = resolve_input(&t_spec.input, &ctx).ok()?;
                Some(Dispatch {
                    task_id: t.task_id.clone(),
                    intent: t.intent.clone(),
                    correlation_id: t.correlation_id.clone()?,
                    attempt: t.attempts,
                    input,
                    deadline: t.deadline?,
                })
            })
            .collect()
    }

    fn start_attempt(
        &mut self,
        spec: &TaskSpec,
        input: Value,
        now: DateTime<Utc>,
        correlation_id: String,
    ) -> Dispatch {
        let deadline = now + to_chrono(spec.timeout);
        let t = self
            .task_mut(&spec.task_id)
            .expect("task exists: built from the same spec");
        if let Some(old) = t.correlation_id.take() {
            t.past_correlations.push(old);
        }
        t.attempts += 1;
        t.status = TaskStatus::Dispatched;
        t.correlation_id = Some(correlation_id.clone());
        t.deadline = Some(deadline);
        t.dispatched_at = Some(now);
        t.retry_at = None;
        Dispatch {
            task_id: spec.task_id.clone(),
            intent: spec.intent.clone(),
            correlation_id,
            attempt: t.attempts,
            input,
            deadline,
        }
    }

    fn fail(&mut self, task_id: &str, error: String, now: DateTime<Utc>) {
        if let Some(t) = self.task_mut(task_id) {
            t.status = TaskStatus::Failed;
            t.deadline = None;
            t.retry_at = None;
            t.last_error = Some(error.clone());
        }
        self.status = WorkStatus::Failed;
        self.completed_at = Some(now);
        self.failure = Some(format!("task {task_id} failed: {error}"));
    }

    /// Whether a reply with this correlation id would be recognised (current or earlier
    /// attempt of one of the tasks).
    pub fn knows_correlation(&self, correlation_id: &str) -> bool {
        self.locate(correlation_id).is_some()
    }

    /// Drops what an ended unit of work no longer needs (task outputs, correlation ids of
    /// every attempt), keeping each task's status, attempts and last error for display.
    /// Returns whether anything was dropped; a running unit is left alone.
    pub fn compact(&mut self) -> bool {
        if self.status == WorkStatus::Running {
            return false;
        }
        let mut changed = false;
        for t in &mut self.tasks {
            changed |= t.output.take().is_some();
            changed |= t.correlation_id.take().is_some();
            changed |= !t.past_correlations.is_empty();
            t.past_correlations = Vec::new();
        }
        changed
    }

    fn locate(&self, correlation_id: &str) -> Option<(usize, bool)> {
        self.tasks.iter().enumerate().find_map(|(i, t)| {
            if t.correlation_id.as_deref() == Some(correlation_id) {
                Some((i, true))
            } else if t.past_correlations.iter().any(|c| c == correlation_id) {
                Some((i, false))
            } else {
                None
            }
        })
    }

    /// Applies an agent's reply. `jitter` is a sample in [0, 1) for the retry delay.
    pub fn on_reply(
        &mut self,
        spec: &StageWork,
        correlation_id: &str,
        outcome: Result<Value, ErrorPayload>,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> ReplyEffect {
        let Some((i, current)) = self.locate(correlation_id) else {
            return ReplyEffect::Unknown;
        };
        let task_id = self.tasks[i].task_id.clone();
        if !current {
            return ReplyEffect::Stale {
                task_id,
                why: "reply to an earlier attempt",
            };
        }
        if self.status != WorkStatus::Running {
            return ReplyEffect::Stale {
                task_id,
                why: "the unit of work has ended",
            };
        }
        if self.tasks[i].status != TaskStatus::Dispatched {
            return ReplyEffect::Stale {
                task_id,
                why: "the attempt was already resolved",
            };
        }
        match outcome {
            Ok(output) => {
                let t = &mut self.tasks[i];
                t.status = TaskStatus::Completed;
                t.output = Some(output);
                t.deadline = None;
                ReplyEffect::Completed { task_id }
            }
            Err(e) => {
                let error = format!("{}: {}", e.code, e.message);
                self.attempt_failed(spec, i, error, e.retryable, now, jitter)
            }
        }
    }

    /// The attempt `attempt` of `task_id` reached its deadline without a reply.
    pub fn on_timeout(
        &mut self,
        spec: &StageWork,
        task_id: &str,
        attempt: u32,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> Option<ReplyEffect> {
        let i = self.tasks.iter().position(|t| t.task_id == task_id)?;
        let t = &self.tasks[i];
        if self.status != WorkStatus::Running
            || t.status != TaskStatus::Dispatched
            || t.attempts != attempt
            || t.deadline.is_none_or(|d| d > now)
        {
            return None;
        }
        let timeout = spec.task(task_id).map(|s| s.timeout).unwrap_or_default();
        let error = format!("timed out: no reply within {timeout:?}");
        Some(self.attempt_failed(spec, i, error, true, now, jitter))
    }

    /// The request for `correlation_id` was returned unroutable: no queue serves its
    /// intent. Counted as a failed attempt and retried like any other, because agents may
    /// still be starting; after the retries the task fails with a `no_agent` error.
    pub fn on_unroutable(
        &mut self,
        spec: &StageWork,
        correlation_id: &str,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> Option<ReplyEffect> {
        let (i, current) = self.locate(correlation_id)?;
        if !current
            || self.status != WorkStatus::Running
            || self.tasks[i].status != TaskStatus::Dispatched
        {
            return None;
        }
        let error = format!(
            "no_agent: no agent serves intent '{}' (no queue is bound to it)",
            self.tasks[i].intent
        );
        Some(self.attempt_failed(spec, i, error, true, now, jitter))
    }

    fn attempt_failed(
        &mut self,
        spec: &StageWork,
        i: usize,
        error: String,
        retryable: bool,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> ReplyEffect {
        let task_id = self.tasks[i].task_id.clone();
        let Some(t_spec) = spec.task(&task_id) else {
            self.fail(&task_id, error.clone(), now);
            return ReplyEffect::TaskFailed { task_id, error };
        };
        let attempt = self.tasks[i].attempts;
        if !retryable || attempt > t_spec.max_retries {
            let error = if retryable {
                format!("{error} (after {attempt} attempts)")
            } else {
                format!("{error} (not retryable)")
            };
            self.fail(&task_id, error.clone(), now);
            return ReplyEffect::TaskFailed { task_id, error };
        }
        let retry_at = now + to_chrono(retry_delay(&t_spec.backoff, attempt, jitter));
        let t = &mut self.tasks[i];
        t.status = TaskStatus::WaitingRetry;
        t.deadline = None;
        t.retry_at = Some(retry_at);
        t.last_error = Some(error.clone());
        ReplyEffect::RetryScheduled {
            task_id,
            attempt,
            retry_at,
            error,
        }
    }

    /// Stops the work on purpose. Replies still in flight become stale.
    pub fn cancel(&mut self, reason: String, now: DateTime<Utc>) {
        if self.status == WorkStatus::Running {
            self.status = WorkStatus::Cancelled;
            self.completed_at = Some(now);
            self.failure = Some(reason);
            for t in &mut self.tasks {
                t.deadline = None;
                t.retry_at = None;
            }
        }
    }

    /// Restarts a failed unit of work from its failed (and interrupted) tasks, keeping
    /// every completed task: a redrive. Each restarted task gets its full retry budget.
    pub fn resume(&mut self) {
        for t in &mut self.tasks {
            if matches!(
                t.status,
                TaskStatus::Failed | TaskStatus::Dispatched | TaskStatus::WaitingRetry
            ) {
                if let Some(old) = t.correlation_id.take() {
                    t.past_correlations.push(old);
                }
                t.status = TaskStatus::WaitingRetry;
                t.retry_at = None;
                t.deadline = None;
                t.attempts = 0;
            }
        }
        self.status = WorkStatus::Running;
        self.failure = None;
        self.completed_at = None;
    }

    /// Every timer this work needs: (when, task, attempt). Read back after a restart.
    pub fn timers(&self) -> Vec<(DateTime<Utc>, String, u32)> {
        if self.status != WorkStatus::Running {
            return Vec::new();
        }
        self.tasks
            .iter()
            .filter_map(|t| match t.status {
                TaskStatus::Dispatched => t.deadline.map(|d| (d, t.task_id.clone(), t.attempts)),
                TaskStatus::WaitingRetry => t.retry_at.map(|d| (d, t.task_id.clone(), t.attempts)),
                _ => None,
            })
            .collect()
    }

    /// Correlation ids still awaited, for the in-flight index.
    pub fn awaited(&self) -> impl Iterator<Item = &str> {
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Dispatched)
            .filter_map(|t| t.correlation_id.as_deref())
    }
}

fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::playbook::Playbook;
    use chrono::TimeZone;
    use serde_json::json;

    /// A fixed instant: tests of pure code never read the clock.
    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
    }

    fn sandbox() -> StageWork {
        Playbook::default_playbook()
            .stage("sandbox")
            .expect("sandbox stage")
            .clone()
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("c{n}")
        }
    }

    fn outputs_for(intent: &str) -> Value {
        crate::agent::sim::simulated_output(intent, "acme", &json!({}))
    }

    #[test]
    fn runs_the_dag_in_dependency_order() {
        let spec = sandbox();
        let now = t0();
        let ctx = json!({"data_sources": ["drive"], "connectors": ["drive"]});
        let view = JourneyView {
            client_id: "acme",
            context: &ctx,
        };
        let mut w = UnitOfWork::new("w1".into(), Stage::Sandbox, &spec, now);
        let mut ids = counter();
        let mut d = w.advance(&spec, &view, now, &mut ids);
        let mut order = Vec::new();
        while !d.is_empty() {
            let mut next = Vec::new();
            for x in d {
                order.push(x.task_id.clone());
                let eff = w.on_reply(
                    &spec,
                    &x.correlation_id,
                    Ok(outputs_for(&x.intent)),
                    now,
                    0.5,
                );
                assert!(matches!(eff, ReplyEffect::Completed { .. }), "{eff:?}");
                next.extend(w.advance(&spec, &view, now, &mut ids));
            }
            d = next;
        }
        assert_eq!(w.status, WorkStatus::Completed);
        let expected: Vec<String> = spec.tasks.iter().map(|t| t.task_id.clone()).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn retries_then_fails_past_max_retries_and_ignores_stale_replies() {
        let spec = sandbox();
        let now = t0();
        let ctx = json!({});
        let view = JourneyView {
            client_id: "acme",
            context: &ctx,
        };
        let mut w = UnitOfWork::new("w1".into(), Stage::Sandbox, &spec, now);
        let mut ids = counter();
        let first = w.advance(&spec, &view, now, &mut ids).remove(0);
        let max = spec.tasks[0].max_retries;
        let err = ErrorPayload {
            code: "boom".into(),
            message: "flaky".into(),
            retryable: true,
            details: None,
        };
        let mut corr = first.correlation_id.clone();
        let mut t = now;
        for attempt in 1..=max {
            let eff = w.on_reply(&spec, &corr, Err(err.clone()), t, 0.0);
            let ReplyEffect::RetryScheduled { retry_at, .. } = eff else {
                panic!("{eff:?}")
            };
            assert!(retry_at > t);
            // Not due yet: nothing to dispatch.
            assert!(w.advance(&spec, &view, t, &mut ids).is_empty());
            t = retry_at;
            let d = w.advance(&spec, &view, t, &mut ids).remove(0);
            assert_eq!(d.attempt, attempt + 1);
            // The previous attempt's late reply is stale.
            let stale = w.on_reply(&spec, &corr, Ok(json!({})), t, 0.0);
            assert!(matches!(stale, ReplyEffect::Stale { .. }));
            corr = d.correlation_id;
        }
        let eff = w.on_reply(&spec, &corr, Err(err), t, 0.0);
        assert!(matches!(eff, ReplyEffect::TaskFailed { .. }), "{eff:?}");
        assert_eq!(w.status, WorkStatus::Failed);
        assert!(w.failure.as_deref().unwrap().contains("flaky"));
        assert_eq!(
            w.on_reply(&spec, "nope", Ok(json!({})), t, 0.0),
            ReplyEffect::Unknown
        );
    }

    #[test]
    fn compaction_keeps_statuses_and_forgets_correlations_only_once_ended() {
        let spec = sandbox();
        let now = t0();
        let ctx = json!({"data_sources": ["drive"], "connectors": ["drive"]});
        let view = JourneyView {
            client_id: "acme",
            context: &ctx,
        };
        let mut w = UnitOfWork::new("w1".into(), Stage::Sandbox, &spec, now);
        let mut ids = counter();
        let mut dispatched = w.advance(&spec, &view, now, &mut ids);
        let first = dispatched[0].correlation_id.clone();
        assert!(w.knows_correlation(&first));
        assert!(!w.compact(), "a running unit is never compacted");
        let mut all = Vec::new();
        while let Some(d) = dispatched.pop() {
            all.push(d.correlation_id.clone());
            w.on_reply(
                &spec,
                &d.correlation_id,
                Ok(outputs_for(&d.intent)),
                now,
                0.0,
            );
            dispatched.extend(w.advance(&spec, &view, now, &mut ids));
        }
        assert_eq!(w.status, WorkStatus::Completed);
        let statuses: Vec<_> = w.tasks.iter().map(|t| (t.status, t.attempts)).collect();
        assert!(w.compact());
        assert!(!w.compact(), "compaction is idempotent");
        assert!(all.iter().all(|c| !w.knows_correlation(c)));
        assert!(w.tasks.iter().all(|t| t.output.is_none()));
        let after: Vec<_> = w.tasks.iter().map(|t| (t.status, t.attempts)).collect();
        assert_eq!(statuses, after);
    }

    #[test]
    fn timeouts_and_unroutable() {
        let spec = sandbox();
        let now = t0();
        let ctx = json!({});
        let view = JourneyView {
            client_id: "acme",
            context: &ctx,
        };
        let mut w = UnitOfWork::new("w1".into(), Stage::Sandbox, &spec, now);
        let mut ids = counter();
        let d = w.advance(&spec, &view, now, &mut ids).remove(0);
        assert_eq!(w.timers().len(), 1);
        // Before the deadline, a timeout is ignored.
        assert!(w.on_timeout(&spec, &d.task_id, 1, now, 0.0).is_none());
        let eff = w.on_timeout(&spec, &d.task_id, 1, d.deadline, 0.0).unwrap();
        assert!(matches!(eff, ReplyEffect::RetryScheduled { .. }));
        let d2 = w
            .advance(
                &spec,
                &view,
                d.deadline + ChronoDuration::hours(1),
                &mut ids,
            )
            .remove(0);
        let eff = w
            .on_unroutable(&spec, &d2.correlation_id, now, 0.0)
            .unwrap();
        assert!(
            matches!(eff, ReplyEffect::RetryScheduled { ref error, .. } if error.contains("no_agent"))
        );
        // A second return of the same request changes nothing.
        assert!(
            w.on_unroutable(&spec, &d2.correlation_id, now, 0.0)
                .is_none()
        );
    }
}
