//! What the store keeps about one journey, and the views built from it: the state the
//! protocol answers with, the events it publishes, the history it records.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::domain::evidence::Evidence;
use crate::domain::gate::ValidationResult;
use crate::domain::journey::{Journey, Stage};
use crate::domain::work::{TaskStatus, UnitOfWork, WorkKind, WorkStatus};

/// Everything the store keeps about one journey, under its client id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyRecord {
    pub journey: Journey,
    /// Content hash of the playbook the journey is pinned to.
    pub playbook: String,
    pub context: Value,
    /// The unit of work in progress or last run: the stage's, or a rollback's.
    pub work: Option<UnitOfWork>,
    /// Numbers units of work so their ids are unique across re-entries of a stage.
    pub work_seq: u32,
    #[serde(default)]
    pub evidence: Evidence,
    /// The last evaluation of the current stage's exit gate.
    #[serde(default)]
    pub gate: Option<ValidationResult>,
    /// The rollback in progress, if any.
    #[serde(default)]
    pub rollback: Option<RollbackInfo>,
    /// The W3C trace id every message about this journey carries.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Set by a manual rollback: the journey stays at its target, re-running the stage's
    /// work but never promoting itself, until `journey.resume` or `journey.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// Which journey of this client this is: 1 for the first, n+1 after `journey.start`
    /// on a finished (completed or cancelled) generation n.
    #[serde(default = "first_generation")]
    pub generation: u32,
    /// The client's earlier, finished journeys, oldest first. Their history lines stay
    /// under the same client key, in order, after a `generation_archived` line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub past: Vec<PastGeneration>,
    /// The partition the broker routes this client's commands to, as first seen by the
    /// runtime: its task replies go to that partition's reply queue, and the store's
    /// repartitioning moves the journey with it. `None` for journeys older than
    /// partitions, until their next change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u16>,
}

fn first_generation() -> u32 {
    1
}

/// Why a journey waits at its stage for a person (see [`JourneyRecord::hold`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    /// The manual rollback's reason.
    pub reason: String,
    pub since: DateTime<Utc>,
}

/// What is kept of a finished generation when the client starts again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PastGeneration {
    pub generation: u32,
    /// `completed` or `cancelled`.
    pub outcome: Stage,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub completed_stages: Vec<Stage>,
    /// The playbook hash it ran on.
    pub playbook: String,
}

/// Why and where a rollback goes, kept while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackInfo {
    pub reason: String,
    /// Fired by a trigger over evidence, not asked for by a person.
    pub automatic: bool,
    pub from: Stage,
    pub to: Stage,
    pub started_at: DateTime<Utc>,
    /// Its unit of work failed after retries; `journey.rollback` or `journey.resume` retries.
    pub failed: bool,
}

/// One line of a journey's history: every state change, evaluation, refusal and ignored
/// reply, with its time and cause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: Value,
    /// The message that caused it, when there was one.
    pub cause: Option<String>,
}

/// A copy of a journey taken when a rollback starts, kept for the retention period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub at: DateTime<Utc>,
    pub reason: String,
    pub record: JourneyRecord,
}

impl JourneyRecord {
    /// One word for where the journey is, for people and dashboards.
    pub fn status(&self) -> &'static str {
        let work = self.work.as_ref();
        let failed = work.is_some_and(|w| w.status == WorkStatus::Failed);
        let done =
            work.is_some_and(|w| w.status == WorkStatus::Completed && w.kind == WorkKind::Stage);
        match self.journey.stage {
            Stage::Completed => "completed",
            Stage::Cancelled => "cancelled",
            Stage::Rollback if failed => "rollback_failed",
            Stage::Rollback => "rolling_back",
            _ if failed => "paused",
            _ if self.hold.is_some() => "held",
            Stage::Production if done => "live",
            _ if done => "awaiting_gate",
            _ => "running",
        }
    }

    /// Its unit of work is running: it holds one of the orchestrator's places for
    /// journeys (see `admission`).
    pub fn is_active(&self) -> bool {
        !self.journey.stage.is_terminal()
            && self
                .work
                .as_ref()
                .is_some_and(|w| w.status == WorkStatus::Running)
    }

    /// The failed task of a paused journey: (task, attempts, last error).
    pub fn failed_task(&self) -> Option<(&str, u32, &str)> {
        let w = self.work.as_ref()?;
        if w.status != WorkStatus::Failed {
            return None;
        }
        let t = w.tasks.iter().find(|t| t.status == TaskStatus::Failed)?;
        Some((
            &t.task_id,
            t.attempts,
            t.last_error.as_deref().unwrap_or(""),
        ))
    }
}

/// The public view of a journey: the payload of `response` replies and `journey status`
/// (`schemas/journey-state.schema.json`).
pub fn state_view(rec: &JourneyRecord) -> Value {
    let work = rec.work.as_ref().map(|w| {
        json!({
            "work_id": w.work_id,
            "kind": w.kind,
            "stage": w.stage,
            "status": w.status,
            "failure": w.failure,
            "tasks": w.tasks.iter().map(|t| json!({
                "task_id": t.task_id,
                "intent": t.intent,
                "status": t.status,
                "attempts": t.attempts,
                "last_error": t.last_error,
            })).collect::<Vec<_>>(),
        })
    });
    let paused = rec.failed_task().map(|(task, attempts, error)| {
        json!({"task_id": task, "attempts": attempts, "last_error": error})
    });
    json!({
        "client_id": rec.journey.client_id,
        "stage": rec.journey.stage,
        "status": rec.status(),
        "previous_stage": rec.journey.previous_stage,
        "completed_stages": rec.journey.completed_stages,
        "started_at": rec.journey.started_at,
        "stage_started_at": rec.journey.stage_started_at,
        "playbook": rec.playbook,
        "work": work,
        "paused": paused,
        "gate": rec.gate,
        "rollback": rec.rollback,
        "evidence": rec.evidence,
        "hold": rec.hold,
        "generation": rec.generation,
        "past_generations": rec.past,
    })
}

/// The payload of a journey event on `<ns>.events` (`schemas/journey-event.schema.json`).
pub fn event_payload(rec: &JourneyRecord, name: &str, detail: Value, at: DateTime<Utc>) -> Value {
    json!({
        "client_id": rec.journey.client_id,
        "event": name,
        "stage": rec.journey.stage,
        "previous_stage": rec.journey.previous_stage,
        "at": at,
        "detail": detail,
    })
}

/// A dashboard status card (DES-002 §7.2): where the journey is, how far its unit of work
/// got, its exit checks and what happened lately.
pub fn status_card(
    rec: &JourneyRecord,
    recent: &[Value],
    card_id: u64,
    now: DateTime<Utc>,
) -> Value {
    let (done, total) = rec
        .work
        .as_ref()
        .map(|w| (w.completed_count(), w.tasks.len()))
        .unwrap_or((0, 0));
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    json!({
        "card_id": card_id,
        "client_id": rec.journey.client_id,
        "current_stage": rec.journey.stage,
        "status": rec.status(),
        "started_at": rec.journey.started_at,
        "stage_started_at": rec.journey.stage_started_at,
        "stage_duration_days": (now - rec.journey.stage_started_at).num_days(),
        "progress": {
            "work": rec.work.as_ref().map(|w| w.kind),
            "tasks_completed": done,
            "tasks_total": total,
            "percent": percent,
        },
        "exit_criteria": rec.gate,
        "recent_activities": recent,
        "generated_at": now,
    })
}
