//! The decisions, pure: every rule of a journey as a function of its inputs.
//!
//! Nothing here imports tokio, lapin, sled, axum, reqwest or hyper, reads the clock or draws
//! a random number: `now`, fresh ids and jitter come in as arguments. A test
//! (`domain_is_pure`) reads these sources and holds them to it.

pub mod backoff;
pub mod command;
pub mod evidence;
pub mod gate;
pub mod journey;
pub mod partition;
pub mod playbook;
pub mod record;
pub mod report;
pub mod step;
pub mod work;

#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod semantics_tests;
