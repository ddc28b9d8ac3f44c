//! The dead-letter tooling: list, count, show, replay and purge what sits in
//! `<ns>.dead-letter`, the on-call engineer's view of everything that could not be
//! processed (docs/protocol.md, section 9).
//!
//! **Reading without consuming.** Every command reads the queue the same way: on a
//! channel of its own it takes up to the queue's message count with `basic.get` and
//! manual acks, keeps every message unacked, acks only the ones it removes (replayed or
//! purged), and closes the channel. The broker requeues the rest in their original order
//! (`tests/e2e/dlq.rs` checks this on RabbitMQ 3.10 with repeated reads). A crash of this
//! process at any point has the same effect as closing the channel: nothing is lost.
//!
//! Each such read counts as a delivery for the quorum queue (`x-delivery-count` grows).
//! That matters only where `x-delivery-limit` is set: the dead-letter queue is declared
//! with `x-queue-type: quorum` alone (see `broker::declare_exchanges`), so reading it any
//! number of times never dead-letters anything.
//!
//! **Replay** republishes to the original exchange and routing key (mandatory, with
//! publisher confirms) and removes the dead letter only once the broker has confirmed the
//! copy, so a crash in between leaves the message in both places, never in neither. Which
//! message id the copy carries is explained on [`ReplayOptions::new_id`].

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use clap::{ArgGroup, Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::broker::{self, BrokerError, Names, Outgoing, Published, Publisher};
use crate::wire::headers;

/// Default replay rate, in messages per second: enough to drain a backlog, slow enough
/// not to stampede one journey.
pub const DEFAULT_RATE: f64 = 10.0;
/// Long replays and purges report progress every this many messages.
pub const PROGRESS_EVERY: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker operation '{op}' failed: {source}")]
    Amqp { op: String, source: lapin::Error },
    #[error(
        "the dead-letter queue {0} does not exist: is --namespace (JOURNEYMAN_NAMESPACE) right? `journeyman topology declare` creates it"
    )]
    NoQueue(String),
    #[error("no dead letter with id {id} in {queue}; `journeyman dlq list` shows the ids")]
    NotFound { id: String, queue: String },
    #[error("--edit {path}: {why}")]
    Edit { path: String, why: String },
    #[error("{0}")]
    Usage(String),
    #[error("{what} refused: stdin is not a terminal, so there is nobody to confirm; add --yes")]
    NeedsYes { what: String },
    #[error("aborted; nothing was changed")]
    Aborted,
    #[error(
        "{0} message(s) were not replayed (see above); they are still in the dead-letter queue"
    )]
    Incomplete(usize),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn amqp(op: impl Into<String>) -> impl FnOnce(lapin::Error) -> DlqError {
    let op = op.into();
    move |source| DlqError::Amqp { op, source }
}

/// Who dead-lettered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetteredBy {
    /// journeyman (orchestrator or agent runtime): `x-journeyman-*` headers.
    Journeyman,
    /// RabbitMQ, through a queue's `x-dead-letter-exchange`: an `x-death` header.
    Broker,
}

/// One dead-lettered message, decoded from its properties and headers.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its position in the queue (0 = next to be delivered) when it was read.
    pub position: usize,
    /// The AMQP `message_id`, or, for a message without one, `body-<sha256 prefix>`
    /// (stable, so it can be named in `show`, `replay` and `purge`).
    pub id: String,
    /// A stable code: ours (`x-journeyman-reason`) or the broker's (`x-death` reason,
    /// e.g. `delivery_limit`, `rejected`).
    pub reason: String,
    pub reason_message: String,
    pub dead_lettered_by: DeadLetteredBy,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub original_queue: String,
    pub failed_at: Option<DateTime<Utc>>,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub attempts: u64,
    pub client_id: Option<String>,
    pub task_id: Option<String>,
    /// The AMQP properties (message_id, correlation_id, reply_to, type, ...).
    #[serde(skip)]
    pub properties: BasicProperties,
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl DeadLetter {
    fn from_delivery(position: usize, d: &lapin::message::Delivery) -> Self {
        let p = &d.properties;
        let h = |name: &str| broker::header(p, name).filter(|s| !s.is_empty());
        let body_json: Option<Value> = serde_json::from_slice(&d.data).ok();
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| {
                let digest = Sha256::digest(&d.data);
                format!("body-{}", &hex::encode(digest)[..16])
            });
        let client_id = h(headers::CLIENT_ID).or_else(|| {
            let b = body_json.as_ref()?;
            b["payload"]["client_id"]
                .as_str()
                .or_else(|| b["client_id"].as_str())
                .map(str::to_string)
        });
        let task_id = h(headers::TASK_ID);
        let parse_time = |s: Option<String>| {
            s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        if let Some(reason) = h(headers::REASON) {
            let str_or_empty = |name: &str| broker::header(p, name).unwrap_or_default();
            return Self {
                position,
                id,
                reason,
                reason_message: str_or_empty(headers::REASON_MESSAGE),
                dead_lettered_by: DeadLetteredBy::Journeyman,
                original_exchange: str_or_empty(headers::ORIGINAL_EXCHANGE),
                original_routing_key: str_or_empty(headers::ORIGINAL_ROUTING_KEY),
                original_queue: str_or_empty(headers::ORIGINAL_QUEUE),
                failed_at: parse_time(h(headers::FAILED_AT)),
                first_failed_at: parse_time(h(headers::FIRST_FAILED_AT)),
                attempts: h(headers::ATTEMPTS)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(1),
                client_id,
                task_id,
                properties: p.clone(),
                body: d.data.clone(),
            };
        }
        // Dead-lettered by the broker: x-death lists one entry per (queue, reason), the
        // most recent first.
        let deaths: Vec<&FieldTable> = match header_value(p, "x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .filter_map(|v| match v {
                    AMQPValue::FieldTable(t) => Some(t),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let get = |t: &FieldTable, k: &str| t.inner().get(k).map(amqp_to_json);
        let s = |v: Option<Value>| match v {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
        let time = |t: &FieldTable| match t.inner().get("time") {
            Some(AMQPValue::Timestamp(ts)) => Utc.timestamp_opt(*ts as i64, 0).single(),
            _ => None,
        };
        let (reason, exchange, routing_key, queue, count, failed_at) = match deaths.first() {
            Some(t) => {
                let reason = s(get(t, "reason"));
                let rk = match get(t, "routing-keys") {
                    Some(Value::Array(a)) => a
                        .first()
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    _ => String::new(),
                };
                let count = get(t, "count").and_then(|v| v.as_u64()).unwrap_or(1);
                (
                    reason,
                    s(get(t, "exchange")),
                    rk,
                    s(get(t, "queue")),
                    count,
                    time(t),
                )
            }
            None => (
                "unknown".to_string(),
                String::new(),
                d.routing_key.to_string(),
                String::new(),
                1,
                None,
            ),
        };
        let reason_message = match reason.as_str() {
            "delivery_limit" => format!(
                "redelivered more than the delivery limit of {queue} (its consumer failed on it every time)"
            ),
            "rejected" => format!("a consumer of {queue} rejected it (requeue=false)"),
            "expired" => format!("its TTL expired in {queue}"),
            "maxlen" => format!("{queue} was over its length limit"),
            "unknown" => "no x-journeyman-reason and no x-death header".to_string(),
            other => format!("dead-lettered by the broker ({other}) from {queue}"),
        };
        Self {
            position,
            id,
            reason,
            reason_message,
            dead_lettered_by: DeadLetteredBy::Broker,
            original_exchange: exchange,
            original_routing_key: routing_key,
            original_queue: queue,
            failed_at,
            first_failed_at: deaths.last().and_then(|t| time(t)),
            attempts: count,
            client_id,
            task_id,
            properties: p.clone(),
            body: d.data.clone(),
        }
    }

    /// The intent it concerns: its original routing key.
    pub fn intent(&self) -> &str {
        &self.original_routing_key
    }

    /// The body as JSON, when it is JSON.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A failed unit of work's record (`work.failed.<stage>` on no exchange): a report for
    /// the on-call engineer, not a command that could be sent again.
    pub fn is_record(&self) -> bool {
        self.original_exchange.is_empty() && self.original_routing_key.starts_with("work.failed.")
    }

    /// Whether the orchestrator handled this message and recorded its id as seen: it
    /// dead-lettered it itself, from one of its own queues. A copy with the same id would
    /// be dropped as a duplicate.
    pub fn seen_by_orchestrator(&self, names: &Names) -> bool {
        self.dead_lettered_by == DeadLetteredBy::Journeyman
            && !self.is_record()
            && (self
                .original_queue
                .starts_with(&format!("{}.intent.journey.", names.namespace))
                || self
                    .original_queue
                    .starts_with(&format!("{}.journeys.", names.namespace))
                || self
                    .original_queue
                    .starts_with(&format!("{}.orchestrator.", names.namespace)))
    }

    /// Everything: summary, properties, headers and body (pretty JSON when it is JSON,
    /// else text, else an escaped preview and hex).
    pub fn to_full_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        let p = &self.properties;
        let o = |x: &Option<lapin::types::ShortString>| {
            x.as_ref()
                .map(|s| Value::String(s.as_str().to_string()))
                .unwrap_or(Value::Null)
        };
        v["properties"] = json!({
            "message_id": o(p.message_id()),
            "correlation_id": o(p.correlation_id()),
            "reply_to": o(p.reply_to()),
            "type": o(p.kind()),
            "content_type": o(p.content_type()),
            "delivery_mode": p.delivery_mode().map(Value::from).unwrap_or(Value::Null),
            "timestamp": p.timestamp().map(Value::from).unwrap_or(Value::Null),
        });
        let headers: Map<String, Value> = p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        v["headers"] = Value::Object(headers);
        v["body_bytes"] = Value::from(self.body.len());
        v["body"] = match (self.body_json(), std::str::from_utf8(&self.body)) {
            (Some(j), _) => j,
            (None, Ok(text)) => json!({"text": text}),
            (None, Err(_)) => json!({
                "escaped": preview(&self.body, 512),
                "hex": hex::encode(&self.body[..self.body.len().min(256)]),
            }),
        };
        // Everything a person or a script sees of a dead letter goes through here: the
        // token of a refused message, a header holding one, a body quoting one.
        crate::wire::redact::redact_json(&mut v);
        if let Some(Value::String(text)) = v["body"].get_mut("text") {
            *text = crate::wire::redact::redact_text(text);
        }
        v
    }

    /// The summary as the JSON API and `dlq list --json` show it, redacted.
    pub fn to_summary_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        crate::wire::redact::redact_json(&mut v);
        v
    }
}

/// An escaped, bounded preview of bytes that are not text.
fn preview(bytes: &[u8], max: usize) -> String {
    let mut s = bytes[..bytes.len().min(max)].escape_ascii().to_string();
    if bytes.len() > max {
        s.push('…');
    }
    s
}

fn header_value<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

/// An AMQP header value as JSON, for people and scripts.
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::from(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => Utc
            .timestamp_opt(*t as i64, 0)
            .single()
            .map(|t| Value::from(t.to_rfc3339()))
            .unwrap_or(Value::from(*t)),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::from(hex::encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// Which dead letters `list` shows. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    /// Matches the original routing key.
    pub intent: Option<String>,
    pub client: Option<String>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.as_deref().is_none_or(|r| d.reason == r)
            && self.intent.as_deref().is_none_or(|i| d.intent() == i)
            && self
                .client
                .as_deref()
                .is_none_or(|c| d.client_id.as_deref() == Some(c))
    }
}

/// Which dead letters `replay` and `purge` act on.
#[derive(Debug, Clone)]
pub enum Selector {
    /// Every dead letter with this id (normally one).
    Id(String),
    Reason(String),
    All,
    /// Dead-lettered (last) longer ago than this.
    OlderThan(Duration),
}

impl Selector {
    pub fn matches(&self, d: &DeadLetter, now: DateTime<Utc>) -> bool {
        match self {
            Selector::Id(id) => &d.id == id,
            Selector::Reason(r) => &d.reason == r,
            Selector::All => true,
            Selector::OlderThan(age) => {
                let age = chrono::Duration::from_std(*age).unwrap_or(chrono::Duration::MAX);
                d.failed_at.is_some_and(|t| t < now - age)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Selector::Id(id) => format!("id {id}"),
            Selector::Reason(r) => format!("reason {r}"),
            Selector::All => "every dead letter".into(),
            Selector::OlderThan(d) => {
                format!("dead-lettered over {} ago", humantime::format_duration(*d))
            }
        }
    }
}

/// Counts by reason and by intent (original routing key).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub total: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub by_intent: BTreeMap<String, usize>,
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Messages per second (> 0).
    pub rate: f64,
    /// By default a replay keeps the message id: if this process dies between the
    /// broker's confirm and removing the dead letter, the message is in both places and a
    /// second replay is dropped by the consumer's dedup. That is right for messages the
    /// consumer never processed (everything the broker dead-lettered, and what agents
    /// refused). The orchestrator, though, records the id of every message it refuses as
    /// seen, so a copy with the same id would be dropped: those need `new_id`, and
    /// without it they are skipped, not silently lost. The new id is derived from the
    /// dead letter's id, attempt count and edit, so a replay repeated after a crash
    /// carries the same new id and is still applied once.
    pub new_id: bool,
    /// Replaces the envelope's `payload`.
    pub edit: Option<Map<String, Value>>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            new_id: false,
            edit: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub id: String,
    /// The id of the republished copy (differs with `new_id`).
    pub replayed_as: String,
    pub reason: String,
    pub exchange: String,
    pub routing_key: String,
    pub edited: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
    /// Why, and what to do instead.
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: Vec<Replayed>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    pub purged: Vec<String>,
}

/// The dead-letter queue of one namespace.
pub struct Dlq<'a> {
    conn: &'a Connection,
    names: Names,
}

/// Messages read and held unacked on `ch`: (delivery tag, message).
struct Held {
    ch: Channel,
    queue: String,
    items: Vec<(u64, DeadLetter)>,
    /// How many of `items` were acked (removed).
    acked: std::cell::Cell<usize>,
}

/// How long `release` waits for the broker to put held messages back.
const REQUEUE_WAIT: Duration = Duration::from_secs(10);

impl Held {
    /// Closes the channel: the broker requeues everything not acked, in order. The
    /// requeue happens after `close-ok`, asynchronously, so this waits (bounded) until
    /// the queue holds them again: the next read sees the whole queue.
    async fn release(self, conn: &Connection) {
        let _ = self.ch.close(200, "dlq: done".into()).await;
        let expected = self.items.len().saturating_sub(self.acked.get());
        let deadline = tokio::time::Instant::now() + REQUEUE_WAIT;
        while expected > 0 && tokio::time::Instant::now() < deadline {
            match broker::queue_len(conn, &self.queue).await {
                Ok(n) if n as usize >= expected => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return,
            }
        }
    }
}

impl<'a> Dlq<'a> {
    pub fn new(conn: &'a Connection, names: Names) -> Self {
        Self { conn, names }
    }

    pub fn queue(&self) -> String {
        self.names.dead_letter()
    }

    /// Reads (without acking) every message the queue holds right now.
    async fn hold(&self) -> Result<Held, DlqError> {
        let queue = self.queue();
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("create channel"))?;
        let count = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| {
                if source.to_string().contains("NOT_FOUND") {
                    DlqError::NoQueue(queue.clone())
                } else {
                    DlqError::Amqp {
                        op: format!("inspect {queue}"),
                        source,
                    }
                }
            })?
            .message_count() as usize;
        let mut items = Vec::with_capacity(count);
        // Only up to the count seen now: dead letters arriving meanwhile wait for the
        // next command, and a busy queue cannot keep this loop going.
        while items.len() < count {
            let got = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(amqp(format!("basic.get {queue}")))?;
            let Some(m) = got else { break };
            let d = m.delivery;
            items.push((d.delivery_tag, DeadLetter::from_delivery(items.len(), &d)));
        }
        Ok(Held {
            ch,
            queue,
            items,
            acked: Default::default(),
        })
    }

    /// Every dead letter matching `filter`, in queue order, leaving the queue as it was.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
        let held = self.hold().await?;
        let out = held
            .items
            .iter()
            .filter(|(_, d)| filter.matches(d))
            .map(|(_, d)| d.clone())
            .collect();
        held.release(self.conn).await;
        Ok(out)
    }

    /// Counts by reason and by intent.
    pub async fn stats(&self) -> Result<Stats, DlqError> {
        let all = self.list(&Filter::default()).await?;
        let mut s = Stats {
            total: all.len(),
            ..Default::default()
        };
        for d in &all {
            *s.by_reason.entry(d.reason.clone()).or_default() += 1;
            *s.by_intent.entry(d.intent().to_string()).or_default() += 1;
        }
        Ok(s)
    }

    /// Every dead letter with this id (normally one); `NotFound` when there is none.
    pub async fn show(&self, id: &str) -> Result<Vec<DeadLetter>, DlqError> {
        let found: Vec<DeadLetter> = self
            .list(&Filter::default())
            .await?
            .into_iter()
            .filter(|d| d.id == id)
            .collect();
        if found.is_empty() {
            return Err(DlqError::NotFound {
                id: id.into(),
                queue: self.queue(),
            });
        }
        Ok(found)
    }

    /// How many dead letters `selector` picks now (for a confirmation prompt).
    pub async fn count(&self, selector: &Selector) -> Result<usize, DlqError> {
        let now = Utc::now();
        Ok(self
            .list(&Filter::default())
            .await?
            .iter()
            .filter(|d| selector.matches(d, now))
            .count())
    }

    /// Republishes the selected dead letters to where they came from and removes each one
    /// once the broker has confirmed its copy. `progress(done, total)` is called after
    /// each message. A broker error stops the replay; what was not replayed stays.
    pub async fn replay(
        &self,
        selector: &Selector,
        opts: &ReplayOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ReplayReport, DlqError> {
        if opts.rate.is_nan() || opts.rate <= 0.0 {
            return Err(DlqError::Usage(format!(
                "--rate must be above 0, got {}",
                opts.rate
            )));
        }
        let held = self.hold().await?;
        let now = Utc::now();
        let targets: Vec<&(u64, DeadLetter)> = held
            .items
            .iter()
            .filter(|(_, d)| selector.matches(d, now))
            .collect();
        if let (Selector::Id(id), true) = (selector, targets.is_empty()) {
            held.release(self.conn).await;
            return Err(DlqError::NotFound {
                id: id.clone(),
                queue: self.queue(),
            });
        }
        let publisher = match Publisher::start(self.conn).await {
            Ok(p) => p,
            Err(e) => {
                held.release(self.conn).await;
                return Err(e.into());
            }
        };
        let interval = Duration::from_secs_f64(1.0 / opts.rate);
        let start = tokio::time::Instant::now();
        let mut report = ReplayReport::default();
        let total = targets.len();
        let mut sent = 0u32;
        for (i, (tag, d)) in targets.into_iter().enumerate() {
            let out = match self.replay_copy(d, opts, now) {
                Ok(out) => out,
                Err(why) => {
                    report.skipped.push(Skipped {
                        id: d.id.clone(),
                        reason: d.reason.clone(),
                        why,
                    });
                    progress(i + 1, total);
                    continue;
                }
            };
            tokio::time::sleep_until(start + interval * sent).await;
            sent += 1;
            let replayed_as = out.message_id.clone();
            let (exchange, routing_key) = (out.exchange.clone(), out.routing_key.clone());
            match publisher.publish(out).await {
                Ok(Published::Confirmed) => {
                    if let Err(e) = held
                        .ch
                        .basic_ack(*tag, BasicAckOptions::default())
                        .await
                        .map_err(amqp("basic.ack"))
                    {
                        // The copy is out; the dead letter stays. Replaying it again is
                        // harmless (same id, or the same derived new id).
                        held.release(self.conn).await;
                        return Err(e);
                    }
                    held.acked.set(held.acked.get() + 1);
                    report.replayed.push(Replayed {
                        id: d.id.clone(),
                        replayed_as,
                        reason: d.reason.clone(),
                        exchange,
                        routing_key,
                        edited: opts.edit.is_some(),
                    });
                }
                Ok(Published::Unroutable) => report.skipped.push(Skipped {
                    id: d.id.clone(),
                    reason: d.reason.clone(),
                    why: format!(
                        "no queue is bound for routing key '{routing_key}' on exchange '{exchange}'; start its consumer (or `journeyman topology declare`) and replay again"
                    ),
                }),
                Err(e) => {
                    held.release(self.conn).await;
                    return Err(e.into());
                }
            }
            progress(i + 1, total);
        }
        held.release(self.conn).await;
        Ok(report)
    }

    /// The copy to republish, or why this dead letter cannot be replayed.
    fn replay_copy(
        &self,
        d: &DeadLetter,
        opts: &ReplayOptions,
        now: DateTime<Utc>,
    ) -> Result<Outgoing, String> {
        if d.is_record() {
            let client = d.client_id.as_deref().unwrap_or("<client>");
            let instead = if d.reason == "rollback_failed" {
                format!("journeyman journey rollback {client} --reason ...")
            } else {
                format!("journeyman journey resume {client}")
            };
            return Err(format!(
                "a record of a failed unit of work, not a command: retry the work with `{instead}`, then `journeyman dlq purge {}`",
                d.id
            ));
        }
        if d.original_exchange.is_empty() && d.original_routing_key.is_empty() {
            return Err("its original destination is unknown (no exchange, no routing key)".into());
        }
        if !opts.new_id && d.seen_by_orchestrator(&self.names) {
            return Err(
                "the orchestrator refused it and recorded its id as seen, so a copy with the same id would be dropped as a duplicate: replay it with --new-id".into(),
            );
        }
        let mut message_id = d.id.clone();
        let mut body = d.body.clone();
        let mut message_type = d
            .properties
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .filter(|t| t != "dead_letter");
        if opts.new_id || opts.edit.is_some() {
            let mut env = match d.body_json() {
                Some(Value::Object(m)) => m,
                _ => {
                    return Err(
                        "its body is not a JSON envelope, so it cannot get a new id or an edited payload"
                            .into(),
                    );
                }
            };
            if let Some(payload) = &opts.edit {
                env.insert("payload".into(), Value::Object(payload.clone()));
            }
            if opts.new_id {
                message_id = derived_id(d, opts.edit.as_ref());
                env.insert("message_id".into(), Value::from(message_id.as_str()));
            }
            body = serde_json::to_vec(&env).map_err(|e| e.to_string())?;
        }
        if let Some(Value::String(t)) = d.body_json().map(|b| b["message_type"].clone()) {
            message_type = Some(t);
        }
        // Headers: keep what the original carried (trace context, task headers), drop the
        // dead-letter bookkeeping, keep the failure history.
        let mut headers: Vec<(String, String)> = Vec::new();
        if let Some(h) = d.properties.headers() {
            for k in h.inner().keys() {
                let k = k.as_str();
                let drop = matches!(
                    k,
                    headers::REASON
                        | headers::REASON_MESSAGE
                        | headers::ORIGINAL_EXCHANGE
                        | headers::ORIGINAL_ROUTING_KEY
                        | headers::ORIGINAL_QUEUE
                        | headers::FAILED_AT
                        | headers::ATTEMPTS
                        | headers::REPLAYED_AT
                        | headers::EDITED_AT
                        | "x-death"
                        | "x-delivery-count"
                ) || k.starts_with("x-first-death-")
                    || k.starts_with("x-last-death-");
                if !drop && let Some(v) = broker::header(&d.properties, k) {
                    headers.push((k.to_string(), v));
                }
            }
        }
        // A journey command reaches its partition by the client id header: one refused for
        // lacking it goes back with it, taken from its (possibly edited) payload.
        if d.original_routing_key.starts_with("journey.")
            && !headers.iter().any(|(k, _)| k == headers::CLIENT_ID)
            && let Some(client) = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["payload"]["client_id"].as_str().map(str::to_string))
        {
            headers.push((headers::CLIENT_ID.to_string(), client));
        }
        if !headers.iter().any(|(k, _)| k == headers::FIRST_FAILED_AT)
            && let Some(t) = d.first_failed_at.or(d.failed_at)
        {
            headers.push((headers::FIRST_FAILED_AT.to_string(), t.to_rfc3339()));
        }
        headers.push((headers::ATTEMPTS.to_string(), (d.attempts + 1).to_string()));
        headers.push((headers::REPLAYED_AT.to_string(), now.to_rfc3339()));
        if opts.edit.is_some() {
            // The orchestrator records an edited replay, with its payload, in the
            // journey's history.
            headers.push((headers::EDITED_AT.to_string(), now.to_rfc3339()));
        }
        if message_id != d.id {
            headers.push((headers::REPLAY_OF.to_string(), d.id.clone()));
        }
        let prop =
            |x: &Option<lapin::types::ShortString>| x.as_ref().map(|s| s.as_str().to_string());
        Ok(Outgoing {
            exchange: d.original_exchange.clone(),
            routing_key: d.original_routing_key.clone(),
            mandatory: true,
            message_id,
            correlation_id: prop(d.properties.correlation_id()),
            reply_to: prop(d.properties.reply_to()),
            message_type: message_type.unwrap_or_else(|| "request".into()),
            headers,
            body,
        })
    }

    /// Removes the selected dead letters. `progress(done, total)` after each.
    pub async fn purge(
        &self,
        selector: &Selector,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<PurgeReport, DlqError> {
        let held = self.hold().await?;
        let now = Utc::now();
        let targets: Vec<&(u64, DeadLetter)> = held
            .items
            .iter()
            .filter(|(_, d)| selector.matches(d, now))
            .collect();
        if let (Selector::Id(id), true) = (selector, targets.is_empty()) {
            held.release(self.conn).await;
            return Err(DlqError::NotFound {
                id: id.clone(),
                queue: self.queue(),
            });
        }
        let mut report = PurgeReport::default();
        let total = targets.len();
        for (i, (tag, d)) in targets.into_iter().enumerate() {
            if let Err(e) = held
                .ch
                .basic_ack(*tag, BasicAckOptions::default())
                .await
                .map_err(amqp("basic.ack"))
            {
                held.release(self.conn).await;
                return Err(e);
            }
            held.acked.set(held.acked.get() + 1);
            report.purged.push(d.id.clone());
            progress(i + 1, total);
        }
        // Acks are asynchronous; closing the channel after them is what makes them final
        // before this returns.
        held.release(self.conn).await;
        Ok(report)
    }
}

/// A replay's new message id: a UUID derived from the dead letter's id, attempts and
/// edit, so repeating a replay (after a crash between confirm and removal) gives the
/// same id and the consumer's dedup still applies it once.
pub fn derived_id(d: &DeadLetter, edit: Option<&Map<String, Value>>) -> String {
    let mut h = Sha256::new();
    h.update(b"journeyman-replay\0");
    h.update(d.id.as_bytes());
    h.update(b"\0");
    h.update(d.attempts.to_string().as_bytes());
    h.update(b"\0");
    if let Some(e) = edit {
        h.update(Value::Object(e.clone()).to_string().as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Parses a rate: `N`, `N/s` or `N/m` (messages per second or minute).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => match unit {
            "s" | "sec" => (n, 1.0),
            "m" | "min" => (n, 60.0),
            other => return Err(format!("unknown unit '/{other}' (use N/s or N/m)")),
        },
        None => (s, 1.0),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a rate; e.g. 10/s or 30/m"))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("the rate must be above 0, got '{s}'"));
    }
    Ok(n / per)
}

// ---------------------------------------------------------------------------------------
// The `journeyman dlq` command line.

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead letters (queue order), without consuming or reordering anything.
    List {
        /// Only this reason code (not_found, schema_invalid, delivery_limit, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only this intent (the original routing key, e.g. journey.evidence).
        #[arg(long)]
        intent: Option<String>,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Counts by reason and by intent.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// A dead letter in full: envelope, properties and headers.
    Show {
        /// Its id (the first column of `dlq list`).
        message_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Republish to the original exchange and routing key, then remove from the dead
    /// letters.
    ///
    /// Publishes with the mandatory flag and publisher confirms, and removes a dead letter
    /// only after its copy is confirmed. The copy keeps the message id, so a crash mid-replay
    /// is harmless (the consumer drops the duplicate); messages the orchestrator itself
    /// refused need --new-id.
    Replay(ReplayArgs),
    /// Remove dead letters for good.
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["message_id", "reason", "all"])))]
pub struct ReplayArgs {
    /// The id of one dead letter.
    pub message_id: Option<String>,
    /// Every dead letter with this reason code.
    #[arg(long)]
    pub reason: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Throttle: messages per second (N, N/s or N/m).
    #[arg(long, default_value = "10/s", value_parser = parse_rate)]
    pub rate: f64,
    /// Replace the envelope's payload with the JSON object in FILE.
    #[arg(long, value_name = "FILE")]
    pub edit: Option<PathBuf>,
    /// Give the copy a new message id (derived, so repeating the replay is still safe).
    /// Needed for messages the orchestrator refused: it has seen their id.
    #[arg(long)]
    pub new_id: bool,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub yes: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["message_id", "reason", "older_than"])))]
pub struct PurgeArgs {
    /// The id of one dead letter.
    pub message_id: Option<String>,
    /// Every dead letter with this reason code.
    #[arg(long)]
    pub reason: Option<String>,
    /// Every dead letter dead-lettered longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_parser = crate::ops::settings::duration)]
    pub older_than: Option<Duration>,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub yes: bool,
    #[arg(long)]
    pub json: bool,
}

/// Runs a `journeyman dlq` command.
pub async fn run(amqp_url: &str, names: Names, cmd: DlqCmd) -> Result<(), DlqError> {
    let conn = broker::connect(amqp_url, "journeyman-dlq").await?;
    let dlq = Dlq::new(&conn, names);
    // The connection ends with the process, as for `journey` commands: closing it here
    // races the publisher's channel, which closes on its own once dropped.
    run_on(&dlq, cmd).await
}

fn print_json(v: &impl Serialize) -> Result<(), DlqError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| DlqError::Usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn progress_printer(what: &'static str) -> impl FnMut(usize, usize) {
    move |done, total| {
        if total > PROGRESS_EVERY && (done % PROGRESS_EVERY == 0 || done == total) {
            eprintln!("{what} {done}/{total}");
        }
    }
}

/// Asks on the terminal; refuses when there is none.
async fn confirm(question: String, what: &str) -> Result<(), DlqError> {
    if !std::io::stdin().is_terminal() {
        return Err(DlqError::NeedsYes { what: what.into() });
    }
    let yes = tokio::task::spawn_blocking(move || {
        eprint!("{question} [y/N] ");
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map(|_| matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
    })
    .await
    .map_err(|e| DlqError::Usage(e.to_string()))??;
    if yes { Ok(()) } else { Err(DlqError::Aborted) }
}

async fn run_on(dlq: &Dlq<'_>, cmd: DlqCmd) -> Result<(), DlqError> {
    match cmd {
        DlqCmd::List {
            reason,
            intent,
            client,
            json,
        } => {
            let filter = Filter {
                reason,
                intent,
                client,
            };
            let all = dlq.list(&filter).await?;
            if json {
                let all: Vec<Value> = all.iter().map(DeadLetter::to_summary_json).collect();
                return print_json(&all);
            }
            print_table(&all);
            Ok(())
        }
        DlqCmd::Stats { json } => {
            let s = dlq.stats().await?;
            if json {
                return print_json(&s);
            }
            println!("{} dead letter(s) in {}", s.total, dlq.queue());
            println!("\nby reason:");
            for (k, n) in &s.by_reason {
                println!("  {n:>6}  {k}");
            }
            println!("\nby intent (original routing key):");
            for (k, n) in &s.by_intent {
                println!("  {n:>6}  {}", if k.is_empty() { "-" } else { k });
            }
            Ok(())
        }
        DlqCmd::Show { message_id, json } => {
            let found = dlq.show(&message_id).await?;
            let full: Vec<Value> = found.iter().map(DeadLetter::to_full_json).collect();
            if json {
                return if full.len() == 1 {
                    print_json(&full[0])
                } else {
                    print_json(&full)
                };
            }
            for (d, v) in found.iter().zip(&full) {
                print_show(d, v);
            }
            Ok(())
        }
        DlqCmd::Replay(a) => {
            let selector = match (a.message_id, a.reason, a.all) {
                (Some(id), _, _) => Selector::Id(id),
                (None, Some(r), _) => Selector::Reason(r),
                _ => Selector::All,
            };
            let edit = match &a.edit {
                None => None,
                Some(path) => Some(read_edit(path)?),
            };
            if !a.yes && !matches!(selector, Selector::Id(_)) {
                let n = dlq.count(&selector).await?;
                if n == 0 {
                    println!("nothing to replay ({})", selector.describe());
                    return Ok(());
                }
                confirm(
                    format!(
                        "replay {n} dead letter(s) ({}) at {}/s?",
                        selector.describe(),
                        a.rate
                    ),
                    "replay of several messages",
                )
                .await?;
            }
            let opts = ReplayOptions {
                rate: a.rate,
                new_id: a.new_id,
                edit,
            };
            let report = dlq
                .replay(&selector, &opts, &mut progress_printer("replayed"))
                .await?;
            if a.json {
                print_json(&report)?;
            } else {
                for r in &report.replayed {
                    let as_id = if r.replayed_as != r.id {
                        format!(" as {}", r.replayed_as)
                    } else {
                        String::new()
                    };
                    println!(
                        "replayed {}{as_id} -> exchange '{}', routing key '{}'",
                        r.id, r.exchange, r.routing_key
                    );
                }
                for s in &report.skipped {
                    eprintln!("skipped {} ({}): {}", s.id, s.reason, s.why);
                }
                println!(
                    "{} replayed, {} skipped",
                    report.replayed.len(),
                    report.skipped.len()
                );
            }
            if opts.edit.is_some() && !report.replayed.is_empty() {
                eprintln!(
                    "note: the edited payload enters the journey's history only when the orchestrator applies it; check with `journeyman journey status <client>`"
                );
            }
            if report.skipped.is_empty() {
                Ok(())
            } else {
                Err(DlqError::Incomplete(report.skipped.len()))
            }
        }
        DlqCmd::Purge(a) => {
            let selector = match (a.message_id, a.reason, a.older_than) {
                (Some(id), _, _) => Selector::Id(id),
                (None, Some(r), _) => Selector::Reason(r),
                (None, None, Some(d)) => Selector::OlderThan(d),
                (None, None, None) => {
                    return Err(DlqError::Usage(
                        "say what to purge: a message id, --reason or --older-than".into(),
                    ));
                }
            };
            if !a.yes {
                let n = dlq.count(&selector).await?;
                if n == 0 {
                    if let Selector::Id(id) = &selector {
                        return Err(DlqError::NotFound {
                            id: id.clone(),
                            queue: dlq.queue(),
                        });
                    }
                    println!("nothing to purge ({})", selector.describe());
                    return Ok(());
                }
                confirm(
                    format!(
                        "purge {n} dead letter(s) ({}) from {} for good?",
                        selector.describe(),
                        dlq.queue()
                    ),
                    "purge",
                )
                .await?;
            }
            let report = dlq
                .purge(&selector, &mut progress_printer("purged"))
                .await?;
            if a.json {
                print_json(&report)?;
            } else {
                println!("purged {} dead letter(s)", report.purged.len());
            }
            Ok(())
        }
    }
}

fn read_edit(path: &PathBuf) -> Result<Map<String, Value>, DlqError> {
    let err = |why: String| DlqError::Edit {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(
            "must hold a JSON object (the new payload), e.g. {\"client_id\": \"acme\"}".into(),
        )),
        Err(e) => Err(err(format!("not valid JSON: {e}"))),
    }
}

fn short_time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn print_table(all: &[DeadLetter]) {
    println!(
        "{:<36}  {:<20}  {:<24}  {:<16}  {:>3}  {:<19}  message",
        "id", "reason", "intent", "client", "att", "failed at (UTC)"
    );
    for d in all {
        let redacted = crate::wire::redact::redact_text;
        println!(
            "{:<36}  {:<20}  {:<24}  {:<16}  {:>3}  {:<19}  {}",
            redacted(&d.id),
            truncate(&d.reason, 20),
            truncate(
                if d.intent().is_empty() {
                    "-"
                } else {
                    d.intent()
                },
                24
            ),
            truncate(d.client_id.as_deref().unwrap_or("-"), 16),
            d.attempts,
            short_time(d.failed_at),
            truncate(&redacted(&d.reason_message), 60)
        );
    }
    println!("{} dead letter(s)", all.len());
}

fn print_show(d: &DeadLetter, full: &Value) {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let redacted = crate::wire::redact::redact_text;
    println!("id:             {}", redacted(&d.id));
    let by = match d.dead_lettered_by {
        DeadLetteredBy::Journeyman => "journeyman",
        DeadLetteredBy::Broker => "the broker (x-death)",
    };
    println!("reason:         {} (dead-lettered by {by})", d.reason);
    println!("message:        {}", redacted(&d.reason_message));
    println!(
        "from:           exchange {}, routing key {}, queue {}",
        or_dash(&d.original_exchange),
        or_dash(&d.original_routing_key),
        or_dash(&d.original_queue)
    );
    println!(
        "failed at:      {} (first {}), {} attempt(s)",
        short_time(d.failed_at),
        short_time(d.first_failed_at),
        d.attempts
    );
    println!(
        "client / task:  {} / {}",
        d.client_id.as_deref().unwrap_or("-"),
        d.task_id.as_deref().unwrap_or("-")
    );
    println!("properties:");
    if let Some(p) = full["properties"].as_object() {
        for (k, v) in p.iter().filter(|(_, v)| !v.is_null()) {
            println!("  {k:<15} {v}");
        }
    }
    println!("headers:");
    if let Some(h) = full["headers"].as_object() {
        for (k, v) in h {
            println!("  {k:<34} {v}");
        }
    }
    println!("body ({} bytes):", d.body.len());
    match serde_json::to_string_pretty(&full["body"]) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{}", full["body"]),
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10"), Ok(10.0));
        assert_eq!(parse_rate("10/s"), Ok(10.0));
        assert_eq!(parse_rate("30/m"), Ok(0.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("3/h").is_err());
    }

    #[test]
    fn header_values_become_json() {
        let mut t = BTreeMap::new();
        t.insert(
            lapin::types::ShortString::from("reason"),
            AMQPValue::LongString("delivery_limit".into()),
        );
        t.insert(
            lapin::types::ShortString::from("count"),
            AMQPValue::LongLongInt(21),
        );
        let v = amqp_to_json(&AMQPValue::FieldArray(
            vec![AMQPValue::FieldTable(FieldTable::from(t))].into(),
        ));
        assert_eq!(v, json!([{"count": 21, "reason": "delivery_limit"}]));
    }

    #[test]
    fn previews_escape_binary() {
        assert_eq!(preview(&[0xff, b'a', 0], 10), "\\xffa\\x00");
        assert_eq!(preview(b"abcdef", 3), "abc…");
    }
}
