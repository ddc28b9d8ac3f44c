//! A message to publish as plain data: where it goes, its AMQP properties and its body.
//! The outbox stores it, the publisher sends it; neither copies it.

use super::names::Names;

/// A message to publish, independent of lapin's types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub mandatory: bool,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub message_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Outgoing {
    /// A journey command (a request to `<ns>.intents`, routed by its intent, then to its
    /// partition by the client id header) as an upstream agent sends it: mandatory, so a
    /// missing orchestrator queue is noticed.
    pub fn command(
        names: &Names,
        intent: &str,
        client_id: &str,
        message_id: String,
        body: Vec<u8>,
    ) -> Self {
        Self {
            exchange: names.intents(),
            routing_key: intent.to_string(),
            mandatory: true,
            message_id,
            correlation_id: None,
            reply_to: None,
            message_type: "request".into(),
            headers: vec![(super::headers::CLIENT_ID.to_string(), client_id.to_string())],
            body,
        }
    }
}
