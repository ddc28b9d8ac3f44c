//! The orchestrator worker: consumes journey commands and task replies, advances journeys
//! and their units of work, and publishes task requests, replies and events.
//!
//! Every input goes through the same path: decode → dedup by message id → apply the change
//! and record what to publish in one atomic store batch → flush (one fsync per group of
//! inputs) → ack → publish with confirms → clear the outbox. A crash between any two steps
//! loses nothing: before the flush the message is redelivered; after it the dedup mark
//! absorbs the redelivery and the outbox still holds what to publish.
//!
//! Decisions live in `journey` (transitions) and `work` (the DAG); this module turns them
//! into store writes and messages. It owns the timers (task deadlines and retry times,
//! read back from the store on start) and the reconnect loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::broker::{self, BrokerError, Names, Outgoing, Published, Publisher};
use crate::journey::{Event, Journey, Stage, TransitionError};
use crate::playbook::Playbook;
use crate::protocol::{
    AgentRef, Command, Decoder, Envelope, ErrorPayload, JOURNEY_INTENTS, MessageType,
    ProtocolError, TaskOutcome,
};
use crate::store::{Change, OutboxEntry, Purpose, Store, StoreError};
use crate::work::{JourneyView, ReplyEffect, UnitOfWork, WorkStatus};

/// How many inputs share one flush: bigger groups amortise the fsync further, at the cost
/// of holding acks a little longer.
const MAX_GROUP: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the default playbook's stored version {0} is missing from the store")]
    MissingPlaybook(String),
}

impl OrchestratorError {
    /// Broker trouble is retried by reconnecting; store trouble stops the worker.
    pub fn is_retryable(&self) -> bool {
        match self {
            OrchestratorError::Broker(e) => e.is_retryable(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: String,
    pub names: Names,
    pub data_dir: PathBuf,
    /// Names this orchestrator's reply queue; several orchestrators (partitions) need
    /// distinct ids.
    pub orchestrator_id: String,
    pub playbook: Playbook,
    pub prefetch: u16,
    pub max_message_bytes: usize,
}

impl Config {
    pub fn new(amqp_url: &str, namespace: &str, data_dir: PathBuf) -> Self {
        Self {
            amqp_url: amqp_url.to_string(),
            names: Names::new(namespace),
            data_dir,
            orchestrator_id: "0".into(),
            playbook: Playbook::default_playbook(),
            prefetch: 256,
            max_message_bytes: crate::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Counters the demo and tests read; the metrics endpoint will export them.
#[derive(Debug, Default)]
pub struct Stats {
    pub journeys_started: AtomicU64,
    pub tasks_dispatched: AtomicU64,
    pub tasks_completed: AtomicU64,
    pub retries: AtomicU64,
    pub works_failed: AtomicU64,
    pub promotions: AtomicU64,
    pub dead_letters: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale_replies: AtomicU64,
    pub refusals: AtomicU64,
    pub inputs: AtomicU64,
    pub flushes: AtomicU64,
    /// True while connected and consuming.
    pub ready: AtomicBool,
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Everything the store keeps about one journey, under its client id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JourneyRecord {
    pub journey: Journey,
    /// Content hash of the playbook the journey is pinned to.
    pub playbook: String,
    pub context: Value,
    pub work: Option<UnitOfWork>,
    /// Numbers units of work so their ids are unique across re-entries of a stage.
    pub work_seq: u32,
    pub history_seq: u64,
    #[serde(default)]
    pub evidence: Vec<Value>,
}

/// One line of a journey's history: every state change, refusal and ignored reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: Value,
    /// The message that caused it, when there was one.
    pub cause: Option<String>,
}

/// What a dedup mark remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    at: DateTime<Utc>,
}

/// The public view of a journey: the payload of `response` replies and `journey status`.
pub fn state_view(rec: &JourneyRecord) -> Value {
    let work = rec.work.as_ref().map(|w| {
        json!({
            "stage": w.stage,
            "status": w.status,
            "tasks": w.tasks.iter().map(|t| json!({
                "task_id": t.task_id,
                "intent": t.intent,
                "status": t.status,
                "attempts": t.attempts,
                "last_error": t.last_error,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "client_id": rec.journey.client_id,
        "stage": rec.journey.stage,
        "previous_stage": rec.journey.previous_stage,
        "completed_stages": rec.journey.completed_stages,
        "started_at": rec.journey.started_at,
        "stage_started_at": rec.journey.stage_started_at,
        "playbook": rec.playbook,
        "work": work,
    })
}

/// The payload of a journey event on `<ns>.events` (`schemas/journey-event.schema.json`).
pub fn event_payload(rec: &JourneyRecord, name: &str, detail: Value, at: DateTime<Utc>) -> Value {
    json!({
        "client_id": rec.journey.client_id,
        "event": name,
        "stage": rec.journey.stage,
        "previous_stage": rec.journey.previous_stage,
        "at": at,
        "detail": detail,
    })
}

enum Source {
    Command,
    Reply,
}

enum Input {
    Delivery {
        source: Source,
        queue: Arc<str>,
        delivery: Box<lapin::message::Delivery>,
    },
    Unroutable {
        outbox_id: u64,
        client_id: String,
        correlation_id: String,
    },
    Failed(BrokerError),
}

/// A refusal of a journey command: answered with an `error`, and dead-lettered.
struct Refusal {
    code: &'static str,
    message: String,
}

impl From<TransitionError> for Refusal {
    fn from(e: TransitionError) -> Self {
        let code = match e {
            TransitionError::InvalidRollbackTarget { .. } => "invalid_rollback_target",
            _ => "invalid_transition",
        };
        Refusal {
            code,
            message: e.to_string(),
        }
    }
}

/// The orchestrator's state between inputs: the store, the timers, the playbooks.
struct Core {
    store: Store,
    names: Names,
    reply_queue: String,
    decoder: Decoder,
    current_playbook: String,
    playbooks: HashMap<String, Arc<Playbook>>,
    /// (due, client): wake-ups for task deadlines and retries. Duplicates are harmless:
    /// firing re-reads the journey and only acts on what is due.
    timers: BTreeSet<(DateTime<Utc>, String)>,
    stats: Arc<Stats>,
}

/// Runs the orchestrator until `shutdown` resolves. Reconnects with backoff on broker
/// failures; store failures are fatal.
pub async fn run(
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OrchestratorError> {
    let store = Store::open(&config.data_dir)?;
    let hash = config.playbook.content_hash();
    let mut change = Change::new();
    change.put_playbook(&hash, &config.playbook);
    store.commit(change)?;
    store.flush().await?;
    let mut playbooks = HashMap::new();
    playbooks.insert(hash.clone(), Arc::new(config.playbook.clone()));
    let mut core = Core {
        store,
        names: config.names.clone(),
        reply_queue: config.names.replies(&config.orchestrator_id),
        decoder: Decoder::new(config.max_message_bytes),
        current_playbook: hash,
        playbooks,
        timers: BTreeSet::new(),
        stats: stats.clone(),
    };
    core.load_timers()?;
    info!(
        data_dir = %config.data_dir.display(),
        namespace = %config.names.namespace,
        playbook = %core.current_playbook,
        timers = core.timers.len(),
        "orchestrator starting"
    );
    tokio::pin!(shutdown);
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let result = core.session(&config, &mut shutdown).await;
        stats.ready.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => {
                info!("orchestrator stopped");
                return Ok(());
            }
            Err(e) if e.is_retryable() => {
                let wait = delays.next().unwrap_or(Duration::from_secs(10));
                warn!(error = %e, retry_in = ?wait, "broker session ended; reconnecting");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                error!(error = %e, "orchestrator cannot continue");
                return Err(e);
            }
        }
    }
}

impl Core {
    fn playbook(&mut self, hash: &str) -> Result<Arc<Playbook>, OrchestratorError> {
        if let Some(p) = self.playbooks.get(hash) {
            return Ok(p.clone());
        }
        let p: Playbook = self
            .store
            .playbook(hash)?
            .ok_or_else(|| OrchestratorError::MissingPlaybook(hash.to_string()))?;
        let p = Arc::new(p);
        self.playbooks.insert(hash.to_string(), p.clone());
        Ok(p)
    }

    fn load_timers(&mut self) -> Result<(), OrchestratorError> {
        let mut timers = BTreeSet::new();
        for rec in self.store.journeys::<JourneyRecord>() {
            let rec = rec?;
            if let Some(w) = &rec.work {
                for (at, _, _) in w.timers() {
                    timers.insert((at, rec.journey.client_id.clone()));
                }
            }
        }
        self.timers = timers;
        Ok(())
    }

    /// One broker session: connect, declare, consume, and handle inputs until an error or
    /// shutdown.
    async fn session(
        &mut self,
        config: &Config,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), OrchestratorError> {
        // Separate connections: a memory alarm blocks publishers, and consumers must keep
        // acking meanwhile.
        let consume_conn =
            broker::connect(&config.amqp_url, "journeyman-orchestrator-consume").await?;
        let publish_conn =
            broker::connect(&config.amqp_url, "journeyman-orchestrator-publish").await?;
        let ch = consume_conn
            .create_channel()
            .await
            .map_err(|source| BrokerError::Amqp {
                op: "create channel".into(),
                source,
            })?;
        broker::declare_exchanges(&ch, &self.names).await?;
        for intent in JOURNEY_INTENTS {
            let q = self.names.intent_queue(intent);
            broker::declare_queue(&ch, &self.names, &q, Some(intent)).await?;
        }
        broker::declare_queue(&ch, &self.names, &self.reply_queue, None).await?;

        let (tx, mut rx) = mpsc::channel::<Input>(4096);
        let publisher = Publisher::start(&publish_conn).await?;
        let pump = OutboxPump::start(publisher, self.store.clone(), tx.clone());
        // Whatever a previous session or process left unpublished goes first.
        pump.send(self.store.outbox()?);

        let mut queues: Vec<(String, Source)> = JOURNEY_INTENTS
            .iter()
            .map(|i| (self.names.intent_queue(i), Source::Command))
            .collect();
        queues.push((self.reply_queue.clone(), Source::Reply));
        let mut channels = Vec::new();
        for (q, source) in queues {
            let (chan, consumer) = broker::consume(
                &consume_conn,
                &q,
                "journeyman-orchestrator",
                config.prefetch,
            )
            .await?;
            channels.push(chan);
            let tx = tx.clone();
            let queue: Arc<str> = Arc::from(q.as_str());
            tokio::spawn(async move {
                let mut consumer = consumer;
                let mut source = Some(source);
                while let Some(next) = consumer.next().await {
                    match next {
                        Ok(delivery) => {
                            let s = match source.as_ref() {
                                Some(Source::Command) => Source::Command,
                                _ => Source::Reply,
                            };
                            let input = Input::Delivery {
                                source: s,
                                queue: queue.clone(),
                                delivery: Box::new(delivery),
                            };
                            if tx.send(input).await.is_err() {
                                return;
                            }
                        }
                        Err(source) => {
                            let _ = tx
                                .send(Input::Failed(BrokerError::Amqp {
                                    op: format!("consume {queue}"),
                                    source,
                                }))
                                .await;
                            return;
                        }
                    }
                }
                source.take();
                // The stream ended without an error: the broker cancelled the consumer.
                let _ = tx
                    .send(Input::Failed(BrokerError::ConsumerCancelled(
                        queue.to_string(),
                    )))
                    .await;
            });
        }
        drop(tx);
        self.stats.ready.store(true, Ordering::Relaxed);
        info!(queues = channels.len(), "consuming");

        loop {
            let next_timer = self.timers.first().map(|(at, _)| *at);
            let sleep = match next_timer {
                Some(at) => (at - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::from_secs(3600),
            };
            let first = tokio::select! {
                _ = shutdown.as_mut() => {
                    info!("shutdown requested; finishing");
                    return Ok(());
                }
                input = rx.recv() => match input {
                    Some(i) => Some(i),
                    None => return Err(BrokerError::PublisherGone.into()),
                },
                _ = tokio::time::sleep(sleep) => None,
            };
            let mut group: Vec<Input> = first.into_iter().collect();
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(i) => group.push(i),
                    Err(_) => break,
                }
            }
            let mut published = Vec::new();
            // Highest delivery per queue: one multiple-ack per channel after the flush.
            let mut acks: BTreeMap<Arc<str>, Box<lapin::message::Delivery>> = BTreeMap::new();
            let mut failure = None;
            for input in group {
                match input {
                    Input::Delivery {
                        source,
                        queue,
                        delivery,
                    } => {
                        Stats::inc(&self.stats.inputs);
                        published.extend(self.handle_delivery(&source, &queue, &delivery)?);
                        acks.insert(queue, delivery);
                    }
                    Input::Unroutable {
                        outbox_id,
                        client_id,
                        correlation_id,
                    } => {
                        published.extend(self.handle_unroutable(
                            outbox_id,
                            &client_id,
                            &correlation_id,
                        )?);
                    }
                    Input::Failed(e) => failure = Some(e),
                }
            }
            published.extend(self.fire_timers(Utc::now())?);
            if !acks.is_empty() || !published.is_empty() {
                self.store.flush().await?;
                Stats::inc(&self.stats.flushes);
            }
            for (queue, d) in acks {
                let opts = BasicAckOptions { multiple: true };
                match d.acker.ack(opts).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(%queue, "ack not delivered (channel closed); the messages will be redelivered and deduplicated")
                    }
                    Err(e) => {
                        warn!(%queue, error = %e, "ack failed; the messages will be redelivered and deduplicated")
                    }
                }
            }
            pump.send(published);
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
    }

    fn new_record_change(&self) -> Change {
        Change::new()
    }

    fn handle_delivery(
        &mut self,
        source: &Source,
        queue: &str,
        d: &lapin::message::Delivery,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let env = match self.decoder.envelope(&d.data) {
            Ok(env) => env,
            Err(e) => return self.refuse_input(queue, d, None, &e),
        };
        let span = info_span!("message", intent = %env.intent, message_id = %env.message_id,
            correlation_id = env.correlation_id.as_deref().unwrap_or(""));
        let _g = span.enter();
        let mid = env.message_id.to_string();
        if self.store.dedup::<Seen>(&mid)?.is_some() {
            Stats::inc(&self.stats.duplicates);
            debug!("duplicate message; already applied");
            return Ok(Vec::new());
        }
        let reply_to = d
            .properties
            .reply_to()
            .as_ref()
            .map(|s| s.as_str().to_string());
        match source {
            Source::Command => match self.decoder.command(&env) {
                Ok(cmd) => self.apply_command(&env, cmd, reply_to.as_deref(), queue, d),
                Err(e) => self.refuse_input(queue, d, Some(&env), &e),
            },
            Source::Reply => match self.decoder.task_reply(&env) {
                Ok(outcome) => self.apply_reply(&env, outcome),
                Err(e) => self.refuse_input(queue, d, Some(&env), &e),
            },
        }
    }

    /// Dead-letters an input that failed decoding, with its reason, and marks it seen.
    fn refuse_input(
        &mut self,
        queue: &str,
        d: &lapin::message::Delivery,
        env: Option<&Envelope>,
        e: &ProtocolError,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        warn!(queue, reason = e.reason_code(), error = %e, "refused message; dead-lettering it");
        let mut change = self.new_record_change();
        let mid = env.map(|e| e.message_id.to_string()).or_else(|| {
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
        });
        if let Some(mid) = &mid {
            if self.store.dedup::<Seen>(mid)?.is_some() {
                return Ok(Vec::new());
            }
            change.put_dedup(mid, &Seen { at: Utc::now() });
        }
        change.push_outbox(
            self.dead_letter(
                DeadLetter {
                    reason: e.reason_code(),
                    message: e.to_string(),
                    exchange: d.exchange.as_str(),
                    routing_key: d.routing_key.as_str(),
                    queue,
                    client_id: None,
                    task_id: None,
                },
                mid.unwrap_or_else(|| Uuid::new_v4().to_string()),
                d.properties
                    .correlation_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string()),
                d.data.clone(),
            ),
        );
        Stats::inc(&self.stats.dead_letters);
        Ok(self.store.commit(change)?)
    }

    fn dead_letter(
        &self,
        dl: DeadLetter<'_>,
        message_id: String,
        correlation_id: Option<String>,
        body: Vec<u8>,
    ) -> OutboxEntry {
        let now = Utc::now().to_rfc3339();
        let mut headers = vec![
            ("x-journeyman-reason".to_string(), dl.reason.to_string()),
            ("x-journeyman-reason-message".to_string(), dl.message),
            (
                "x-journeyman-original-exchange".to_string(),
                dl.exchange.to_string(),
            ),
            (
                "x-journeyman-original-routing-key".to_string(),
                dl.routing_key.to_string(),
            ),
            (
                "x-journeyman-original-queue".to_string(),
                dl.queue.to_string(),
            ),
            ("x-journeyman-failed-at".to_string(), now.clone()),
            ("x-journeyman-first-failed-at".to_string(), now),
            ("x-journeyman-attempts".to_string(), "1".to_string()),
        ];
        if let Some(c) = dl.client_id {
            headers.push(("x-journeyman-client-id".into(), c.to_string()));
        }
        if let Some(t) = dl.task_id {
            headers.push(("x-journeyman-task-id".into(), t.to_string()));
        }
        OutboxEntry {
            id: 0,
            exchange: self.names.dlx(),
            routing_key: dl.routing_key.to_string(),
            mandatory: false,
            message_id,
            correlation_id,
            reply_to: None,
            message_type: "dead_letter".into(),
            headers,
            purpose: Purpose::DeadLetter,
            body,
        }
    }

    fn reply(
        &self,
        to: &str,
        request: &Envelope,
        message_type: MessageType,
        payload: Value,
    ) -> OutboxEntry {
        let env = Envelope::new(
            AgentRef::orchestrator(),
            request.source_agent.clone(),
            message_type,
            request.intent.clone(),
            payload,
            Utc::now(),
        )
        .with_correlation(request.reply_correlation());
        OutboxEntry {
            id: 0,
            exchange: String::new(),
            routing_key: to.to_string(),
            mandatory: false,
            message_id: env.message_id.to_string(),
            correlation_id: env.correlation_id.clone(),
            reply_to: None,
            message_type: message_type.as_str().into(),
            headers: Vec::new(),
            purpose: Purpose::Reply,
            body: env.to_bytes(),
        }
    }

    fn event(&self, rec: &JourneyRecord, name: &str, detail: Value) -> OutboxEntry {
        let payload = event_payload(rec, name, detail, Utc::now());
        let env = Envelope::new(
            AgentRef::orchestrator(),
            AgentRef::new("*", "journeyman"),
            MessageType::Event,
            name,
            payload,
            Utc::now(),
        );
        OutboxEntry {
            id: 0,
            exchange: self.names.events(),
            routing_key: name.to_string(),
            mandatory: false,
            message_id: env.message_id.to_string(),
            correlation_id: None,
            reply_to: None,
            message_type: "event".into(),
            headers: Vec::new(),
            purpose: Purpose::Event,
            body: env.to_bytes(),
        }
    }

    fn history(
        &self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        kind: &str,
        detail: Value,
        cause: Option<&str>,
    ) {
        rec.history_seq += 1;
        change.push_history(
            &rec.journey.client_id,
            rec.history_seq,
            &HistoryEntry {
                at: Utc::now(),
                kind: kind.to_string(),
                detail,
                cause: cause.map(str::to_string),
            },
        );
    }

    fn apply_command(
        &mut self,
        env: &Envelope,
        cmd: Command,
        reply_to: Option<&str>,
        queue: &str,
        d: &lapin::message::Delivery,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let client_id = cmd.client_id().to_string();
        let mid = env.message_id.to_string();
        let mut change = Change::new();
        change.put_dedup(&mid, &Seen { at: now });
        let existing: Option<JourneyRecord> = self.store.journey(&client_id)?;
        let outcome: Result<Option<JourneyRecord>, Refusal> = match (cmd, existing) {
            (Command::Start(p), None) => {
                let hash = self.current_playbook.clone();
                let mut rec = JourneyRecord {
                    journey: Journey::start(client_id.clone(), now),
                    playbook: hash,
                    context: Value::Object(p.context.unwrap_or_default()),
                    work: None,
                    work_seq: 0,
                    history_seq: 0,
                    evidence: Vec::new(),
                };
                Stats::inc(&self.stats.journeys_started);
                self.history(
                    &mut change,
                    &mut rec,
                    "started",
                    json!({"stage": "sandbox"}),
                    Some(&mid),
                );
                change.push_outbox(self.event(&rec, "journey.started", json!({})));
                self.enter_stage(&mut change, &mut rec, now)?;
                Ok(Some(rec))
            }
            (Command::Start(_), Some(rec)) => Err(Refusal {
                code: "already_exists",
                message: format!(
                    "client {client_id} already has a journey (stage {}); there is one journey per client",
                    rec.journey.stage
                ),
            }),
            (Command::Status(_), Some(rec)) => Ok(Some(rec)),
            (_, None) => Err(Refusal {
                code: "not_found",
                message: format!("no journey for client {client_id}; start one with journey.start"),
            }),
            (Command::Promote(_), Some(mut rec)) => {
                let done = rec.work.as_ref().is_some_and(|w| {
                    w.status == WorkStatus::Completed && w.stage == rec.journey.stage
                });
                if !done && rec.journey.stage.is_active_stage() {
                    Err(Refusal {
                        code: "not_ready",
                        message: format!(
                            "the {} unit of work is not complete; promotion waits for it",
                            rec.journey.stage
                        ),
                    })
                } else {
                    self.transition(&mut change, &mut rec, &Event::Promote, now, &mid)
                        .map(|_| Some(rec))
                }
            }
            (Command::Complete(_), Some(mut rec)) => {
                let done = rec
                    .work
                    .as_ref()
                    .is_some_and(|w| w.status == WorkStatus::Completed);
                if rec.journey.stage == Stage::Production && !done {
                    Err(Refusal {
                        code: "not_ready",
                        message: "the production unit of work is not complete".into(),
                    })
                } else {
                    self.transition(&mut change, &mut rec, &Event::Complete, now, &mid)
                        .map(|_| Some(rec))
                }
            }
            (Command::Cancel(p), Some(mut rec)) => {
                let reason = p.reason.unwrap_or_else(|| "cancelled".into());
                self.transition(&mut change, &mut rec, &Event::Cancel, now, &mid)
                    .map(|_| {
                        if let Some(w) = rec.work.as_mut()
                            && w.status == WorkStatus::Running
                        {
                            w.status = WorkStatus::Failed;
                            w.failure = Some(format!("journey cancelled: {reason}"));
                        }
                        Some(rec)
                    })
            }
            (Command::Rollback(p), Some(mut rec)) => {
                let event = Event::InitiateRollback { to: p.rollback_to };
                match self.transition(&mut change, &mut rec, &event, now, &mid) {
                    Err(r) => Err(r),
                    Ok(()) => {
                        // Rollback units of work and gates come with the gates work; for now
                        // the rollback completes at once.
                        let detail = json!({"reason": p.reason});
                        self.history(&mut change, &mut rec, "rollback_reason", detail, Some(&mid));
                        self.transition(&mut change, &mut rec, &Event::CompleteRollback, now, &mid)
                            .map(|_| Some(rec))
                    }
                }
            }
            (Command::Evidence(p), Some(mut rec)) => {
                let v = serde_json::to_value(&p).unwrap_or(Value::Null);
                rec.evidence
                    .push(json!({"at": now, "message_id": mid, "evidence": v}));
                self.history(&mut change, &mut rec, "evidence", json!({}), Some(&mid));
                Ok(Some(rec))
            }
            (Command::Resume(_), Some(mut rec)) => {
                let failed = rec
                    .work
                    .as_ref()
                    .is_some_and(|w| w.status == WorkStatus::Failed);
                if !failed || rec.journey.stage.is_terminal() {
                    Err(Refusal {
                        code: "invalid_transition",
                        message: format!(
                            "nothing to resume: the journey is in {} and its unit of work has not failed",
                            rec.journey.stage
                        ),
                    })
                } else {
                    if let Some(w) = rec.work.as_mut() {
                        w.resume();
                    }
                    self.history(&mut change, &mut rec, "resumed", json!({}), Some(&mid));
                    self.advance(&mut change, &mut rec, now)?;
                    Ok(Some(rec))
                }
            }
        };
        match outcome {
            Ok(Some(rec)) => {
                if let Some(to) = reply_to {
                    change.push_outbox(self.reply(
                        to,
                        env,
                        MessageType::Response,
                        state_view(&rec),
                    ));
                }
                change.put_journey(&client_id, &rec);
                self.arm(&rec);
            }
            Ok(None) => {}
            Err(r) => {
                Stats::inc(&self.stats.refusals);
                info!(client_id, code = r.code, reason = %r.message, "command refused");
                if let Some(to) = reply_to {
                    let payload = serde_json::to_value(ErrorPayload {
                        code: r.code.into(),
                        message: r.message.clone(),
                        retryable: false,
                        details: None,
                    })
                    .unwrap_or(Value::Null);
                    change.push_outbox(self.reply(to, env, MessageType::Error, payload));
                }
                // Refused state changes are kept for the on-call engineer; refused status
                // queries are just answered.
                if env.intent != "journey.status" {
                    Stats::inc(&self.stats.dead_letters);
                    change.push_outbox(self.dead_letter(
                        DeadLetter {
                            reason: r.code,
                            message: r.message,
                            exchange: d.exchange.as_str(),
                            routing_key: d.routing_key.as_str(),
                            queue,
                            client_id: Some(&client_id),
                            task_id: None,
                        },
                        mid.clone(),
                        env.correlation_id.clone(),
                        d.data.clone(),
                    ));
                }
            }
        }
        Ok(self.store.commit(change)?)
    }

    /// Applies a state-machine event, recording history and an event message.
    fn transition(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        event: &Event,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        let from = rec.journey.stage;
        let next = rec.journey.apply(event, now)?;
        rec.journey = next;
        let to = rec.journey.stage;
        let name = match event {
            Event::Promote => {
                Stats::inc(&self.stats.promotions);
                "journey.promoted"
            }
            Event::InitiateRollback { .. } => "journey.rollback_started",
            Event::CompleteRollback => "journey.rollback_completed",
            Event::Cancel => "journey.cancelled",
            Event::Complete => "journey.completed",
        };
        info!(client_id = %rec.journey.client_id, %from, %to, event = event.name(), "transition");
        let detail = json!({"from": from, "to": to, "event": event.name()});
        self.history(change, rec, "transition", detail.clone(), Some(cause));
        change.push_outbox(self.event(rec, name, detail));
        if to.is_active_stage() && matches!(event, Event::Promote | Event::CompleteRollback) {
            // Re-entering a stage runs its unit of work again.
            self.enter_stage(change, rec, now).map_err(|e| Refusal {
                code: "internal",
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn enter_stage(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        let playbook = self.playbook(&rec.playbook)?;
        let stage = rec.journey.stage;
        let Some(spec) = playbook.stage(stage.as_str()) else {
            rec.work = None;
            return Ok(());
        };
        rec.work_seq += 1;
        let work_id = format!("uow-{}-{}-{}", rec.journey.client_id, stage, rec.work_seq);
        rec.work = Some(UnitOfWork::new(work_id, stage, spec, now));
        self.advance(change, rec, now)
    }

    /// Dispatches what is ready; on completion promotes (sandbox, pilot) or reports it.
    fn advance(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        let playbook = self.playbook(&rec.playbook)?;
        let Some(work) = rec.work.as_mut() else {
            return Ok(());
        };
        let Some(spec) = playbook.stage(work.stage.as_str()) else {
            return Ok(());
        };
        let view = JourneyView {
            client_id: &rec.journey.client_id,
            context: &rec.context,
        };
        let was_running = work.status == WorkStatus::Running;
        let mut new_id = || Uuid::new_v4().to_string();
        let dispatches = work.advance(spec, &view, now, &mut new_id);
        let status = work.status;
        let failure = work.failure.clone();
        for d in dispatches {
            Stats::inc(&self.stats.tasks_dispatched);
            if d.attempt > 1 {
                Stats::inc(&self.stats.retries);
            }
            change.put_inflight(&d.correlation_id, &rec.journey.client_id);
            let env = Envelope::new(
                AgentRef::orchestrator(),
                AgentRef::new(
                    spec.task(&d.task_id)
                        .and_then(|t| t.agent_id.clone())
                        .unwrap_or_else(|| d.intent.clone()),
                    "journeyman",
                ),
                MessageType::Request,
                d.intent.clone(),
                d.input,
                now,
            )
            .with_correlation(d.correlation_id.clone());
            debug!(client_id = %rec.journey.client_id, task = %d.task_id, attempt = d.attempt, "dispatch");
            change.push_outbox(OutboxEntry {
                id: 0,
                exchange: self.names.intents(),
                routing_key: d.intent.clone(),
                mandatory: true,
                message_id: env.message_id.to_string(),
                correlation_id: Some(d.correlation_id.clone()),
                reply_to: Some(self.reply_queue.clone()),
                message_type: "request".into(),
                headers: vec![
                    (
                        "x-journeyman-client-id".into(),
                        rec.journey.client_id.clone(),
                    ),
                    ("x-journeyman-task-id".into(), d.task_id.clone()),
                    ("x-journeyman-attempt".into(), d.attempt.to_string()),
                ],
                purpose: Purpose::TaskRequest {
                    client_id: rec.journey.client_id.clone(),
                    correlation_id: d.correlation_id,
                },
                body: env.to_bytes(),
            });
        }
        if was_running && status == WorkStatus::Failed {
            self.work_failed(change, rec, failure.unwrap_or_default());
        }
        if was_running && status == WorkStatus::Completed {
            let stage = rec.journey.stage;
            self.history(change, rec, "work_completed", json!({"stage": stage}), None);
            change.push_outbox(self.event(rec, "work.completed", json!({"stage": stage})));
            if matches!(stage, Stage::Sandbox | Stage::Pilot) {
                // Exit-criteria gates come with the gates work; until then a completed unit
                // of work is the gate.
                if let Err(r) = self.transition(change, rec, &Event::Promote, now, "work.completed")
                {
                    warn!(client_id = %rec.journey.client_id, error = %r.message, "promotion failed");
                }
            }
        }
        Ok(())
    }

    fn work_failed(&mut self, change: &mut Change, rec: &mut JourneyRecord, failure: String) {
        Stats::inc(&self.stats.works_failed);
        Stats::inc(&self.stats.dead_letters);
        let stage = rec.journey.stage;
        warn!(client_id = %rec.journey.client_id, %stage, %failure, "unit of work failed");
        let task_id = rec
            .work
            .as_ref()
            .and_then(|w| {
                w.tasks
                    .iter()
                    .find(|t| t.status == crate::work::TaskStatus::Failed)
            })
            .map(|t| t.task_id.clone());
        let reason = if failure.contains("no_agent") {
            "no_agent"
        } else {
            "task_failed"
        };
        self.history(
            change,
            rec,
            "work_failed",
            json!({"stage": stage, "failure": failure}),
            None,
        );
        change.push_outbox(self.event(
            rec,
            "work.failed",
            json!({"stage": stage, "failure": failure, "task_id": task_id}),
        ));
        let body = serde_json::to_vec(&json!({
            "client_id": rec.journey.client_id,
            "stage": stage,
            "work": rec.work,
        }))
        .unwrap_or_default();
        let routing_key = format!("work.failed.{stage}");
        let dl = self.dead_letter(
            DeadLetter {
                reason,
                message: failure,
                exchange: "",
                routing_key: &routing_key,
                queue: "",
                client_id: Some(&rec.journey.client_id),
                task_id: task_id.as_deref(),
            },
            Uuid::new_v4().to_string(),
            None,
            body,
        );
        change.push_outbox(dl);
    }

    fn apply_reply(
        &mut self,
        env: &Envelope,
        outcome: TaskOutcome,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let mid = env.message_id.to_string();
        let mut change = Change::new();
        change.put_dedup(&mid, &Seen { at: now });
        let corr = env.correlation_id.clone().unwrap_or_default();
        let client = self.store.inflight(&corr)?;
        let rec: Option<JourneyRecord> = match &client {
            Some(c) => self.store.journey(c)?,
            None => None,
        };
        let Some(mut rec) = rec else {
            Stats::inc(&self.stats.stale_replies);
            warn!(correlation_id = %corr, "reply with an unknown correlation id; ignored");
            return Ok(self.store.commit(change)?);
        };
        let playbook = self.playbook(&rec.playbook)?;
        let stage_spec = rec
            .work
            .as_ref()
            .and_then(|w| playbook.stage(w.stage.as_str()))
            .cloned();
        let (Some(work), Some(spec)) = (rec.work.as_mut(), stage_spec) else {
            Stats::inc(&self.stats.stale_replies);
            return Ok(self.store.commit(change)?);
        };
        let result = match outcome {
            TaskOutcome::Completed(o) => Ok(Value::Object(o)),
            TaskOutcome::Failed(e) => Err(e),
        };
        let effect = if rec.journey.stage.is_terminal() {
            ReplyEffect::Stale {
                task_id: String::new(),
                why: "the journey has ended",
            }
        } else {
            work.on_reply(&spec, &corr, result, now, rand::random::<f64>())
        };
        self.record_effect(&mut change, &mut rec, &effect, Some(&mid), now)?;
        change.put_journey(&rec.journey.client_id.clone(), &rec);
        self.arm(&rec);
        Ok(self.store.commit(change)?)
    }

    fn record_effect(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        effect: &ReplyEffect,
        cause: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        match effect {
            ReplyEffect::Completed { task_id } => {
                Stats::inc(&self.stats.tasks_completed);
                debug!(client_id = %rec.journey.client_id, task_id, "task completed");
                self.history(
                    change,
                    rec,
                    "task_completed",
                    json!({"task_id": task_id}),
                    cause,
                );
                self.advance(change, rec, now)?;
            }
            ReplyEffect::RetryScheduled {
                task_id,
                attempt,
                retry_at,
                error,
            } => {
                info!(client_id = %rec.journey.client_id, task_id, attempt, %retry_at, error, "task attempt failed; retry scheduled");
                let detail = json!({"task_id": task_id, "attempt": attempt, "retry_at": retry_at, "error": error});
                self.history(change, rec, "task_retry", detail, cause);
            }
            ReplyEffect::TaskFailed { .. } => {
                let failure = rec
                    .work
                    .as_ref()
                    .and_then(|w| w.failure.clone())
                    .unwrap_or_default();
                self.work_failed(change, rec, failure);
            }
            ReplyEffect::Stale { task_id, why } => {
                Stats::inc(&self.stats.stale_replies);
                debug!(client_id = %rec.journey.client_id, task_id, why, "stale reply ignored");
                self.history(
                    change,
                    rec,
                    "reply_ignored",
                    json!({"task_id": task_id, "why": why}),
                    cause,
                );
            }
            ReplyEffect::Unknown => {
                Stats::inc(&self.stats.stale_replies);
                self.history(
                    change,
                    rec,
                    "reply_ignored",
                    json!({"why": "unknown correlation id"}),
                    cause,
                );
            }
        }
        Ok(())
    }

    fn handle_unroutable(
        &mut self,
        outbox_id: u64,
        client_id: &str,
        correlation_id: &str,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let mut change = Change::new();
        change.remove_outbox(outbox_id);
        if let Some(mut rec) = self.store.journey::<JourneyRecord>(client_id)? {
            let playbook = self.playbook(&rec.playbook)?;
            let effect = rec.work.as_mut().and_then(|w| {
                let spec = playbook.stage(w.stage.as_str())?;
                w.on_unroutable(spec, correlation_id, now, rand::random::<f64>())
            });
            if let Some(effect) = effect {
                self.record_effect(&mut change, &mut rec, &effect, None, now)?;
                change.put_journey(client_id, &rec);
                self.arm(&rec);
            }
        }
        Ok(self.store.commit(change)?)
    }

    /// Handles every journey with a due deadline or retry.
    fn fire_timers(&mut self, now: DateTime<Utc>) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let mut due = BTreeSet::new();
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            if let Some((_, c)) = self.timers.pop_first() {
                due.insert(c);
            }
        }
        let mut out = Vec::new();
        for client_id in due {
            let Some(mut rec) = self.store.journey::<JourneyRecord>(&client_id)? else {
                continue;
            };
            if rec.journey.stage.is_terminal() {
                continue;
            }
            let playbook = self.playbook(&rec.playbook)?;
            let mut change = Change::new();
            let mut effects = Vec::new();
            if let Some(w) = rec.work.as_mut()
                && let Some(spec) = playbook.stage(w.stage.as_str())
            {
                for (at, task_id, attempt) in w.timers() {
                    if at <= now
                        && let Some(e) =
                            w.on_timeout(spec, &task_id, attempt, now, rand::random::<f64>())
                    {
                        effects.push(e);
                    }
                }
            }
            for e in &effects {
                self.record_effect(&mut change, &mut rec, e, None, now)?;
            }
            // Retries that are due are dispatched here.
            self.advance(&mut change, &mut rec, now)?;
            if !change.empty {
                change.put_journey(&client_id, &rec);
                out.extend(self.store.commit(change)?);
            }
            self.arm(&rec);
        }
        Ok(out)
    }

    fn arm(&mut self, rec: &JourneyRecord) {
        if let Some(w) = &rec.work {
            for (at, _, _) in w.timers() {
                self.timers.insert((at, rec.journey.client_id.clone()));
            }
        }
    }
}

struct DeadLetter<'a> {
    reason: &'a str,
    message: String,
    exchange: &'a str,
    routing_key: &'a str,
    queue: &'a str,
    client_id: Option<&'a str>,
    task_id: Option<&'a str>,
}

/// Publishes outbox entries in order, pipelining confirms, and clears them once confirmed.
struct OutboxPump {
    tx: mpsc::UnboundedSender<Vec<OutboxEntry>>,
}

impl OutboxPump {
    fn start(publisher: Publisher, store: Store, core: mpsc::Sender<Input>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<OutboxEntry>>();
        let retry_tx = tx.clone();
        tokio::spawn(
            async move {
                let mut inflight = futures_util::stream::FuturesUnordered::new();
                let mut confirmed: Vec<u64> = Vec::new();
                loop {
                    tokio::select! {
                        batch = rx.recv() => {
                            let Some(batch) = batch else { break };
                            for e in batch {
                                let out = Outgoing {
                                    exchange: e.exchange.clone(),
                                    routing_key: e.routing_key.clone(),
                                    mandatory: e.mandatory,
                                    message_id: e.message_id.clone(),
                                    correlation_id: e.correlation_id.clone(),
                                    reply_to: e.reply_to.clone(),
                                    message_type: e.message_type.clone(),
                                    headers: e.headers.clone(),
                                    body: e.body.clone(),
                                };
                                match publisher.enqueue(out).await {
                                    Ok(rx) => inflight.push(async move { (e, rx.await) }),
                                    Err(err) => {
                                        let _ = core.send(Input::Failed(err)).await;
                                        return;
                                    }
                                }
                            }
                        }
                        Some((e, res)) = inflight.next(), if !inflight.is_empty() => {
                            match res {
                                Ok(Ok(Published::Confirmed)) => confirmed.push(e.id),
                                Ok(Ok(Published::Unroutable)) => match &e.purpose {
                                    Purpose::TaskRequest { client_id, correlation_id } => {
                                        warn!(intent = %e.routing_key, client_id, "task request unroutable: no agent serves this intent");
                                        let _ = core.send(Input::Unroutable {
                                            outbox_id: e.id,
                                            client_id: client_id.clone(),
                                            correlation_id: correlation_id.clone(),
                                        }).await;
                                    }
                                    _ => {
                                        warn!(exchange = %e.exchange, routing_key = %e.routing_key, "message unroutable; dropped");
                                        confirmed.push(e.id);
                                    }
                                },
                                Ok(Err(err @ (BrokerError::ConfirmTimeout { .. } | BrokerError::Nacked { .. }))) => {
                                    // Unknown outcome: keep it and publish again shortly.
                                    warn!(error = %err, "publish not confirmed; will retry");
                                    let retry = retry_tx.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(Duration::from_secs(1)).await;
                                        let _ = retry.send(vec![e]);
                                    });
                                }
                                Ok(Err(err)) => {
                                    let _ = core.send(Input::Failed(err)).await;
                                    return;
                                }
                                Err(_) => {
                                    let _ = core.send(Input::Failed(BrokerError::PublisherGone)).await;
                                    return;
                                }
                            }
                            if inflight.is_empty() || confirmed.len() >= 256 {
                                if let Err(err) = store.clear_outbox(&confirmed) {
                                    error!(error = %err, "cannot clear the outbox");
                                }
                                confirmed.clear();
                            }
                        }
                    }
                }
            }
            .instrument(info_span!("outbox")),
        );
        Self { tx }
    }

    fn send(&self, entries: Vec<OutboxEntry>) {
        if !entries.is_empty() {
            let _ = self.tx.send(entries);
        }
    }
}
