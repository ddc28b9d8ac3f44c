//! The surfaces people type at: the command line, the demo, the chaos run, the bench and
//! the dead-letter tools. They wire the runtime floors together; nothing below imports them.

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod demo;
pub mod dlq;
pub mod errors;
pub mod node;
pub mod playbook;
pub mod request;
pub mod settings;
pub mod show;
