//! The agent protocol: the JSON envelope every message carries, the payloads journeyman
//! defines, and the one decoder every consumed message goes through.
//!
//! This is the public contract (`docs/protocol.md`, `schemas/`): agents in any language
//! speak it. The module owns parsing bytes into typed values and refusing what does not
//! fit, each refusal with a stable reason code. It must not touch the broker or the store:
//! the callers decide what a refusal means (dead-letter it, answer with an error).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use crate::domain::command::{
    CancelPayload, ClientPayload, Command, ErrorPayload, EvidenceEvent, EvidencePayload,
    JOURNEY_INTENTS, RollbackPayload, StartPayload, TaskOutcome, TaskResponse,
};

/// Content type of every message; anything else is refused before parsing.
pub const CONTENT_TYPE: &str = "application/json";
/// Default size cap: large enough for any task output we define, small enough that one
/// hostile message cannot make a worker allocate without bound.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Identity of an agent, carried as `source_agent` and `target_agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRef {
    pub agent_id: String,
    pub domain: String,
    pub version: String,
}

impl AgentRef {
    pub fn new(agent_id: impl Into<String>, domain: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            domain: domain.into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The orchestrator's identity on every message it sends.
    pub fn orchestrator() -> Self {
        Self::new("journey-orchestrator", "journeyman")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Request,
    Response,
    Event,
    Error,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Request => "request",
            MessageType::Response => "response",
            MessageType::Event => "event",
            MessageType::Error => "error",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Security {
    /// A signed token naming the sender (`crate::wire::auth`); empty when unsigned.
    pub auth_token: String,
}

/// Redacted: a token is a bearer credential, and envelopes end up in logs.
impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field(
                "auth_token",
                &format_args!("<{} bytes>", self.auth_token.len()),
            )
            .finish()
    }
}

/// The envelope around every message. `message_id` is the dedup key everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub message_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub timestamp: DateTime<Utc>,
    pub source_agent: AgentRef,
    pub target_agent: AgentRef,
    pub message_type: MessageType,
    pub intent: String,
    pub payload: Value,
    pub security: Security,
}

impl Envelope {
    /// A new message with a fresh id. `payload` must serialise to a JSON object.
    pub fn new(
        source: AgentRef,
        target: AgentRef,
        message_type: MessageType,
        intent: impl Into<String>,
        payload: Value,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            message_id: Uuid::new_v4(),
            correlation_id: None,
            // Milliseconds, as the protocol documents: nine fractional digits break
            // parsers such as Python's before 3.11.
            timestamp: {
                use chrono::DurationRound;
                now.duration_trunc(chrono::TimeDelta::milliseconds(1))
                    .unwrap_or(now)
            },
            source_agent: source,
            target_agent: target,
            message_type,
            intent: intent.into(),
            payload,
            security: Security::default(),
        }
    }

    pub fn with_correlation(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// The envelope carrying `token` (from `auth::Signer::sign` or `auth::mint`).
    pub fn with_auth_token(mut self, token: impl Into<String>) -> Self {
        self.security.auth_token = token.into();
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data types to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The id a reply to this message correlates on: its correlation id, else its message id.
    pub fn reply_correlation(&self) -> String {
        self.correlation_id
            .clone()
            .unwrap_or_else(|| self.message_id.to_string())
    }
}

/// Why a message was refused. Each variant has a stable code that lands in the
/// dead-letter headers; operators filter and replay by it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message is {size} bytes, over the {limit}-byte limit")]
    Oversize { size: usize, limit: usize },
    #[error("message body is not UTF-8: {0}")]
    NotUtf8(String),
    #[error("message body is not valid JSON: {0}")]
    MalformedJson(String),
    /// Valid JSON, but nested deeper than the decoder follows: its own reason, so a sender
    /// is not told its JSON is broken when it is only deep.
    #[error("message body nests JSON deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("{what} does not match its schema: {detail}")]
    SchemaInvalid { what: String, detail: String },
    #[error("no handler here for intent '{0}'")]
    UnknownIntent(String),
    #[error("message type '{0}' is not accepted on this queue")]
    UnexpectedMessageType(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// A journey command whose `x-journeyman-client-id` header is missing or names
    /// another client than its payload: the broker routes commands to their partition by
    /// that header.
    #[error("{}", client_header_message(client_id, header.as_deref()))]
    ClientHeader {
        client_id: String,
        header: Option<String>,
    },
}

fn client_header_message(client_id: &str, header: Option<&str>) -> String {
    match header {
        None => format!(
            "the journey command for '{client_id}' has no {} header",
            super::headers::CLIENT_ID
        ),
        Some(h) => format!(
            "the journey command for '{client_id}' has the {} header '{h}'",
            super::headers::CLIENT_ID
        ),
    }
}

impl ProtocolError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            ProtocolError::Oversize { .. } => "oversize",
            ProtocolError::NotUtf8(_) => "not_utf8",
            ProtocolError::MalformedJson(_) => "malformed_json",
            ProtocolError::TooDeep { .. } => "too_deep",
            ProtocolError::SchemaInvalid { .. } => "schema_invalid",
            ProtocolError::UnknownIntent(_) => "unknown_intent",
            ProtocolError::UnexpectedMessageType(_) => "unknown_message_type",
            ProtocolError::Unauthenticated(_) => "unauthenticated",
            ProtocolError::Forbidden(_) => "forbidden",
            ProtocolError::ClientHeader { .. } => "client_id_header",
        }
    }
}

impl ProtocolError {
    /// What the sender should do about it, for the `error` reply to a refused message.
    pub fn advice(&self) -> &'static str {
        match self {
            ProtocolError::Oversize { .. } => "send a smaller message",
            ProtocolError::NotUtf8(_) | ProtocolError::MalformedJson(_) => {
                "send a JSON envelope (schemas/envelope.schema.json)"
            }
            ProtocolError::TooDeep { .. } => "flatten the payload: at most 128 levels of nesting",
            ProtocolError::SchemaInvalid { .. } => {
                "fix the field named above; the schemas are in schemas/ and docs/protocol.md"
            }
            ProtocolError::UnknownIntent(_) => {
                "use one of the journey.* intents listed in docs/protocol.md"
            }
            ProtocolError::UnexpectedMessageType(_) => {
                "send journey commands as message_type request"
            }
            ProtocolError::Unauthenticated(_) => {
                "sign the envelope with a valid token for this namespace (see docs/protocol.md, \
                 authentication), or ask the operator for one"
            }
            ProtocolError::Forbidden(_) => {
                "ask the operator for a token with the role this intent needs"
            }
            ProtocolError::ClientHeader { .. } => {
                "set the AMQP header x-journeyman-client-id to the payload's client_id: the \
                 broker routes journey commands to their partition by it (docs/protocol.md)"
            }
        }
    }

    /// The reply text: the reason and what to do. Never carries the token (schema errors
    /// under `security` do not show the value).
    pub fn reply_message(&self) -> String {
        format!("{self}: {}", self.advice())
    }
}

/// serde_json's nesting limit, which bounds every decoded message's depth.
pub const MAX_JSON_DEPTH: usize = 128;

/// The schema files, embedded so the binary validates without a checkout.
pub mod schemas {
    pub const ENVELOPE: &str = include_str!("../../schemas/envelope.schema.json");
    pub const TASK_RESPONSE: &str = include_str!("../../schemas/task-response.schema.json");
    pub const ERROR: &str = include_str!("../../schemas/error.schema.json");
    pub const JOURNEY_STATE: &str = include_str!("../../schemas/journey-state.schema.json");
    pub const JOURNEY_EVENT: &str = include_str!("../../schemas/journey-event.schema.json");
    /// (intent, schema) for every journey command.
    pub const COMMANDS: [(&str, &str); 8] = [
        (
            "journey.start",
            include_str!("../../schemas/journey.start.schema.json"),
        ),
        (
            "journey.promote",
            include_str!("../../schemas/journey.promote.schema.json"),
        ),
        (
            "journey.rollback",
            include_str!("../../schemas/journey.rollback.schema.json"),
        ),
        (
            "journey.cancel",
            include_str!("../../schemas/journey.cancel.schema.json"),
        ),
        (
            "journey.complete",
            include_str!("../../schemas/journey.complete.schema.json"),
        ),
        (
            "journey.evidence",
            include_str!("../../schemas/journey.evidence.schema.json"),
        ),
        (
            "journey.status",
            include_str!("../../schemas/journey.status.schema.json"),
        ),
        (
            "journey.resume",
            include_str!("../../schemas/journey.resume.schema.json"),
        ),
    ];
}

/// Compiles a schema shipped with the binary. They are tested, so failure is a build defect.
pub fn compile_schema(text: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(text).expect("embedded schema is valid JSON");
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .expect("embedded schema compiles")
}

fn check(
    validator: &jsonschema::Validator,
    what: &str,
    value: &Value,
) -> Result<(), ProtocolError> {
    match validator.validate(value) {
        Ok(()) => Ok(()),
        Err(e) => {
            let at = e.instance_path().to_string();
            // The value is shown except under `security`: a malformed token is a secret
            // still, and this text goes to replies and dead-letter headers.
            let detail = if at.starts_with("/security") {
                format!("invalid value, not shown (at '{at}')")
            } else {
                format!("{e} (at '{at}')")
            };
            Err(ProtocolError::SchemaInvalid {
                what: what.to_string(),
                detail,
            })
        }
    }
}

struct Validators {
    envelope: jsonschema::Validator,
    task_response: jsonschema::Validator,
    error: jsonschema::Validator,
    commands: BTreeMap<&'static str, jsonschema::Validator>,
}

/// The single decoder: size cap, UTF-8, JSON (serde_json's nesting limit of 128 bounds
/// depth), envelope schema, then per-intent payload schema. Cheap to clone.
#[derive(Clone)]
pub struct Decoder {
    max_bytes: usize,
    validators: Arc<Validators>,
}

impl Decoder {
    pub fn new(max_bytes: usize) -> Self {
        let commands = schemas::COMMANDS
            .iter()
            .map(|(intent, text)| (*intent, compile_schema(text)))
            .collect();
        Self {
            max_bytes,
            validators: Arc::new(Validators {
                envelope: compile_schema(schemas::ENVELOPE),
                task_response: compile_schema(schemas::TASK_RESPONSE),
                error: compile_schema(schemas::ERROR),
                commands,
            }),
        }
    }

    /// Bytes to a schema-valid envelope.
    pub fn envelope(&self, bytes: &[u8]) -> Result<Envelope, ProtocolError> {
        if bytes.len() > self.max_bytes {
            return Err(ProtocolError::Oversize {
                size: bytes.len(),
                limit: self.max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ProtocolError::NotUtf8(e.to_string()))?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            if e.to_string().starts_with("recursion limit exceeded") {
                ProtocolError::TooDeep {
                    limit: MAX_JSON_DEPTH,
                }
            } else {
                ProtocolError::MalformedJson(e.to_string())
            }
        })?;
        check(&self.validators.envelope, "envelope", &value)?;
        serde_json::from_value(value).map_err(|e| ProtocolError::SchemaInvalid {
            what: "envelope".into(),
            detail: e.to_string(),
        })
    }

    /// An envelope on a journey command queue to a command.
    pub fn command(&self, env: &Envelope) -> Result<Command, ProtocolError> {
        if env.message_type != MessageType::Request {
            return Err(ProtocolError::UnexpectedMessageType(
                env.message_type.as_str().into(),
            ));
        }
        let intent = env.intent.as_str();
        let validator = self
            .validators
            .commands
            .get(intent)
            .ok_or_else(|| ProtocolError::UnknownIntent(env.intent.clone()))?;
        check(validator, intent, &env.payload)?;
        let p = env.payload.clone();
        let invalid = |e: serde_json::Error| ProtocolError::SchemaInvalid {
            what: intent.to_string(),
            detail: e.to_string(),
        };
        Ok(match intent {
            "journey.start" => Command::Start(serde_json::from_value(p).map_err(invalid)?),
            "journey.promote" => Command::Promote(serde_json::from_value(p).map_err(invalid)?),
            "journey.rollback" => Command::Rollback(serde_json::from_value(p).map_err(invalid)?),
            "journey.cancel" => Command::Cancel(serde_json::from_value(p).map_err(invalid)?),
            "journey.complete" => Command::Complete(serde_json::from_value(p).map_err(invalid)?),
            "journey.evidence" => Command::Evidence(serde_json::from_value(p).map_err(invalid)?),
            "journey.status" => Command::Status(serde_json::from_value(p).map_err(invalid)?),
            "journey.resume" => Command::Resume(serde_json::from_value(p).map_err(invalid)?),
            other => return Err(ProtocolError::UnknownIntent(other.into())),
        })
    }

    /// An envelope on the orchestrator's reply queue to a task outcome.
    pub fn task_reply(&self, env: &Envelope) -> Result<TaskOutcome, ProtocolError> {
        match env.message_type {
            MessageType::Response => {
                check(
                    &self.validators.task_response,
                    "task response",
                    &env.payload,
                )?;
                let r: TaskResponse = serde_json::from_value(env.payload.clone()).map_err(|e| {
                    ProtocolError::SchemaInvalid {
                        what: "task response".into(),
                        detail: e.to_string(),
                    }
                })?;
                Ok(TaskOutcome::Completed(r.output))
            }
            MessageType::Error => {
                check(&self.validators.error, "error", &env.payload)?;
                let e: ErrorPayload = serde_json::from_value(env.payload.clone()).map_err(|e| {
                    ProtocolError::SchemaInvalid {
                        what: "error".into(),
                        detail: e.to_string(),
                    }
                })?;
                Ok(TaskOutcome::Failed(e))
            }
            other => Err(ProtocolError::UnexpectedMessageType(other.as_str().into())),
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(intent: &str, payload: Value) -> Envelope {
        Envelope::new(
            AgentRef::new("cli", "ops"),
            AgentRef::orchestrator(),
            MessageType::Request,
            intent,
            payload,
            Utc::now(),
        )
    }

    #[test]
    fn roundtrip_command() {
        let d = Decoder::default();
        let e = env(
            "journey.start",
            json!({"client_id": "acme", "context": {"a": 1}}),
        );
        let back = d.envelope(&e.to_bytes()).unwrap();
        assert_eq!(back, e);
        let c = d.command(&back).unwrap();
        assert_eq!(c.client_id(), "acme");
        assert_eq!(c.intent(), "journey.start");
    }

    #[test]
    fn refusals_have_codes() {
        let d = Decoder::new(64);
        assert_eq!(
            d.envelope(&[b'x'; 65]).unwrap_err().reason_code(),
            "oversize"
        );
        let d = Decoder::default();
        assert_eq!(
            d.envelope(&[0xff, 0xfe]).unwrap_err().reason_code(),
            "not_utf8"
        );
        assert_eq!(
            d.envelope(b"{not json").unwrap_err().reason_code(),
            "malformed_json"
        );
        assert_eq!(
            d.envelope(b"{}").unwrap_err().reason_code(),
            "schema_invalid"
        );
        // Valid but deep JSON has its own reason: it is not "not JSON".
        let deep = "[".repeat(1000) + &"]".repeat(1000);
        assert_eq!(
            d.envelope(deep.as_bytes()).unwrap_err().reason_code(),
            "too_deep"
        );
        // A token that breaks the schema is not shown in the reason.
        let mut e = serde_json::to_value(env("journey.start", json!({"client_id": "a"}))).unwrap();
        e["security"]["auth_token"] = json!(12345678);
        let err = d.envelope(&serde_json::to_vec(&e).unwrap()).unwrap_err();
        assert_eq!(err.reason_code(), "schema_invalid");
        assert!(!err.reply_message().contains("12345678"), "{err}");
        let e = env("journey.fly", json!({"client_id": "acme"}));
        assert_eq!(d.command(&e).unwrap_err().reason_code(), "unknown_intent");
        let e = env("journey.start", json!({"client": "acme"}));
        assert_eq!(d.command(&e).unwrap_err().reason_code(), "schema_invalid");
        let e = env("journey.start", json!({"client_id": "bad id with spaces"}));
        assert_eq!(d.command(&e).unwrap_err().reason_code(), "schema_invalid");
    }

    #[test]
    fn replies_decode() {
        let d = Decoder::default();
        let mut e = env("x", json!({"status": "completed", "output": {"k": 1}}));
        e.message_type = MessageType::Response;
        assert!(matches!(d.task_reply(&e), Ok(TaskOutcome::Completed(_))));
        e.message_type = MessageType::Error;
        e.payload = json!({"code": "boom", "message": "m", "retryable": true});
        assert!(matches!(d.task_reply(&e), Ok(TaskOutcome::Failed(p)) if p.retryable));
        e.message_type = MessageType::Request;
        assert_eq!(
            d.task_reply(&e).unwrap_err().reason_code(),
            "unknown_message_type"
        );
    }
}
