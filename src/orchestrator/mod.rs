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

mod admission;
mod engine;
pub mod failpoint;
pub mod routing;
pub mod stats;
pub mod webhook;

pub use stats::Stats;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The clock the orchestrator decides by, to the millisecond: every timestamp it stores
/// or sends (envelopes, events, history, dead-letter headers) then has at most three
/// fractional digits, as the protocol documents (and as Python before 3.11 parses).
///
/// Not forced to be strictly increasing: bumping ties by a millisecond would run ahead of
/// the wall clock at more than 1,000 steps a second and shorten every task timeout. A
/// report that reaches a stage within the millisecond it was entered (never in practice:
/// the entry is flushed and announced first) counts for the stage before.
pub fn now() -> chrono::DateTime<Utc> {
    use chrono::DurationRound;
    let t = Utc::now();
    t.duration_trunc(chrono::TimeDelta::milliseconds(1))
        .unwrap_or(t)
}

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;
use tracing::{Instrument, error, info, info_span, warn};

use crate::broker::{self, BrokerError, Names, Published, Publisher};
use crate::domain::playbook::Playbook;
use crate::store::{OutboxEntry, Purpose, Store, StoreError};
use crate::wire::headers;
use crate::wire::protocol::Decoder;

/// How often old dedup marks and expired snapshots are pruned.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(3600);
/// Default number of journeys with work running at once.
pub const DEFAULT_MAX_ACTIVE_JOURNEYS: usize = 2000;
/// Default pause between two rounds of status cards.
pub const CARD_INTERVAL: Duration = Duration::from_millis(250);
/// Status cards built per round at most; the rest wait for the next round.
const CARD_ROUND: usize = 2048;

/// How many inputs share one flush: bigger groups amortise the fsync further, at the cost
/// of holding acks a little longer.
const MAX_GROUP: usize = 512;

/// How long a graceful shutdown may take by default: well inside Kubernetes' default
/// 30 s grace period, so the pod is never SIGKILLed mid-flush.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// The consumer tag of every orchestrator consumer (one per channel), so a shutdown can
/// cancel them.
const CONSUMER_TAG: &str = "journeyman-orchestrator";

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the default playbook's stored version {0} is missing from the store")]
    MissingPlaybook(String),
    #[error(transparent)]
    Replica(crate::domain::partition::ReplicaError),
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
    /// This replica's index and the fleet's size: it consumes the partitions it owns.
    pub replica: crate::domain::partition::Replica,
    /// Partitions of the namespace. `None`: the ones its topology records, or for a new
    /// namespace the default (one when the broker has no consistent-hash exchange).
    pub partitions: Option<u16>,
    pub playbook: Playbook,
    pub prefetch: u16,
    pub max_message_bytes: usize,
    pub policy: Policy,
    /// Where status cards are posted, if anywhere.
    pub webhook: Option<crate::orchestrator::webhook::WebhookConfig>,
    /// Inputs handled per store flush (group commit); 1 means one fsync per message.
    pub max_group: usize,
    /// Verifies every command and reply, and signs what the orchestrator sends. `None`
    /// accepts unsigned messages (the CLI requires --insecure-no-auth for that).
    pub auth: Option<(crate::wire::auth::Guard, crate::wire::auth::Signer)>,
    /// How often expired records are pruned.
    pub housekeeping_every: Duration,
    /// sled's page cache.
    pub store_cache_bytes: u64,
    /// Pause between rounds of status cards: a journey publishes at most one card per
    /// round, however many times it changed.
    pub card_interval: Duration,
    /// Journeys with work running at once; further `journey.start` commands wait in
    /// their queue (0: no limit). See `admission`.
    pub max_active_journeys: usize,
    /// Bound on a graceful shutdown (stop consuming, finish what was delivered, drain the
    /// confirms, flush). Past it the connections close and the broker requeues whatever
    /// is still unacked: nothing is lost, some of it is redelivered.
    pub shutdown_timeout: Duration,
}

impl Config {
    pub fn new(amqp_url: &str, namespace: &str, data_dir: PathBuf) -> Self {
        Self {
            amqp_url: amqp_url.to_string(),
            names: Names::new(namespace),
            data_dir,
            orchestrator_id: "0".into(),
            replica: crate::domain::partition::Replica::default(),
            partitions: None,
            playbook: Playbook::default_playbook(),
            prefetch: 256,
            max_message_bytes: crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
            policy: Policy::default(),
            webhook: None,
            max_group: MAX_GROUP,
            auth: None,
            housekeeping_every: HOUSEKEEPING_EVERY,
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            card_interval: CARD_INTERVAL,
            max_active_journeys: DEFAULT_MAX_ACTIVE_JOURNEYS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

pub use crate::domain::record::{
    HistoryEntry, JourneyRecord, RollbackInfo, Snapshot, event_payload, state_view,
};
pub use engine::{Core, Inbound, Policy, Pruned, Source};

enum Input {
    Delivery {
        source: Source,
        queue: Arc<str>,
        delivery: Box<lapin::message::Delivery>,
        /// A `journey.start` let through by admission: settled once handled.
        admitted: bool,
    },
    Unroutable {
        outbox_id: u64,
        client_id: String,
        correlation_id: String,
    },
    Failed(BrokerError),
}

/// How a broker session ended without an error.
enum Ended {
    /// Shutdown requested: the session stopped consuming and drained.
    Shutdown,
}

/// An orchestrator whose store is open and whose state is loaded, not yet connected: the
/// surface that starts it can serve the store (HTTP) before [`Orchestrator::run`].
pub struct Orchestrator {
    core: Core,
    config: Config,
    stats: Arc<Stats>,
    _webhook: AbortOnDrop,
}

impl Orchestrator {
    /// Opens the data directory and loads the timers and admission state from it.
    pub async fn open(config: Config, stats: Arc<Stats>) -> Result<Self, OrchestratorError> {
        let store = Store::open_with_cache(&config.data_dir, config.store_cache_bytes)?;
        let mut policy = config.policy.clone();
        policy.webhook = config.webhook.is_some();
        let wake = Arc::new(tokio::sync::Notify::new());
        let webhook_task = config.webhook.clone().map(|w| {
            tokio::spawn(webhook::deliver(
                store.clone(),
                w,
                wake.clone(),
                stats.webhook.clone(),
            ))
        });
        let mut core = Core::new(
            store,
            config.names.clone(),
            routing::Routing::new(
                &config.names,
                config.partitions.unwrap_or(1),
                config.replica,
            ),
            Decoder::new(config.max_message_bytes),
            &config.playbook,
            stats.clone(),
            policy,
        )?;
        core.set_wake(wake);
        core.set_auth(config.auth.clone());
        core.limit_admission(config.max_active_journeys);
        core.store.flush().await?;
        Ok(Self {
            core,
            config,
            stats,
            _webhook: AbortOnDrop(webhook_task),
        })
    }

    /// The open store, for surfaces that read it while the orchestrator runs.
    pub fn store(&self) -> &Store {
        &self.core.store
    }

    /// Runs until `shutdown` resolves. Reconnects with backoff on broker failures; store
    /// failures are fatal.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), OrchestratorError> {
        let Self {
            mut core,
            config,
            stats,
            _webhook,
        } = self;
        run_loop(&mut core, &config, &stats, shutdown).await
    }
}

/// Opens the store and runs the orchestrator until `shutdown` resolves.
pub async fn run(
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OrchestratorError> {
    Orchestrator::open(config, stats).await?.run(shutdown).await
}

async fn run_loop(
    core: &mut Core,
    config: &Config,
    stats: &Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OrchestratorError> {
    match core.housekeeping(Utc::now()) {
        Ok(p) => info!(
            dedup_marks = p.dedup_marks,
            snapshots = p.snapshots,
            correlations = p.correlations,
            compacted = p.compacted,
            "pruned expired records"
        ),
        Err(e) => warn!(error = %e, "pruning failed"),
    }
    info!(
        data_dir = %config.data_dir.display(),
        namespace = %config.names.namespace,
        playbook = %core.playbook_hash(),
        timers = core.timer_count(),
        "orchestrator starting"
    );
    tokio::pin!(shutdown);
    let mut delays = broker::reconnect_delays();
    loop {
        let result = session(core, config, &mut shutdown).await;
        stats.ready.store(false, Ordering::Relaxed);
        match result {
            Ok(Ended::Shutdown) => {
                // The drain flushed already; this covers the outbox entries cleared since.
                core.store.flush().await?;
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

/// One broker session: connect, declare, consume, and handle inputs until an error or
/// shutdown.
async fn session(
    core: &mut Core,
    config: &Config,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Ended, OrchestratorError> {
    // Separate connections: a memory alarm blocks publishers, and consumers must keep
    // acking meanwhile.
    let consume_conn = setup(
        "connect",
        broker::connect(&config.amqp_url, "journeyman-orchestrator-consume"),
    )
    .await?;
    let publish_conn = match setup(
        "connect",
        broker::connect(&config.amqp_url, "journeyman-orchestrator-publish"),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            close(&consume_conn).await;
            return Err(e);
        }
    };
    let result = session_on(core, config, shutdown, &consume_conn, &publish_conn).await;
    // A consumer waiting for a place gives up its delivery (requeued with the channel).
    core.admission().close();
    // Close this session's connections, so none of its consumers lingers beside the next
    // session's (their unacked deliveries go back to the queue).
    close(&consume_conn).await;
    close(&publish_conn).await;
    result
}

/// Setup steps must finish in time: a broker that accepted the connection but never
/// answers a declare or consume would otherwise leave a worker connected and idle.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

async fn setup<T>(
    op: &str,
    f: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, OrchestratorError> {
    match tokio::time::timeout(SETUP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BrokerError::Timeout {
            op: op.to_string(),
            timeout: SETUP_TIMEOUT,
        }
        .into()),
    }
}

async fn close(conn: &lapin::Connection) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, "session ended".into()),
    )
    .await;
}

async fn session_on(
    core: &mut Core,
    config: &Config,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    consume_conn: &lapin::Connection,
    publish_conn: &lapin::Connection,
) -> Result<Ended, OrchestratorError> {
    let ch = consume_conn
        .create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            op: "create channel".into(),
            source,
        })?;
    setup("declare", broker::declare_exchanges(&ch, &config.names)).await?;
    let partitions = setup(
        "declare",
        broker::resolve_partitions(
            consume_conn,
            &config.amqp_url,
            &config.names,
            config.partitions,
            config.replica.count,
        ),
    )
    .await?;
    config
        .replica
        .check(partitions)
        .map_err(OrchestratorError::Replica)?;
    setup(
        "declare",
        broker::declare_partitions(&ch, &config.names, partitions),
    )
    .await?;
    core.store.claim_layout(
        &config.data_dir,
        crate::store::Layout {
            partitions,
            index: config.replica.index,
            replicas: config.replica.count,
        },
    )?;
    let routing = routing::Routing::new(&config.names, partitions, config.replica);
    info!(
        replica = %config.replica,
        partitions,
        owned = %crate::domain::partition::list(&routing.owned),
        "owning partitions"
    );
    core.stats.set_partitions(routing.owned.clone());
    core.set_routing(routing.clone());

    let (tx, mut rx) = mpsc::channel::<Input>(4096);
    let publisher = setup("confirm.select", Publisher::start(publish_conn)).await?;
    let pump = OutboxPump::start(publisher, core.store.clone(), tx.clone());
    // Whatever a previous session or process left unpublished goes first.
    pump.send(core.outbox()?);

    use crate::wire::names::PartitionQueue;
    let mut queues: Vec<(String, Source)> = Vec::new();
    let mut start_queues = std::collections::HashSet::new();
    for &p in &routing.owned {
        let start = config.names.partition_queue(p, PartitionQueue::Start);
        start_queues.insert(start.clone());
        queues.push((start, Source::Command));
        queues.push((
            config.names.partition_queue(p, PartitionQueue::Commands),
            Source::Command,
        ));
        queues.push((
            config.names.partition_queue(p, PartitionQueue::Replies),
            Source::Reply,
        ));
    }
    // Before partitions, replies came to one queue per orchestrator: tasks dispatched by
    // an older version still answer there.
    // The journey command queues of before partitions: replica 0 of a store that may
    // have known them unbinds them, deletes the empty ones, and (alone in its fleet)
    // drains the rest; once none is left the store remembers, so later sessions skip it.
    if config.replica.index == 0 && !core.store.legacy_queues_retired()? {
        let left = setup(
            "declare",
            broker::retire_legacy_journey_queues(&ch, &config.names),
        )
        .await?;
        if left.is_empty() {
            core.store.mark_legacy_queues_retired()?;
        }
        for (q, n) in left {
            if config.replica.count == 1 {
                info!(queue = %q, commands = n, "draining a journey queue of before partitions");
                queues.push((q, Source::Command));
            } else {
                warn!(
                    queue = %q,
                    commands = n,
                    "a journey queue of before partitions still holds commands: run one replica (--replica 0/1) until it is drained, then scale out"
                );
            }
        }
    }
    if core.has_legacy_work() {
        let legacy = config.names.replies(&config.orchestrator_id);
        setup(
            "declare",
            broker::declare_queue(&ch, &config.names, &legacy, None),
        )
        .await?;
        queues.push((legacy, Source::Reply));
    }
    let mut channels = Vec::new();
    let admission = core.admission();
    admission.reopen();
    for (q, source) in queues {
        let (chan, consumer) = setup(
            "consume",
            broker::consume(consume_conn, &q, CONSUMER_TAG, config.prefetch),
        )
        .await?;
        channels.push(chan);
        let tx = tx.clone();
        let queue: Arc<str> = Arc::from(q.as_str());
        // New journeys wait for a place; everything else flows.
        let gate = start_queues.contains(&q).then(|| admission.clone());
        tokio::spawn(async move {
            let mut consumer = consumer;
            while let Some(next) = consumer.next().await {
                match next {
                    Ok(delivery) => {
                        if let Some(gate) = &gate
                            && !gate.reserve().await
                        {
                            // Stopping: left unacked, requeued when the channel closes.
                            continue;
                        }
                        let input = Input::Delivery {
                            source,
                            queue: queue.clone(),
                            delivery: Box::new(delivery),
                            admitted: gate.is_some(),
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
            // The stream ended without an error: the broker cancelled the consumer.
            let _ = tx
                .send(Input::Failed(BrokerError::ConsumerCancelled(
                    queue.to_string(),
                )))
                .await;
        });
    }
    drop(tx);
    core.stats.ready.store(true, Ordering::Relaxed);
    info!(queues = channels.len(), "consuming");

    let mut last_housekeeping = Instant::now();
    let mut last_cards = Instant::now();
    // Group commit, pipelined: while one flush is in flight the next groups are applied
    // (committed, not acked); they are acked and published after a flush that started
    // after their commit.
    let mut flushing: Option<Flushing> = None;
    let mut waiting = Settle::default();
    loop {
        let next_timer = core.next_timer();
        let mut sleep = match next_timer {
            Some(at) => (at - Utc::now()).to_std().unwrap_or(Duration::ZERO),
            None => Duration::from_secs(3600),
        };
        if core.cards_due() {
            sleep = sleep.min(config.card_interval.saturating_sub(last_cards.elapsed()));
        }
        let first = tokio::select! {
            _ = shutdown.as_mut() => {
                core.stats.ready.store(false, Ordering::Relaxed);
                if let Some(f) = flushing.take() {
                    finish_flush(core, f, &pump).await?;
                }
                if !waiting.is_empty() {
                    core.store.flush().await?;
                    flushed(core, std::mem::take(&mut waiting), &pump).await;
                }
                drain(core, &channels, &mut rx, &pump, config.shutdown_timeout).await?;
                let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "shutdown".into())).await;
                return Ok(Ended::Shutdown);
            }
            done = async { (&mut flushing.as_mut().expect("guarded").0).await }, if flushing.is_some() => {
                let (_, settle) = flushing.take().expect("guarded");
                after_flush(core, done, settle, &pump).await?;
                if !waiting.is_empty() {
                    flushing = Some(start_flush(core, std::mem::take(&mut waiting)));
                }
                continue;
            }
            input = rx.recv() => match input {
                Some(i) => Some(i),
                None => return Err(BrokerError::PublisherGone.into()),
            },
            _ = tokio::time::sleep(sleep) => None,
        };
        let mut group: Vec<Input> = first.into_iter().collect();
        while group.len() < config.max_group.max(1) {
            match rx.try_recv() {
                Ok(i) => group.push(i),
                Err(_) => break,
            }
        }
        let cards = core.cards_due() && last_cards.elapsed() >= config.card_interval;
        if cards {
            last_cards = Instant::now();
        }
        let (settle, failure) = apply_group(core, group, true, cards)?;
        waiting.merge(settle);
        if flushing.is_none() && !waiting.is_empty() {
            flushing = Some(start_flush(core, std::mem::take(&mut waiting)));
        }
        if last_housekeeping.elapsed() >= config.housekeeping_every {
            last_housekeeping = Instant::now();
            if let Err(e) = core.housekeeping(Utc::now()) {
                warn!(error = %e, "pruning failed");
            }
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
}

/// What a group of inputs leaves to do once its changes are durable: the highest
/// delivery per queue (one multiple-ack per channel) and the messages to publish.
#[derive(Default)]
struct Settle {
    acks: BTreeMap<Arc<str>, Box<lapin::message::Delivery>>,
    published: Vec<OutboxEntry>,
}

impl Settle {
    fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.published.is_empty()
    }

    /// Adds a later group: its deliveries come later on each channel, so they replace.
    fn merge(&mut self, later: Settle) {
        self.acks.extend(later.acks);
        self.published.extend(later.published);
    }

    /// Acks, then hands the messages to the pump. Only for changes already flushed.
    async fn run(self, pump: &OutboxPump) {
        for (queue, d) in self.acks {
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
        if !self.published.is_empty() {
            crate::orchestrator::failpoint::hit("after_ack_before_publish");
        }
        pump.send(self.published);
    }
}

/// One group of inputs applied to the store (committed, not yet flushed). Returns what
/// to do once durable, and a broker failure reported among the inputs.
fn apply_group(
    core: &mut Core,
    group: Vec<Input>,
    fire_timers: bool,
    cards: bool,
) -> Result<(Settle, Option<BrokerError>), OrchestratorError> {
    let mut settle = Settle::default();
    let mut failure = None;
    for input in group {
        match input {
            Input::Delivery {
                source,
                queue,
                delivery,
                admitted,
            } => {
                let inbound = Inbound {
                    source,
                    data: &delivery.data,
                    exchange: delivery.exchange.as_str(),
                    routing_key: delivery.routing_key.as_str(),
                    queue: &queue,
                    message_id: prop(delivery.properties.message_id()),
                    correlation_id: prop(delivery.properties.correlation_id()),
                    reply_to: prop(delivery.properties.reply_to()),
                    traceparent: broker::header(&delivery.properties, crate::wire::trace::HEADER),
                    replay: replay_of(&delivery.properties),
                    client_header: broker::header(&delivery.properties, headers::CLIENT_ID),
                };
                settle.published.extend(core.handle(&inbound)?);
                if admitted {
                    core.admission().settle();
                }
                settle.acks.insert(queue, delivery);
            }
            Input::Unroutable {
                outbox_id,
                client_id,
                correlation_id,
            } => {
                settle.published.extend(core.handle_unroutable(
                    outbox_id,
                    &client_id,
                    &correlation_id,
                )?);
            }
            Input::Failed(e) => failure = Some(e),
        }
    }
    if fire_timers {
        settle.published.extend(core.fire_timers(now())?);
    }
    if cards {
        settle.published.extend(core.publish_cards(CARD_ROUND)?);
    }
    Ok((settle, failure))
}

/// After a flush: count it, wake the webhook, then ack and publish.
async fn flushed(core: &Core, settle: Settle, pump: &OutboxPump) {
    Stats::inc(&core.stats.flushes);
    crate::orchestrator::failpoint::hit("after_flush_before_ack");
    core.wake_webhook();
    settle.run(pump).await;
}

/// One group of inputs, start to end: apply each, flush once, ack, publish.
async fn handle_group(
    core: &mut Core,
    group: Vec<Input>,
    pump: &OutboxPump,
    fire_timers: bool,
    cards: bool,
) -> Result<Option<BrokerError>, OrchestratorError> {
    let (settle, failure) = apply_group(core, group, fire_timers, cards)?;
    if !settle.is_empty() {
        core.store.flush().await?;
        flushed(core, settle, pump).await;
    }
    Ok(failure)
}

/// The one flush in flight (sled must not have several), with what waits for it.
type Flushing = (tokio::task::JoinHandle<Result<(), StoreError>>, Settle);

/// Starts a flush for everything committed so far.
fn start_flush(core: &Core, settle: Settle) -> Flushing {
    let store = core.store.clone();
    (tokio::spawn(async move { store.flush().await }), settle)
}

async fn finish_flush(
    core: &Core,
    flushing: Flushing,
    pump: &OutboxPump,
) -> Result<(), OrchestratorError> {
    let (handle, settle) = flushing;
    after_flush(core, handle.await, settle, pump).await
}

/// A flush ended: if it succeeded, ack and publish what waited for it.
async fn after_flush(
    core: &Core,
    result: Result<Result<(), StoreError>, tokio::task::JoinError>,
    settle: Settle,
    pump: &OutboxPump,
) -> Result<(), OrchestratorError> {
    result.map_err(|e| {
        StoreError::Io(sled::Error::ReportableBug(format!(
            "the flush task failed: {e}"
        )))
    })??;
    flushed(core, settle, pump).await;
    Ok(())
}

/// A graceful stop, bounded by `timeout`: cancel every consumer so the broker sends
/// nothing more, handle (store, flush, ack) what it had already delivered until every
/// consumer has ended, wait for the publisher's confirms, and flush. What does not fit in
/// the bound stays safe: unacked deliveries are requeued when the connection closes, and
/// unconfirmed messages stay in the outbox and go out again at the next start.
async fn drain(
    core: &mut Core,
    channels: &[lapin::Channel],
    rx: &mut mpsc::Receiver<Input>,
    pump: &OutboxPump,
    timeout: Duration,
) -> Result<(), OrchestratorError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    info!(timeout = ?timeout, "shutdown requested: cancelling consumers, finishing in-flight work");
    core.admission().close();
    let mut consuming: usize = 0;
    for ch in channels {
        let cancel = ch.basic_cancel(CONSUMER_TAG.into(), Default::default());
        match tokio::time::timeout_at(deadline, cancel).await {
            Ok(Ok(())) => consuming += 1,
            Ok(Err(e)) => {
                warn!(error = %e, "cancelling a consumer failed; its deliveries will be requeued")
            }
            Err(_) => warn!("cancelling a consumer timed out"),
        }
    }
    // A cancelled consumer's stream ends after the deliveries sent before the cancel-ok:
    // its reader then reports `ConsumerCancelled`, which here means "done".
    let mut handled = 0usize;
    while consuming > 0 {
        let first = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(i)) => i,
            Ok(None) => break,
            Err(_) => {
                warn!(
                    consumers = consuming,
                    "shutdown timeout while finishing deliveries; the rest is requeued"
                );
                break;
            }
        };
        let mut group = vec![first];
        while let Ok(i) = rx.try_recv() {
            group.push(i);
        }
        let mut inputs = Vec::with_capacity(group.len());
        let mut broken = false;
        for i in group {
            match i {
                Input::Failed(BrokerError::ConsumerCancelled(_)) => {
                    consuming = consuming.saturating_sub(1)
                }
                Input::Failed(e) => {
                    warn!(error = %e, "broker failure while draining; unacked deliveries are requeued");
                    broken = true;
                }
                other => {
                    handled += matches!(other, Input::Delivery { .. }) as usize;
                    inputs.push(other);
                }
            }
        }
        handle_group(core, inputs, pump, false, false).await?;
        if broken {
            break;
        }
    }
    // Channels before the connection: closing a connection under open channels makes
    // lapin log errors for a clean stop. Unacked deliveries (past the bound) are requeued.
    for ch in channels {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), ch.close(200, "shutdown".into())).await;
    }
    let confirmed = tokio::time::timeout_at(deadline, pump.drain())
        .await
        .is_ok();
    if !confirmed {
        warn!(
            "shutdown timeout while waiting for publisher confirms; the outbox keeps the rest for the next start"
        );
    }
    core.store.flush().await?;
    info!(
        handled,
        confirmed,
        elapsed = ?started.elapsed(),
        "drained: consumers cancelled, in-flight work stored and acked, store flushed"
    );
    Ok(())
}

/// Stops a background task when the orchestrator stops.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// The failure history `journeyman dlq replay` attaches to a republished dead letter.
fn replay_of(p: &lapin::BasicProperties) -> Option<engine::Replay> {
    broker::header(p, headers::REPLAYED_AT)?;
    Some(engine::Replay {
        replay_of: broker::header(p, headers::REPLAY_OF),
        attempts: broker::header(p, headers::ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1),
        first_failed_at: broker::header(p, headers::FIRST_FAILED_AT),
        edited_at: broker::header(p, headers::EDITED_AT),
    })
}

fn prop(v: &Option<lapin::types::ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_string())
}

/// Publishes outbox entries in order, pipelining confirms, and clears them once confirmed.
struct OutboxPump {
    tx: mpsc::UnboundedSender<PumpMsg>,
}

enum PumpMsg {
    Publish(Vec<OutboxEntry>),
    /// Answered once everything handed over before it is confirmed (or found unroutable).
    Drain(tokio::sync::oneshot::Sender<()>),
}

impl OutboxPump {
    fn start(publisher: Publisher, store: Store, core: mpsc::Sender<Input>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<PumpMsg>();
        // Weak: the pump ends when the session drops its handle (`rx` yields `None`);
        // a strong sender of its own would keep it, its publisher and the store open
        // forever, one more with every broker session.
        let retry_tx = tx.downgrade();
        tokio::spawn(
            async move {
                let mut inflight = futures_util::stream::FuturesUnordered::new();
                let mut confirmed: Vec<u64> = Vec::new();
                let mut drained: Option<tokio::sync::oneshot::Sender<()>> = None;
                loop {
                    tokio::select! {
                        msg = rx.recv() => {
                            let batch = match msg {
                                None => break,
                                Some(PumpMsg::Publish(batch)) => batch,
                                Some(PumpMsg::Drain(done)) => {
                                    if inflight.is_empty() {
                                        let _ = done.send(());
                                    } else {
                                        drained = Some(done);
                                    }
                                    continue;
                                }
                            };
                            for e in batch {
                                match publisher.enqueue(e.message.clone()).await {
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
                                Ok(Ok(Published::Confirmed)) => {
                                    crate::orchestrator::failpoint::hit("after_confirm_before_clear");
                                    confirmed.push(e.id)
                                }
                                Ok(Ok(Published::Unroutable)) => match &e.purpose {
                                    Purpose::TaskRequest { client_id, correlation_id } => {
                                        warn!(intent = %e.message.routing_key, client_id, "task request unroutable: no agent serves this intent");
                                        let _ = core.send(Input::Unroutable {
                                            outbox_id: e.id,
                                            client_id: client_id.clone(),
                                            correlation_id: correlation_id.clone(),
                                        }).await;
                                    }
                                    _ => {
                                        warn!(exchange = %e.message.exchange, routing_key = %e.message.routing_key, "message unroutable; dropped");
                                        confirmed.push(e.id);
                                    }
                                },
                                Ok(Err(err @ (BrokerError::ConfirmTimeout { .. } | BrokerError::Nacked { .. }))) => {
                                    // Unknown outcome: keep it and publish again shortly.
                                    warn!(error = %err, "publish not confirmed; will retry");
                                    let retry = retry_tx.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(Duration::from_secs(1)).await;
                                        // The session is over: the entry stays in the
                                        // outbox for the next one.
                                        if let Some(retry) = retry.upgrade() {
                                            let _ = retry.send(PumpMsg::Publish(vec![e]));
                                        }
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
                            if inflight.is_empty()
                                && let Some(done) = drained.take()
                            {
                                let _ = done.send(());
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
            let _ = self.tx.send(PumpMsg::Publish(entries));
        }
    }

    /// Resolves once everything sent before is confirmed, or at once if the pump is gone.
    async fn drain(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(PumpMsg::Drain(done)).is_ok() {
            let _ = wait.await;
        }
    }
}
