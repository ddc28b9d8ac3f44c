//! The RabbitMQ adapter: connections, the topology every worker declares, a publisher
//! with confirms, and consumers with bounded prefetch.
//!
//! It owns names (everything under one namespace), queue arguments, and turning lapin's
//! asynchronous failures into errors a caller can act on. It makes no decisions about
//! journeys and never touches the store.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub use crate::wire::names::{Names, QueueType};
pub use crate::wire::outgoing::Outgoing;

/// How many times the broker may redeliver a message before dead-lettering it: a
/// message that crashes its consumer every time ends in the dead-letter queue, not a loop.
pub const DELIVERY_LIMIT: i64 = 20;
/// A confirm that has not come after this long is an unknown outcome: the message is
/// kept and published again (consumers dedupe by message id).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}. Is the broker running and the URL right (--amqp-url / JOURNEYMAN_AMQP_URL)?"
    )]
    Connect { url: String, source: lapin::Error },
    #[error(
        "queue {queue} already exists with other arguments ({source}); delete it or use another namespace (--namespace)"
    )]
    QueueMismatch { queue: String, source: lapin::Error },
    #[error("broker operation '{op}' failed: {source}")]
    Amqp { op: String, source: lapin::Error },
    #[error("consumer on {0} was cancelled by the broker (queue deleted?)")]
    ConsumerCancelled(String),
    #[error("publish of {message_id} was refused by the broker (nack)")]
    Nacked { message_id: String },
    #[error("publish of {message_id} was not confirmed within {timeout:?}; outcome unknown")]
    ConfirmTimeout {
        message_id: String,
        timeout: Duration,
    },
    #[error("the publisher has stopped")]
    PublisherGone,
    #[error("broker operation '{op}' got no answer within {timeout:?}")]
    Timeout { op: String, timeout: Duration },
    #[error(
        "the broker has no x-consistent-hash exchange type, which routes journey commands to their partitions: enable it with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` (no restart needed; in Kubernetes add it to the RabbitmqCluster's additionalPlugins), or run a single orchestrator with --partitions 1"
    )]
    NoConsistentHash,
    #[error(
        "the namespace's journey routing ({exchange}) was declared otherwise: {source}. Its partition count is fixed when first declared: leave --partitions unset to use the recorded one, or use another namespace"
    )]
    PartitionsMismatch {
        exchange: String,
        source: lapin::Error,
    },
    /// A worker given a key that cannot sign (a public key): a configuration mistake,
    /// found before the first publish rather than at the receiver.
    #[error("the signing key cannot sign: {0}")]
    SigningKey(#[from] crate::wire::auth::KeyError),
}

impl BrokerError {
    /// Whether reconnecting and trying again may succeed. Argument mismatches and bad
    /// URLs need a person.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            BrokerError::QueueMismatch { .. }
                | BrokerError::SigningKey(_)
                | BrokerError::NoConsistentHash
                | BrokerError::PartitionsMismatch { .. }
        )
    }
}

/// A failed queue declare: a 406 (PRECONDITION_FAILED) means the queue exists with other
/// arguments, which needs a person; anything else (a lost connection, a queue locked by
/// another connection's exclusive use) may pass and is retried.
fn declare_failed(queue: &str) -> impl FnOnce(lapin::Error) -> BrokerError {
    let queue = queue.to_string();
    move |source| match source.kind() {
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406 => {
            BrokerError::QueueMismatch { queue, source }
        }
        _ => BrokerError::Amqp {
            op: format!("declare queue {queue}"),
            source,
        },
    }
}

fn amqp(op: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let op = op.into();
    move |source| BrokerError::Amqp { op, source }
}
/// The waits between reconnect attempts of a worker (orchestrator or agent): from 200 ms,
/// doubling to 10 s, jittered so replicas do not reconnect in step, for ever.
pub fn reconnect_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Connects with heartbeats on (lapin's default of 60 s applies) and a name that shows up
/// in the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(url, props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: redact(url),
            source,
        })
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The arguments of a work queue. Classic queues get the dead-letter exchange and the
/// overflow behaviour; `x-dead-letter-strategy` and `x-delivery-limit` are quorum-only.
fn queue_args(names: &Names) -> FieldTable {
    let mut t = BTreeMap::new();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(names.queue_type.as_str())),
    );
    t.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(names.dlx())),
    );
    t.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    if names.queue_type == QueueType::Quorum {
        t.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        t.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
    }
    FieldTable::from(t)
}

/// Declares the exchanges and the dead-letter queue. Idempotent.
pub async fn declare_exchanges(ch: &Channel, names: &Names) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for ex in [names.intents(), names.events(), names.dlx()] {
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("declare exchange {ex}")))?;
    }
    let mut args = BTreeMap::new();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(names.queue_type.as_str())),
    );
    let dl = names.dead_letter();
    ch.queue_declare(
        dl.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::from(args),
    )
    .await
    .map_err(declare_failed(&dl))?;
    ch.queue_bind(
        dl.as_str().into(),
        names.dlx().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp(format!("bind {dl}")))?;
    Ok(())
}

/// Declares a durable work queue (quorum unless the names say otherwise) with the
/// dead-letter settings, bound to the
/// intents exchange by `binding` when given. A 406 (other arguments) is a clear error.
pub async fn declare_queue(
    ch: &Channel,
    names: &Names,
    queue: &str,
    binding: Option<&str>,
) -> Result<(), BrokerError> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        queue_args(names),
    )
    .await
    .map_err(declare_failed(queue))?;
    if let Some(key) = binding {
        ch.queue_bind(
            queue.into(),
            names.intents().as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("bind {queue}")))?;
    }
    Ok(())
}

/// The exchange type that routes by a hash of the client id header.
pub const CONSISTENT_HASH: &str = "x-consistent-hash";
/// Records the partition count on the routing exchanges: a replica declaring another count
/// gets a 406 instead of silently re-dealing clients to partitions.
const PARTITIONS_ARG: &str = "x-journeyman-partitions";

/// Declares the partitioned routing of journey commands, idempotently: `journey.start`
/// goes from the intents exchange to `<ns>.journeys.start`, every other journey intent to
/// `<ns>.journeys`; each hashes the `x-journeyman-client-id` header onto its partitions'
/// queues (one partition: a fanout, which needs no plugin). Every partition has a start, a
/// commands and a replies queue, with single active consumer so two processes never apply
/// one partition at once.
///
/// The consistent-hash exchange deals hashes to bindings in the order they were made, so
/// every replica binds all partitions in ascending order, and both exchanges deal alike:
/// a client's start and its other commands land in the same partition.
pub async fn declare_partitions(
    ch: &Channel,
    names: &Names,
    partitions: u16,
) -> Result<(), BrokerError> {
    use crate::wire::names::PartitionQueue;
    let mut args = BTreeMap::new();
    args.insert(
        ShortString::from(PARTITIONS_ARG),
        AMQPValue::LongString(LongString::from(partitions.to_string())),
    );
    let kind = if partitions > 1 {
        args.insert(
            ShortString::from("hash-header"),
            AMQPValue::LongString(LongString::from(crate::wire::headers::CLIENT_ID)),
        );
        ExchangeKind::Custom(CONSISTENT_HASH.into())
    } else {
        ExchangeKind::Fanout
    };
    let args = FieldTable::from(args);
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let starts = names.journey_starts();
    let commands = names.journey_commands();
    for ex in [&starts, &commands] {
        ch.exchange_declare(ex.as_str().into(), kind.clone(), durable, args.clone())
            .await
            .map_err(|source| match source.kind() {
                lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406 => {
                    BrokerError::PartitionsMismatch {
                        exchange: ex.clone(),
                        source,
                    }
                }
                lapin::ErrorKind::ProtocolError(e) if e.get_id() == 503 => {
                    BrokerError::NoConsistentHash
                }
                _ => BrokerError::Amqp {
                    op: format!("declare exchange {ex}"),
                    source,
                },
            })?;
    }
    let mut qargs = queue_args(names);
    qargs.insert(
        ShortString::from("x-single-active-consumer"),
        AMQPValue::Boolean(true),
    );
    for p in 0..partitions {
        for kind in PartitionQueue::ALL {
            let q = names.partition_queue(p, kind);
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                qargs.clone(),
            )
            .await
            .map_err(declare_failed(&q))?;
            let exchange = match kind {
                PartitionQueue::Start => &starts,
                PartitionQueue::Commands => &commands,
                PartitionQueue::Replies => continue,
            };
            // The weight of a consistent-hash binding is its routing key.
            ch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("bind {q}")))?;
        }
    }
    let intents = names.intents();
    for intent in crate::wire::protocol::JOURNEY_INTENTS {
        let to = if intent == "journey.start" {
            &starts
        } else {
            &commands
        };
        ch.exchange_bind(
            to.as_str().into(),
            intents.as_str().into(),
            (*intent).into(),
            lapin::options::ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("bind {to} to {intents}")))?;
    }
    Ok(())
}

/// Retires the per-intent journey command queues of before partitions
/// (`<ns>.intent.journey.*`): unbound, so commands stop being copied there; deleted when
/// empty. Returns those still holding commands, with their counts, for the caller to
/// drain. Declared (idempotently, with their old arguments) rather than probed, so an
/// absent one costs no channel error.
pub async fn retire_legacy_journey_queues(
    ch: &Channel,
    names: &Names,
) -> Result<Vec<(String, u32)>, BrokerError> {
    let mut left = Vec::new();
    for intent in crate::wire::protocol::JOURNEY_INTENTS {
        let q = names.intent_queue(intent);
        let declare = || {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_args(names),
            )
        };
        declare().await.map_err(declare_failed(&q))?;
        ch.queue_unbind(
            q.as_str().into(),
            names.intents().as_str().into(),
            (*intent).into(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("unbind {q}")))?;
        // Counted once unbound, when nothing more can arrive (quorum queues refuse
        // delete-if-empty).
        let count = declare().await.map_err(declare_failed(&q))?.message_count();
        if count == 0 {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp(format!("delete {q}")))?;
        } else {
            left.push((q, count));
        }
    }
    Ok(left)
}

/// The partition count a namespace's topology records, if it has been declared: found by
/// probing which partition queues exist (they are declared 0..P, so a doubling search and
/// a bisection take a dozen passive declares). Each probe has a channel of its own, as a
/// 404 closes it.
pub async fn recorded_partitions(
    conn: &Connection,
    names: &Names,
) -> Result<Option<u16>, BrokerError> {
    use crate::wire::names::PartitionQueue;
    let exists = |p: u16| {
        let q = names.partition_queue(p, PartitionQueue::Commands);
        async move { queue_exists(conn, &q).await }
    };
    if !exists(0).await? {
        return Ok(None);
    }
    // exists(lo) and !exists(hi)
    let (mut lo, mut hi) = (0u16, 1u16);
    while hi <= crate::domain::partition::MAX_PARTITIONS && exists(hi).await? {
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid).await? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo + 1))
}

/// Whether the broker has the consistent-hash exchange type: tried on a connection of its
/// own, because an unknown exchange type is a connection error (503) that would take the
/// caller's connection down.
pub async fn has_consistent_hash(url: &str) -> Result<bool, BrokerError> {
    let conn = connect(url, "journeyman-probe").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    let name = format!("journeyman.probe.{}", uuid::Uuid::new_v4().simple());
    let r = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let ok = r.is_ok();
    if ok {
        let _ = ch
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "probed".into()).await;
    Ok(ok)
}

/// Declares the whole topology: exchanges, a queue per task intent, and the journey
/// commands' partitions (journey intents among `intents` are routed there, not queued by
/// intent). Returns the queues it declared.
pub async fn declare_topology(
    ch: &Channel,
    names: &Names,
    intents: impl IntoIterator<Item = String>,
    partitions: u16,
) -> Result<Vec<String>, BrokerError> {
    use crate::wire::names::PartitionQueue;
    declare_exchanges(ch, names).await?;
    declare_partitions(ch, names, partitions).await?;
    let mut queues = vec![names.dead_letter()];
    for intent in intents {
        if crate::wire::protocol::JOURNEY_INTENTS.contains(&intent.as_str()) {
            continue;
        }
        let q = names.intent_queue(&intent);
        declare_queue(ch, names, &q, Some(&intent)).await?;
        queues.push(q);
    }
    for p in 0..partitions {
        for kind in PartitionQueue::ALL {
            queues.push(names.partition_queue(p, kind));
        }
    }
    Ok(queues)
}

/// The namespace's partition count: as configured, else as its topology records, else
/// (a new namespace) the default, or one when the broker cannot hash and one replica
/// is all there is to be.
pub async fn resolve_partitions(
    conn: &Connection,
    url: &str,
    names: &Names,
    configured: Option<u16>,
    replicas: u16,
) -> Result<u16, BrokerError> {
    if let Some(p) = configured {
        return Ok(p);
    }
    if let Some(p) = recorded_partitions(conn, names).await? {
        return Ok(p);
    }
    if has_consistent_hash(url).await? {
        Ok(crate::domain::partition::DEFAULT_PARTITIONS)
    } else if replicas > 1 {
        // One partition would leave all but one replica idle: say what is missing.
        Err(BrokerError::NoConsistentHash)
    } else {
        tracing::warn!(
            "the broker has no consistent-hash exchange (rabbitmq_consistent_hash_exchange): declaring one partition, so this namespace runs one orchestrator replica"
        );
        Ok(1)
    }
}

/// Deletes queues and exchanges of a namespace (tests, demo clean-up). Missing ones are
/// fine.
pub async fn delete_namespace(conn: &Connection, names: &Names, queues: &[String]) {
    let mut queues = queues.to_vec();
    if let Ok(Some(partitions)) = recorded_partitions(conn, names).await {
        for p in 0..partitions {
            for kind in crate::wire::names::PartitionQueue::ALL {
                queues.push(names.partition_queue(p, kind));
            }
        }
    }
    for q in &queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for ex in [
        names.journey_starts(),
        names.journey_commands(),
        names.intents(),
        names.events(),
        names.dlx(),
    ] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(ex.as_str().into(), Default::default())
                .await;
        }
    }
}

/// Follows every journey event on a private queue (exclusive, gone with the connection),
/// without acks: for watchers like the demo and tests, which must not hold up anyone.
pub async fn watch_events(
    conn: &Connection,
    names: &Names,
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    watch_events_on(conn, names, &["#"]).await
}

/// [`watch_events`] for some events only (routing keys are event names, e.g.
/// `work.completed`; topic wildcards work), so a watcher of many journeys is not sent
/// what it ignores.
pub async fn watch_events_on(
    conn: &Connection,
    names: &Names,
    events: &[&str],
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp("declare the event watch queue"))?;
    for key in events {
        ch.queue_bind(
            q.name().clone(),
            names.events().as_str().into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("bind the event watch queue"))?;
    }
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "watch".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp("watch events"))?;
    Ok((ch, consumer))
}

/// Opens a consumer with manual acks on its own channel with a bounded prefetch.
/// Returns the channel too: acks must go on the channel the delivery came on.
pub async fn consume(
    conn: &Connection,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("basic.qos"))?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("consume {queue}")))?;
    Ok((ch, consumer))
}

impl Properties for Outgoing {
    fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default()
            .with_content_type(ShortString::from(crate::wire::protocol::CONTENT_TYPE))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(self.message_id.as_str()))
            .with_type(ShortString::from(self.message_type.as_str()));
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(ShortString::from(c.as_str()));
        }
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(ShortString::from(r.as_str()));
        }
        if !self.headers.is_empty() {
            let mut t = BTreeMap::new();
            for (k, v) in &self.headers {
                t.insert(
                    ShortString::from(k.as_str()),
                    AMQPValue::LongString(LongString::from(v.as_str())),
                );
            }
            p = p.with_headers(FieldTable::from(t));
        }
        p
    }
}

/// lapin's properties of a message, from the wire's description of it.
trait Properties {
    fn properties(&self) -> BasicProperties;
}

/// What the broker said about one publish.
#[derive(Debug)]
pub enum Published {
    /// Routed and confirmed.
    Confirmed,
    /// Confirmed but returned: no queue is bound for the routing key.
    Unroutable,
}

type Reply = oneshot::Sender<Result<Published, BrokerError>>;

/// A handle to a publishing task that owns one confirm channel.
///
/// Why a task: several tasks publishing on one confirm channel can receive each other's
/// confirmations (lapin 4, observed here). One task publishes in order and pipelines the
/// confirms, so throughput does not pay one round trip per message.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<(Arc<Outgoing>, Reply)>,
    /// The publishing task's channel, so a graceful stop can close it before its
    /// connection (closing a connection under an open channel makes lapin log an error).
    ch: Channel,
}

impl Publisher {
    /// Starts the publishing task on a fresh channel of `conn`. It ends when every handle
    /// is dropped or the channel fails; pending requests then resolve with an error.
    pub async fn start(conn: &Connection) -> Result<Self, BrokerError> {
        let ch = conn
            .create_channel()
            .await
            .map_err(amqp("create channel"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(publish_loop(ch.clone(), rx));
        Ok(Self { tx, ch })
    }

    /// Closes the channel, once nothing more is to be published: for a graceful stop,
    /// before the connection is closed.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.ch.close(200, "shutdown".into()),
        )
        .await;
    }

    /// Publishes and waits for the confirm.
    pub async fn publish(&self, msg: impl Into<Arc<Outgoing>>) -> Result<Published, BrokerError> {
        self.enqueue(msg)
            .await?
            .await
            .map_err(|_| BrokerError::PublisherGone)?
    }

    /// Queues a publish and returns a receiver for its outcome, so callers can pipeline.
    pub async fn enqueue(
        &self,
        msg: impl Into<Arc<Outgoing>>,
    ) -> Result<oneshot::Receiver<Result<Published, BrokerError>>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((msg.into(), tx))
            .await
            .map_err(|_| BrokerError::PublisherGone)?;
        Ok(rx)
    }
}

async fn publish_loop(ch: Channel, mut rx: mpsc::Receiver<(Arc<Outgoing>, Reply)>) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some((msg, reply)) = next else { break };
                let props = msg.properties();
                let opts = BasicPublishOptions { mandatory: msg.mandatory, ..Default::default() };
                let res = ch
                    .basic_publish(
                        msg.exchange.as_str().into(),
                        msg.routing_key.as_str().into(),
                        opts,
                        &msg.body,
                        props,
                    )
                    .await;
                match res {
                    Ok(confirm) => {
                        let id = msg.message_id.clone();
                        pending.push(async move {
                            let outcome = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                                Err(_) => Err(BrokerError::ConfirmTimeout { message_id: id, timeout: CONFIRM_TIMEOUT }),
                                Ok(Err(source)) => Err(BrokerError::Amqp { op: "publisher confirm".into(), source }),
                                Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(Published::Confirmed),
                                Ok(Ok(Confirmation::Ack(Some(_)))) => Ok(Published::Unroutable),
                                Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Nacked { message_id: id }),
                            };
                            let _ = reply.send(outcome);
                        });
                    }
                    Err(source) => {
                        let _ = reply.send(Err(BrokerError::Amqp { op: "basic.publish".into(), source }));
                    }
                }
            }
            Some(()) = pending.next(), if !pending.is_empty() => {}
        }
    }
    while pending.next().await.is_some() {}
}

/// Reads a string header (our reason and origin headers are long strings).
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Message count of a queue without consuming (passive declare).
/// A queue's message count by a passive declare, on a channel of its own (a 404 closes
/// the channel it happens on).
async fn passive_count(conn: &Connection, queue: &str) -> Result<u32, lapin::Error> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = ch.close(200, "done".into()).await;
    Ok(q.message_count())
}

/// Whether a queue exists.
pub async fn queue_exists(conn: &Connection, queue: &str) -> Result<bool, BrokerError> {
    match passive_count(conn, queue).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(pe) if pe.get_id() == 404 => Ok(false),
            _ => Err(BrokerError::Amqp {
                op: format!("inspect {queue}"),
                source: e,
            }),
        },
    }
}

pub async fn queue_len(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    passive_count(conn, queue)
        .await
        .map_err(amqp(format!("inspect {queue}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }

    #[test]
    fn classic_queues_get_the_dead_letter_exchange_but_no_quorum_only_arguments() {
        assert_eq!("classic".parse(), Ok(QueueType::Classic));
        assert_eq!("quorum".parse(), Ok(QueueType::Quorum));
        assert!(
            "stream"
                .parse::<QueueType>()
                .unwrap_err()
                .contains("quorum or classic")
        );
        let keys = |qt| {
            let args = queue_args(&Names::new("t").with_queue_type(qt));
            let inner = args.inner();
            let kind = match inner.get("x-queue-type") {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("{other:?}"),
            };
            (
                kind,
                inner
                    .keys()
                    .map(|k| k.as_str().to_string())
                    .collect::<Vec<_>>(),
            )
        };
        let (kind, quorum) = keys(QueueType::Quorum);
        assert_eq!(kind, "quorum");
        assert!(quorum.contains(&"x-delivery-limit".to_string()));
        assert!(quorum.contains(&"x-dead-letter-strategy".to_string()));
        let (kind, classic) = keys(QueueType::Classic);
        assert_eq!(kind, "classic");
        assert!(classic.contains(&"x-dead-letter-exchange".to_string()));
        assert!(!classic.contains(&"x-delivery-limit".to_string()));
        assert!(!classic.contains(&"x-dead-letter-strategy".to_string()));
        assert_eq!(Names::new("t").queue_type, QueueType::Quorum);
    }

    #[test]
    fn names_share_the_namespace() {
        let n = Names::new("t1");
        assert_eq!(n.intent_queue("journey.start"), "t1.intent.journey.start");
        assert_eq!(n.replies("0"), "t1.orchestrator.0.replies");
        assert_eq!(n.dead_letter(), "t1.dead-letter");
    }
}
