//! A small runtime for writing agents in Rust: implement [`Agent`], and the runtime
//! consumes each intent's queue with manual acks and a bounded prefetch, answers on
//! `reply_to` with publisher confirms, and acks the request only after the reply is
//! confirmed. Replicas of an agent compete for the same queues.
//!
//! It owns the broker side of an agent; what a task does is the implementor's business.

pub mod sim;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::broker::{self, BrokerError, Names, Outgoing, Publisher};
use crate::wire::auth::{self, Key, Keyring, Signer};
use crate::wire::headers;
use crate::wire::protocol::{AgentRef, Decoder, Envelope, ErrorPayload, MessageType, TaskResponse};

/// A task error, saying whether trying again may help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TaskError {
    pub code: String,
    pub message: String,
    /// The orchestrator retries retryable errors with backoff; others fail the task at once.
    pub retryable: bool,
}

impl TaskError {
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }
    pub fn fatal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

/// What an agent does with one task request.
pub trait Agent: Send + Sync + 'static {
    /// Handles the input of one task attempt. `request` is the whole envelope, for agents
    /// that want the correlation id (to be idempotent per attempt) or the source agent.
    fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> impl Future<Output = Result<Map<String, Value>, TaskError>> + Send;

    /// Fault injection for chaos runs: publish this reply twice (same message id), as a
    /// redelivering network would. Real agents keep the default.
    fn duplicate_reply(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub amqp_url: String,
    pub names: Names,
    pub agent_id: String,
    pub intents: Vec<String>,
    /// Requests in flight per intent; keep it modest where handlers can crash (a crash
    /// requeues the whole in-flight batch).
    pub prefetch: u16,
    pub max_message_bytes: usize,
    /// Verifies each task request's token: it must be the orchestrator's. `None` = not
    /// checked. Refused requests are dead-lettered (`unauthenticated`, `forbidden`).
    pub keyring: Option<Arc<Keyring>>,
    /// Signs replies with a token for `agent_id`; `None` = replies go unsigned.
    pub signing_key: Option<Key>,
    /// Bound on a graceful stop: cancel the consumers, finish and ack the requests in
    /// flight. Past it the connection closes and the broker requeues what is left.
    pub shutdown_timeout: Duration,
}

/// The default bound on a graceful stop, well inside Kubernetes' 30 s grace period.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Counts the consumer tasks and request handlers still running, so a shutdown can wait
/// until the last reply is confirmed and its request acked.
#[derive(Debug, Default)]
struct InFlight {
    /// Consumer tasks plus request handlers still running.
    n: AtomicUsize,
    /// Woken when `n` drops to zero.
    idle: tokio::sync::Notify,
}

/// Held by one consumer task or request handler for as long as it runs.
struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.n.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What the agent checks and signs, shared by every delivery's task.
#[derive(Clone)]
struct Auth {
    keyring: Option<Arc<Keyring>>,
    signer: Option<Signer>,
}

/// Counters for the demo and tests.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub handled: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Set once every intent's consumer is running (again, after a reconnect).
    ready: std::sync::atomic::AtomicBool,
    ready_changed: tokio::sync::Notify,
}

impl AgentStats {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_changed.notify_waiters();
    }

    /// Resolves once the agent consumes from every queue it serves.
    pub async fn wait_ready(&self) {
        loop {
            let changed = self.ready_changed.notified();
            if self.is_ready() {
                return;
            }
            changed.await;
        }
    }
}

/// Serves the configured intents until `shutdown` resolves, reconnecting with backoff.
/// On shutdown it stops consuming, lets the requests in flight finish (reply confirmed,
/// request acked) within `shutdown_timeout`, then closes its connections.
pub async fn run<A: Agent>(
    config: AgentConfig,
    agent: Arc<A>,
    stats: Arc<AgentStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    tokio::pin!(shutdown);
    let mut delays = broker::reconnect_delays();
    loop {
        let res = session(&config, agent.clone(), stats.clone(), &mut shutdown).await;
        stats.set_ready(false);
        match res {
            Ok(()) => {
                info!(
                    agent = %config.agent_id,
                    handled = stats.handled.load(Ordering::Relaxed),
                    failed = stats.failed.load(Ordering::Relaxed),
                    dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
                    "agent stopped"
                );
                return Ok(());
            }
            Err(e) => {
                if !e.is_retryable() {
                    return Err(e);
                }
                let wait = delays.next().unwrap_or(Duration::from_secs(10));
                warn!(agent = %config.agent_id, error = %e, retry_in = ?wait, "agent session ended; reconnecting");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// How long connecting, declaring and starting the consumers may take. A broker that is
/// still recovering its queues can leave a `basic.consume` unanswered; without a bound
/// the agent would wait forever, connected but consuming nothing.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// One broker session. `Ok` means it stopped because `shutdown` resolved.
async fn session<A: Agent>(
    config: &AgentConfig,
    agent: Arc<A>,
    stats: Arc<AgentStats>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), BrokerError> {
    let setup_timeout = |op: &str| BrokerError::Timeout {
        op: op.into(),
        timeout: SETUP_TIMEOUT,
    };
    let conn_name = format!("{}-consume", config.agent_id);
    let connect =
        tokio::time::timeout(SETUP_TIMEOUT, broker::connect(&config.amqp_url, &conn_name));
    let consume_conn = tokio::select! {
        _ = shutdown.as_mut() => return Ok(()),
        c = connect => c.map_err(|_| setup_timeout("connect"))??,
    };
    let (err_tx, err_rx) = mpsc::channel::<BrokerError>(16);
    let start = tokio::time::timeout(
        SETUP_TIMEOUT,
        start_consuming(config, agent, stats.clone(), &consume_conn, err_tx.clone()),
    );
    let started = tokio::select! {
        _ = shutdown.as_mut() => {
            let _ = consume_conn.close(200, "shutdown".into()).await;
            return Ok(());
        }
        s = start => s,
    };
    let res = match started {
        Err(_) => Err(setup_timeout("declare and consume")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(running)) => {
            info!(agent = %config.agent_id, intents = config.intents.len(), "agent consuming");
            stats.set_ready(true);
            tokio::select! {
                _ = shutdown.as_mut() => {
                    stats.set_ready(false);
                    running.stop(&config.agent_id, config.shutdown_timeout).await;
                    Ok(())
                }
                failure = wait_for_failure(err_rx) => failure,
            }
        }
    };
    drop(err_tx);
    // Whatever ended the session, its consumers must not outlive it: one cancelled
    // consumer would otherwise leave the others consuming on a connection nobody
    // watches, next to the new session's. The publishing connection closes by itself
    // once the requests in flight are answered. Bounded: a close that the broker never
    // answers must not keep a stopping agent alive.
    let close = consume_conn.close(200, "session ended".into());
    if tokio::time::timeout(Duration::from_secs(5), close)
        .await
        .is_err()
    {
        warn!(agent = %config.agent_id, "closing the consuming connection timed out");
    }
    res
}

async fn wait_for_failure(mut err_rx: mpsc::Receiver<BrokerError>) -> Result<(), BrokerError> {
    match err_rx.recv().await {
        Some(e) => Err(e),
        None => Err(BrokerError::PublisherGone),
    }
}

/// A session's consumers, what they have in flight, and the publishing connection.
struct Running {
    /// One channel per intent queue, each with one consumer tagged with the agent id.
    channels: Vec<lapin::Channel>,
    /// What a graceful stop waits for.
    inflight: Arc<InFlight>,
    /// Replies go out on it; closed only once the last handler has replied.
    publish_conn: lapin::Connection,
    publisher: Publisher,
    /// Tells the consumer tasks that the end of their stream is a shutdown, not the broker
    /// cancelling them.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Running {
    /// Cancels every consumer (the broker sends nothing more), waits until the consumer
    /// tasks have handed over their last delivery and every handler has replied and
    /// acked, within `timeout`; then closes the publishing connection. Unacked requests
    /// left at the deadline are requeued by the broker when the connections close.
    async fn stop(self, agent_id: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.stopping.store(true, Ordering::Release);
        info!(agent = %agent_id, in_flight = self.inflight.count(), timeout = ?timeout,
            "shutdown requested: cancelling consumers, finishing requests in flight");
        for ch in &self.channels {
            let cancel = ch.basic_cancel(agent_id.into(), Default::default());
            match tokio::time::timeout_at(deadline, cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cancelling a consumer failed"),
                Err(_) => warn!("cancelling a consumer timed out"),
            }
        }
        match tokio::time::timeout_at(deadline, self.inflight.wait_idle()).await {
            Ok(()) => info!(agent = %agent_id, "requests in flight finished"),
            Err(_) => warn!(agent = %agent_id, left = self.inflight.count(),
                "shutdown timeout: requests still in flight go back to the queue"),
        }
        // Channels first, then the connections: closing a connection under open channels
        // makes lapin log errors for a clean stop.
        for ch in &self.channels {
            let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "shutdown".into()))
                .await;
        }
        self.publisher.close().await;
        let close = self.publish_conn.close(200, "shutdown".into());
        if tokio::time::timeout(Duration::from_secs(5), close)
            .await
            .is_err()
        {
            warn!(agent = %agent_id, "closing the publishing connection timed out");
        }
    }
}

/// Declares the topology, starts the publisher and one consumer task per intent.
async fn start_consuming<A: Agent>(
    config: &AgentConfig,
    agent: Arc<A>,
    stats: Arc<AgentStats>,
    consume_conn: &lapin::Connection,
    err_tx: mpsc::Sender<BrokerError>,
) -> Result<Running, BrokerError> {
    let publish_conn =
        broker::connect(&config.amqp_url, &format!("{}-publish", config.agent_id)).await?;
    let ch = consume_conn
        .create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            op: "create channel".into(),
            source,
        })?;
    broker::declare_exchanges(&ch, &config.names).await?;
    let publisher = Publisher::start(&publish_conn).await?;
    let decoder = Decoder::new(config.max_message_bytes);
    let auth = Auth {
        keyring: config.keyring.clone(),
        signer: config
            .signing_key
            .clone()
            .map(|k| Signer::new(k, config.agent_id.clone()))
            .transpose()?,
    };
    let inflight = Arc::new(InFlight::default());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut channels = Vec::new();
    for intent in &config.intents {
        let q = config.names.intent_queue(intent);
        broker::declare_queue(&ch, &config.names, &q, Some(intent)).await?;
        let (chan, mut consumer) =
            broker::consume(consume_conn, &q, &config.agent_id, config.prefetch).await?;
        channels.push(chan.clone());
        let (agent, stats, publisher, decoder, err_tx, auth) = (
            agent.clone(),
            stats.clone(),
            publisher.clone(),
            decoder.clone(),
            err_tx.clone(),
            auth.clone(),
        );
        let names = config.names.clone();
        let agent_id = config.agent_id.clone();
        let (inflight, stopping) = (inflight.clone(), stopping.clone());
        let reader = inflight.enter();
        tokio::spawn(async move {
            let _reader = reader;
            let _chan = chan;
            while let Some(next) = consumer.next().await {
                let delivery = match next {
                    Ok(d) => d,
                    Err(source) => {
                        let _ = err_tx
                            .send(BrokerError::Amqp {
                                op: format!("consume {q}"),
                                source,
                            })
                            .await;
                        return;
                    }
                };
                // Each request is handled on its own task: the prefetch bounds how many.
                let (agent, stats, publisher, decoder, names, agent_id, q, auth) = (
                    agent.clone(),
                    stats.clone(),
                    publisher.clone(),
                    decoder.clone(),
                    names.clone(),
                    agent_id.clone(),
                    q.clone(),
                    auth.clone(),
                );
                let guard = inflight.enter();
                tokio::spawn(async move {
                    let _guard = guard;
                    handle_delivery(
                        &*agent, &stats, &publisher, &decoder, &auth, &names, &agent_id, &q,
                        delivery,
                    )
                    .await
                });
            }
            if !stopping.load(Ordering::Acquire) {
                let _ = err_tx.send(BrokerError::ConsumerCancelled(q)).await;
            }
        });
    }
    Ok(Running {
        channels,
        inflight,
        publish_conn,
        publisher,
        stopping,
    })
}

#[allow(clippy::too_many_arguments)]
async fn handle_delivery<A: Agent>(
    agent: &A,
    stats: &AgentStats,
    publisher: &Publisher,
    decoder: &Decoder,
    auth: &Auth,
    names: &Names,
    agent_id: &str,
    queue: &str,
    d: lapin::message::Delivery,
) {
    let request = match decoder.envelope(&d.data) {
        Ok(env) if env.message_type == MessageType::Request => env,
        Ok(env) => {
            let e = crate::wire::protocol::ProtocolError::UnexpectedMessageType(
                env.message_type.as_str().into(),
            );
            dead_letter(
                publisher,
                names,
                queue,
                &d,
                e.reason_code(),
                &e.to_string(),
                stats,
            )
            .await;
            return;
        }
        Err(e) => {
            dead_letter(
                publisher,
                names,
                queue,
                &d,
                e.reason_code(),
                &e.to_string(),
                stats,
            )
            .await;
            return;
        }
    };
    if let Some(keyring) = &auth.keyring
        && let Err(e) = auth::check_task_request(keyring, &request, Utc::now())
    {
        dead_letter(
            publisher,
            names,
            queue,
            &d,
            e.reason_code(),
            &e.to_string(),
            stats,
        )
        .await;
        return;
    }
    let trace = broker::header(&d.properties, crate::wire::trace::HEADER)
        .as_deref()
        .and_then(crate::wire::trace::TraceParent::parse);
    let span = info_span!("task", intent = %request.intent, message_id = %request.message_id,
        correlation_id = request.correlation_id.as_deref().unwrap_or(""),
        trace_id = trace.as_ref().map(|t| t.trace_id.as_str()).unwrap_or(""));
    if let Some(t) = &trace {
        crate::telemetry::set_remote_parent(&span, t);
    }
    async {
        let Some(reply_to) = d
            .properties
            .reply_to()
            .as_ref()
            .map(|s| s.as_str().to_string())
        else {
            dead_letter(
                publisher,
                names,
                queue,
                &d,
                "schema_invalid",
                "task request without reply_to",
                stats,
            )
            .await;
            return;
        };
        let input = match &request.payload {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        // A handler that panics must not leave its request unacked for the life of the
        // channel (a stuck prefetch slot, never redelivered): it goes back to the queue,
        // and the queue's delivery limit dead-letters a request that crashes every time.
        let handled = std::panic::AssertUnwindSafe(agent.handle(&request, input))
            .catch_unwind()
            .await;
        let Ok(handled) = handled else {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!("the handler panicked; requeueing the request (the delivery limit dead-letters it if it keeps crashing)");
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        };
        let (message_type, payload) = match handled {
            Ok(output) => {
                stats.handled.fetch_add(1, Ordering::Relaxed);
                (
                    MessageType::Response,
                    serde_json::to_value(TaskResponse::completed(output)).unwrap_or(Value::Null),
                )
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "task failed");
                (
                    MessageType::Error,
                    serde_json::to_value(ErrorPayload {
                        code: e.code,
                        message: e.message,
                        retryable: e.retryable,
                        details: None,
                    })
                    .unwrap_or(Value::Null),
                )
            }
        };
        let mut reply = Envelope::new(
            AgentRef::new(agent_id, "journeyman"),
            request.source_agent.clone(),
            message_type,
            request.intent.clone(),
            payload,
            Utc::now(),
        );
        reply.correlation_id = Some(request.reply_correlation());
        if let Some(signer) = &auth.signer {
            reply = signer.sign(reply, Utc::now());
        }
        let out = Outgoing {
            exchange: String::new(),
            routing_key: reply_to,
            mandatory: false,
            message_id: reply.message_id.to_string(),
            correlation_id: reply.correlation_id.clone(),
            reply_to: None,
            message_type: message_type.as_str().into(),
            // The reply continues the request's trace, from this task's span.
            headers: trace
                .as_ref()
                .map(|t| {
                    vec![(
                        crate::wire::trace::HEADER.to_string(),
                        crate::telemetry::reply_hop(t).header(),
                    )]
                })
                .unwrap_or_default(),
            body: reply.to_bytes(),
        };
        let twice = agent.duplicate_reply().then(|| out.clone());
        match publisher.publish(out).await {
            Ok(_) => {
                if let Some(copy) = twice {
                    let _ = publisher.publish(copy).await;
                }
                ack(&d).await
            }
            Err(e) => {
                warn!(error = %e, "reply not confirmed; requeueing the request");
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    .instrument(span)
    .await
}

async fn ack(d: &lapin::message::Delivery) {
    match d.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => warn!("ack not delivered (channel closed); the request will be redelivered"),
        Err(e) => warn!(error = %e, "ack failed; the request will be redelivered"),
    }
}

/// Publishes a refused request to the dead-letter exchange with its reason, then acks it.
async fn dead_letter(
    publisher: &Publisher,
    names: &Names,
    queue: &str,
    d: &lapin::message::Delivery,
    reason: &str,
    message: &str,
    stats: &AgentStats,
) {
    warn!(queue, reason, message, "refused request; dead-lettering it");
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = Outgoing {
        exchange: names.dlx(),
        routing_key: d.routing_key.to_string(),
        mandatory: false,
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| Uuid::new_v4().to_string()),
        correlation_id: d
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_string()),
        reply_to: None,
        message_type: "dead_letter".into(),
        headers: vec![
            (headers::REASON.to_string(), reason.into()),
            (headers::REASON_MESSAGE.to_string(), message.into()),
            (
                headers::ORIGINAL_EXCHANGE.to_string(),
                d.exchange.to_string(),
            ),
            (
                headers::ORIGINAL_ROUTING_KEY.to_string(),
                d.routing_key.to_string(),
            ),
            (headers::ORIGINAL_QUEUE.to_string(), queue.into()),
            (headers::FAILED_AT.to_string(), now.clone()),
            (headers::FIRST_FAILED_AT.to_string(), now),
            (headers::ATTEMPTS.to_string(), "1".into()),
        ],
        body: d.data.clone(),
    };
    match publisher.publish(out).await {
        Ok(_) => {
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            ack(d).await
        }
        Err(e) => warn!(error = %e, "dead-letter publish failed; leaving the request unacked"),
    }
}
