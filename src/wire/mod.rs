//! The protocol as bytes on the wire, pure: envelopes and their decoder, tokens, trace
//! context. Knows the domain's types; knows nothing of sled or lapin.

pub mod auth;
pub mod headers;
pub mod names;
pub mod outgoing;
pub mod protocol;
pub mod redact;
pub mod trace;
