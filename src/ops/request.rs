//! A journey command as an upstream agent sends it: published with confirms through the
//! intents exchange, answered on direct reply-to. The CLI, the demo and chaos speak
//! through it.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection};

use crate::broker::Names;
use crate::wire::protocol::{AgentRef, Command, Decoder, Envelope, MessageType};

/// RabbitMQ's direct reply-to pseudo-queue: replies without declaring a queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Publishes a journey command and waits for the orchestrator's answer (direct reply-to).
pub async fn request(
    conn: &Connection,
    names: &Names,
    cmd: &Command,
    timeout: Duration,
) -> Result<Envelope> {
    let me = AgentRef::new("journeyman-cli", "operator");
    request_as(conn, names, cmd, timeout, me, None).await
}

/// [`request`] as `source`, carrying `token` when authentication is on.
pub async fn request_as(
    conn: &Connection,
    names: &Names,
    cmd: &Command,
    timeout: Duration,
    source: AgentRef,
    token: Option<String>,
) -> Result<Envelope> {
    let ch = conn.create_channel().await?;
    let mut replies = ch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot listen for replies (direct reply-to)")?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut env = Envelope::new(
        source,
        AgentRef::orchestrator(),
        MessageType::Request,
        cmd.intent(),
        cmd.payload(),
        Utc::now(),
    );
    if let Some(token) = token {
        env = env.with_auth_token(token);
    }
    let props = BasicProperties::default()
        .with_content_type(ShortString::from(crate::wire::protocol::CONTENT_TYPE))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(env.message_id.to_string()))
        .with_correlation_id(ShortString::from(env.message_id.to_string()))
        .with_reply_to(ShortString::from(DIRECT_REPLY_TO))
        .with_type(ShortString::from("request"))
        .with_headers(client_header(&env.payload));
    // A namespace nobody declared has no intents exchange: the broker closes the channel
    // with NOT_FOUND, which says nothing to a user who mistyped --namespace.
    let no_topology = |e: lapin::Error| {
        if e.to_string().contains("NOT_FOUND") {
            anyhow!(
                "namespace '{}' has no topology: run `journeyman topology declare` or check --namespace",
                names.namespace
            )
        } else {
            anyhow!(e).context("publishing the command")
        }
    };
    let confirm = ch
        .basic_publish(
            names.intents().as_str().into(),
            cmd.intent().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &env.to_bytes(),
            props,
        )
        .await
        .map_err(no_topology)?
        .await
        .map_err(no_topology)?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(_)) => bail!(
            "no queue serves {} in namespace '{}': start the orchestrator (journeyman orchestrator) or declare the topology (journeyman topology declare)",
            cmd.intent(),
            names.namespace
        ),
        other => bail!("the broker refused the command ({other:?}); check its logs"),
    }
    let decoder = Decoder::default();
    let wait = async {
        while let Some(d) = replies.next().await {
            let d = d?;
            let reply = decoder
                .envelope(&d.data)
                .map_err(|e| anyhow!("the orchestrator's reply is not valid: {e}"))?;
            if reply.correlation_id.as_deref() == Some(&env.message_id.to_string()) {
                return Ok(reply);
            }
        }
        bail!("the reply consumer ended before an answer came")
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        anyhow!(
            "no answer from the orchestrator within {timeout:?}: no orchestrator took the command from its queue in namespace '{}' (refusals are always answered, so it is not running or is overloaded); the command stays queued and will be applied when one does",
            names.namespace
        )
    })?
}

/// The routing header of a journey command: the broker hashes it onto the partitions.
fn client_header(payload: &serde_json::Value) -> FieldTable {
    let mut t = std::collections::BTreeMap::new();
    if let Some(c) = payload.get("client_id").and_then(|c| c.as_str()) {
        t.insert(
            ShortString::from(crate::wire::headers::CLIENT_ID),
            lapin::types::AMQPValue::LongString(c.into()),
        );
    }
    FieldTable::from(t)
}
