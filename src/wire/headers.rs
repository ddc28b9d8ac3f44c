//! The `x-journeyman-*` AMQP headers: the one place their names are spelled.
//!
//! Dead letters carry why and where from (so `journeyman dlq` can list, filter and
//! replay them); task requests carry their journey, task and attempt; replays carry
//! their history so failure counts continue.

/// Why the message was dead-lettered: a stable reason code.
pub const REASON: &str = "x-journeyman-reason";
/// The reason for people.
pub const REASON_MESSAGE: &str = "x-journeyman-reason-message";
pub const ORIGINAL_EXCHANGE: &str = "x-journeyman-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-journeyman-original-routing-key";
pub const ORIGINAL_QUEUE: &str = "x-journeyman-original-queue";
/// When this dead letter was made (RFC 3339).
pub const FAILED_AT: &str = "x-journeyman-failed-at";
/// When the message first failed, across replays.
pub const FIRST_FAILED_AT: &str = "x-journeyman-first-failed-at";
/// Failures so far, replays included.
pub const ATTEMPTS: &str = "x-journeyman-attempts";
/// The journey a message belongs to, when known.
pub const CLIENT_ID: &str = "x-journeyman-client-id";
/// The task of a task request or a failed unit of work.
pub const TASK_ID: &str = "x-journeyman-task-id";
/// The attempt number of a task request.
pub const ATTEMPT: &str = "x-journeyman-attempt";
/// Set by `journeyman dlq replay` on what it republishes.
pub const REPLAYED_AT: &str = "x-journeyman-replayed-at";
/// The dead letter a replay came from, when the replay has a new message id.
pub const REPLAY_OF: &str = "x-journeyman-replay-of";
/// Set when a replay's payload was replaced by `--edit`.
pub const EDITED_AT: &str = "x-journeyman-edited-at";
