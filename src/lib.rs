//! journeyman: client journeys (Sandbox → Pilot → Production) orchestrated over RabbitMQ.
//!
//! The floors, lowest first. A floor uses the floors below it, never one above:
//!
//! - [`domain`]: the decisions, pure: journeys, units of work, gates, evidence, backoff,
//!   reports, and the orchestrator's `step`. No I/O, no clock, no randomness.
//! - [`wire`]: the protocol, pure: envelopes and their decoder, tokens, trace context,
//!   resource names, header vocabulary and dead-letter encoding. Uses `domain`.
//! - [`store`] (sled), [`broker`] (RabbitMQ) and [`telemetry`] (OpenTelemetry): the
//!   adapters.
//! - [`orchestrator`] and [`agent`]: the runtime, turning deliveries into steps and
//!   effects into writes and publishes.
//! - [`http`] and [`ops`]: the surfaces (health, metrics, API and dashboard; the CLI, the
//!   demo, chaos and bench). They wire the runtime together.
//!
pub mod domain;
pub mod wire;

pub mod broker;
pub mod store;
pub mod telemetry;

pub mod agent;
pub mod orchestrator;

pub mod http;
pub mod ops;
