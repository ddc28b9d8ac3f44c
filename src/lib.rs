//! journeyman: client journeys (Sandbox → Pilot → Production) orchestrated over RabbitMQ.
//!
//! Pure core: [`journey`] (the state machine), [`playbook`] (units of work as data),
//! [`work`] (a unit of work's DAG), [`backoff`] (the retry schedule). Edges: [`protocol`]
//! (bytes to typed messages), [`store`] (sled), [`broker`] (RabbitMQ). Workers:
//! [`orchestrator`] and [`agent`], with [`sim`] agents for demos and tests.

pub mod agent;
pub mod auth;
pub mod backoff;
pub mod bench;
pub mod broker;
pub mod chaos;
pub mod cli;
pub mod demo;
pub mod dlq;
pub mod evidence;
pub mod failpoint;
pub mod gate;
pub mod http;
pub mod journey;
pub mod orchestrator;
pub mod playbook;
pub mod protocol;
pub mod report;
pub mod sim;
pub mod store;
pub mod trace;
pub mod webhook;
pub mod work;
