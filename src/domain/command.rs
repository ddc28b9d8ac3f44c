//! What a journey is told: the journey commands and the outcomes of task attempts, as
//! typed values. The wire decoder produces them from envelopes; the decisions consume them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::journey::Stage;

/// The journey commands the orchestrator serves; everything else on its queues is refused.
pub const JOURNEY_INTENTS: [&str; 8] = [
    "journey.start",
    "journey.promote",
    "journey.rollback",
    "journey.cancel",
    "journey.complete",
    "journey.evidence",
    "journey.status",
    "journey.resume",
];

/// `journey.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartPayload {
    pub client_id: String,
    /// Free-form journey context (data sources, connectors, ...) that task inputs map from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Map<String, Value>>,
}

/// Commands whose payload is only the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPayload {
    pub client_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackPayload {
    pub client_id: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<Stage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelPayload {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `journey.evidence` (preliminary: the gates work refines it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidencePayload {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EvidenceEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceEvent {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A journey command, parsed from an envelope's intent and payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Start(StartPayload),
    Promote(ClientPayload),
    Rollback(RollbackPayload),
    Cancel(CancelPayload),
    Complete(ClientPayload),
    Evidence(EvidencePayload),
    Status(ClientPayload),
    Resume(ClientPayload),
}

impl Command {
    pub fn client_id(&self) -> &str {
        match self {
            Command::Start(p) => &p.client_id,
            Command::Promote(p)
            | Command::Complete(p)
            | Command::Status(p)
            | Command::Resume(p) => &p.client_id,
            Command::Rollback(p) => &p.client_id,
            Command::Cancel(p) => &p.client_id,
            Command::Evidence(p) => &p.client_id,
        }
    }

    pub fn intent(&self) -> &'static str {
        match self {
            Command::Start(_) => "journey.start",
            Command::Promote(_) => "journey.promote",
            Command::Rollback(_) => "journey.rollback",
            Command::Cancel(_) => "journey.cancel",
            Command::Complete(_) => "journey.complete",
            Command::Evidence(_) => "journey.evidence",
            Command::Status(_) => "journey.status",
            Command::Resume(_) => "journey.resume",
        }
    }

    /// The payload as JSON, for publishing a command (the CLI is an upstream agent).
    pub fn payload(&self) -> Value {
        let v = match self {
            Command::Start(p) => serde_json::to_value(p),
            Command::Promote(p)
            | Command::Complete(p)
            | Command::Status(p)
            | Command::Resume(p) => serde_json::to_value(p),
            Command::Rollback(p) => serde_json::to_value(p),
            Command::Cancel(p) => serde_json::to_value(p),
            Command::Evidence(p) => serde_json::to_value(p),
        };
        v.unwrap_or(Value::Null)
    }
}

/// Payload of an agent's `response`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResponse {
    pub status: String,
    pub output: Map<String, Value>,
}

impl TaskResponse {
    pub fn completed(output: Map<String, Value>) -> Self {
        Self {
            status: "completed".into(),
            output,
        }
    }
}

/// Payload of every `error`: an agent's task error or the orchestrator's refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub code: String,
    pub message: String,
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// What an agent said about one task attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    Completed(Map<String, Value>),
    Failed(ErrorPayload),
}
