//! Broker faults (issue 5): the broker restarted or killed mid-run, every connection closed
//! while agents hold unacked deliveries, a consumer cancelled because its queue was deleted,
//! the memory alarm blocking publishers, a poison message, and a 406 at start-up.
//!
//! Tests that stop, kill or throttle the broker run on a node of their own
//! ([`BrokerNode::shared`], one node for these tests, which take turns); the others use the
//! machine's broker. Every test works in a namespace of its own. Each checks that nothing is lost (every journey reaches production), that nothing
//! is applied twice (one attempt per task, one completion event per stage), and the
//! readiness flags.

use journeyman::wire::names::PartitionQueue;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use journeyman::agent::sim::SimAgent;
use journeyman::agent::{self, Agent, AgentConfig, AgentStats, TaskError};
use journeyman::broker::{self, BrokerError, Names};
use journeyman::domain::playbook::Playbook;
use journeyman::orchestrator::{self, OrchestratorError, Stats};
use journeyman::wire::protocol::{AgentRef, Decoder, Envelope, JOURNEY_INTENTS, MessageType};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::Recorder;
use crate::broker_node::BrokerNode;
use crate::helpers::*;

/// The default playbook with long task deadlines: an outage of a few seconds must not
/// time tasks out (a timeout retries under a fresh correlation id, which would blur the
/// "one attempt per task" check).
fn patient_playbook() -> Playbook {
    let mut pb = Playbook::default_playbook();
    for stage in pb.stages.values_mut() {
        for t in stage
            .tasks
            .iter_mut()
            .chain(stage.rollback.tasks.iter_mut())
        {
            t.timeout = Duration::from_secs(300);
        }
    }
    pb
}

/// Tasks slow enough that journeys are mid-run when the fault hits.
fn slow_sim() -> SimAgent {
    SimAgent {
        min_latency: Duration::from_millis(80),
        max_latency: Duration::from_millis(200),
        failure_rate: 0.0,
        duplicate_rate: 0.0,
    }
}

/// Polls `f` until it holds, or panics after `timeout`.
async fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records every change of a flag, sampled every 2 ms from before a fault is injected,
/// so a short false → true blip is not missed while rabbitmqctl runs.
struct Transitions {
    seen: Arc<Mutex<Vec<bool>>>,
    stop: Arc<AtomicBool>,
}

impl Transitions {
    fn watch(f: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(vec![f()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                let v = f();
                {
                    let mut s = s.lock().unwrap();
                    if s.last() != Some(&v) {
                        s.push(v);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Self { seen, stop }
    }

    fn history(&self) -> Vec<bool> {
        self.seen.lock().unwrap().clone()
    }

    /// Was ready, went not ready, is ready again.
    async fn wait_down_then_up(&self, what: &str, timeout: Duration, node: &BrokerNode) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = {
                let h = self.seen.lock().unwrap();
                h.len() >= 3 && h[0] && h.contains(&false) && *h.last().unwrap()
            };
            if done {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}: ready → not ready → ready (seen {:?}); broker:\n{}",
                    self.history(),
                    node.diagnostics().await
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Transitions {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Journey events kept in a durable quorum queue of the test's, so events published
/// while the test's own connection is down (broker restart) are not lost to the test.
struct EventLog {
    url: String,
    queue: String,
    ids: HashSet<String>,
    events: Vec<Value>,
}

impl EventLog {
    async fn declare(app: &mut TestApp) -> Self {
        let queue = format!("{}.test-events", app.names.namespace);
        let ch = app.conn.create_channel().await.unwrap();
        let mut args = BTreeMap::new();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::from(args),
        )
        .await
        .unwrap();
        ch.queue_bind(
            queue.as_str().into(),
            app.names.events().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = ch.close(200, "done".into()).await;
        app.track_queue(queue.clone());
        Self {
            url: app.url.clone(),
            queue,
            ids: HashSet::new(),
            events: Vec::new(),
        }
    }

    /// Reads events (deduplicated by message id: a republished event is the same event)
    /// until `done` holds; reconnects if the broker goes away meanwhile.
    async fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        let decoder = Decoder::default();
        while !done(&self.events) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; events so far: {:#?}",
                self.summary()
            );
            let Ok(conn) = broker::connect(&self.url, "journeyman-test-events").await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let ch = conn.create_channel().await.unwrap();
            let mut consumer = ch
                .basic_consume(
                    self.queue.as_str().into(),
                    "test-events".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            while !done(&self.events) {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, consumer.next()).await {
                    Ok(Some(Ok(d))) => {
                        if let Ok(env) = decoder.envelope(&d.data)
                            && self.ids.insert(env.message_id.to_string())
                        {
                            self.events.push(env.payload);
                        }
                        let _ = d.acker.ack(BasicAckOptions::default()).await;
                    }
                    Ok(_) => break,
                    Err(_) => panic!(
                        "timed out waiting for {what}; events so far: {:#?}",
                        self.summary()
                    ),
                }
            }
            let _ = conn.close(200, "done".into()).await;
        }
    }

    fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| format!("{} {} {}", e["client_id"], e["event"], e["stage"]))
            .collect()
    }

    /// How many distinct events match.
    fn count(&self, client: &str, event: &str, stage: Option<&str>) -> usize {
        self.events
            .iter()
            .filter(|e| {
                e["client_id"] == client
                    && e["event"] == event
                    && stage.is_none_or(|s| e["stage"] == s)
            })
            .count()
    }

    async fn wait_all_in_production(&mut self, clients: &[String], timeout: Duration) {
        let clients = clients.to_vec();
        self.wait_for("every journey through production", timeout, |evs| {
            clients.iter().all(|c| {
                evs.iter().any(|e| {
                    e["client_id"] == c.as_str()
                        && e["event"] == "work.completed"
                        && e["stage"] == "production"
                })
            })
        })
        .await;
    }
}

fn clients(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Nothing lost, nothing twice: every journey completed each stage once, and each task of
/// each journey ran under exactly one correlation id (redeliveries of the same attempt
/// share it; a lost request or reply would have forced a retry under a new one).
fn assert_exactly_once<A>(pb: &Playbook, rec: &Recorder<A>, log: &EventLog, clients: &[String]) {
    assert_exactly_once_but(pb, rec, log, clients, None)
}

/// The same, not counting the requests with correlation id `except` (injected ones).
fn assert_exactly_once_but<A>(
    pb: &Playbook,
    rec: &Recorder<A>,
    log: &EventLog,
    clients: &[String],
    except: Option<&str>,
) {
    for c in clients {
        assert_eq!(log.count(c, "journey.started", None), 1, "{c} started once");
        for stage in ["sandbox", "pilot", "production"] {
            assert_eq!(
                log.count(c, "work.completed", Some(stage)),
                1,
                "{c}: {stage} work completed exactly once; events {:#?}",
                log.summary()
            );
        }
    }
    let mut expected: BTreeMap<&str, usize> = BTreeMap::new();
    for stage in pb.stages.values() {
        for t in &stage.tasks {
            *expected.entry(t.intent.as_str()).or_default() += clients.len();
        }
    }
    for (intent, n) in expected {
        let mut attempts = rec.attempts(intent);
        if let Some(x) = except {
            attempts.remove(x);
        }
        assert_eq!(
            attempts.len(),
            n,
            "distinct attempts (correlation ids) of {intent}"
        );
    }
}

fn deliveries<A>(rec: &Recorder<A>) -> usize {
    rec.seen.lock().unwrap().len()
}

/// How often each correlation id was handed to the agent.
fn handed<A>(rec: &Recorder<A>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, c, _) in rec.seen.lock().unwrap().iter() {
        *m.entry(c.clone()).or_default() += 1;
    }
    m
}

fn orchestrator_ready(stats: &Arc<Stats>) -> impl Fn() -> bool + Send + Sync + 'static {
    let s = stats.clone();
    move || s.ready.load(Ordering::Relaxed)
}

fn agent_ready(stats: &Arc<AgentStats>) -> impl Fn() -> bool + Send + Sync + 'static {
    let s = stats.clone();
    move || s.is_ready()
}

/// After a reconnect every consumer has its prefetch again, and there is one consumer
/// per queue (no consumer left over from an earlier session). The test's own event
/// subscriber (no-ack, no prefetch) is not counted.
async fn assert_consumers_restored(node: &BrokerNode, pb: &Playbook) {
    let chans = node.consumer_prefetches().await;
    let orch = chans.iter().filter(|(_, p)| *p == 256).count();
    let agent = chans.iter().filter(|(_, p)| *p == 16).count();
    assert_eq!(
        orch,
        PartitionQueue::ALL.len(),
        "orchestrator consumers (start, commands and replies of its one partition) with prefetch 256: {chans:?}"
    );
    assert_eq!(
        agent,
        pb.intents().len(),
        "agent consumers with prefetch 16: {chans:?}"
    );
}

enum Outage {
    /// `rabbitmqctl stop_app`, a pause, `start_app`.
    StopApp,
    /// SIGKILL of the broker's VM, then a start on the same data directory.
    Kill,
}

async fn broker_outage_mid_run(outage: Outage) {
    let mut node = BrokerNode::shared().await;
    let pb = patient_playbook();
    let mut app = TestApp::spawn_on(&node.url(), pb.clone(), Mode::InProcess).await;
    let mut log = EventLog::declare(&mut app).await;
    let rec = Recorder::new(slow_sim());
    let agent = app.start_agent_for_all(rec.clone()).await;
    wait_until("orchestrator ready", WAIT, orchestrator_ready(&app.stats)).await;
    // RabbitMQ 3.10 (single node): a quorum queue declared just before a SIGKILL of the
    // broker can come back unusable (every basic.consume on it times out inside the
    // broker). Give the broker a moment to persist the queues just declared.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let clients = clients("outage", 6);
    for c in &clients {
        app.start_journey(c).await;
    }
    // Mid-run: some tasks done, none of the journeys finished.
    let r = rec.clone();
    wait_until("a few tasks handled", WAIT, move || deliveries(&r) >= 8).await;

    let orch_t = Transitions::watch(orchestrator_ready(&app.stats));
    let agent_t = Transitions::watch(agent_ready(&agent));
    match outage {
        Outage::StopApp => node.stop_app().await,
        Outage::Kill => node.kill().await,
    }
    let (s, a) = (app.stats.clone(), agent.clone());
    wait_until("readiness false during the outage", WAIT, move || {
        !s.ready.load(Ordering::Relaxed) && !a.is_ready()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!app.stats.ready.load(Ordering::Relaxed) && !agent.is_ready());
    match outage {
        Outage::StopApp => node.start_app().await,
        Outage::Kill => node.restart().await,
    }
    // Reconnect backoff is capped at 10 s.
    orch_t
        .wait_down_then_up("orchestrator", Duration::from_secs(60), &node)
        .await;
    agent_t
        .wait_down_then_up("agent", Duration::from_secs(60), &node)
        .await;

    log.wait_all_in_production(&clients, Duration::from_secs(90))
        .await;
    assert_exactly_once(&pb, &rec, &log, &clients);
    assert_consumers_restored(&node, &pb).await;
    assert_eq!(
        node.queue_counts(&app.names.dead_letter()).await,
        Some((0, 0)),
        "nothing dead-lettered"
    );
    app.stop_orchestrator().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stop_app_start_app_mid_run_loses_nothing() {
    broker_outage_mid_run(Outage::StopApp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_run_loses_nothing() {
    broker_outage_mid_run(Outage::Kill).await;
}

/// Holds every request until the gate opens: deliveries stay unacked meanwhile.
struct Gated {
    inner: SimAgent,
    open: watch::Receiver<bool>,
}

impl Agent for Gated {
    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.handle(request, input).await
    }
}

/// `rabbitmqctl close_all_connections` while the agent holds unacked requests: they come
/// back (to the reconnected agent), and the work is applied once. Then the subtler case:
/// only the agent's consuming connection is closed, so the replies go out but the acks
/// fail (`Ok(false)`): the requests are redelivered, answered again, and the second reply
/// is recognised as stale, not applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_with_unacked_deliveries_redeliver_without_double_effect() {
    let node = BrokerNode::shared().await;
    let pb = patient_playbook();

    for only_agent_consumer in [false, true] {
        let mut app = TestApp::spawn_on(&node.url(), pb.clone(), Mode::InProcess).await;
        let mut log = EventLog::declare(&mut app).await;
        let (open_tx, open) = watch::channel(false);
        let rec = Recorder::new(Gated {
            inner: SimAgent::default(),
            open,
        });
        let agent = app.start_agent_for_all(rec.clone()).await;
        let clients = clients(
            if only_agent_consumer {
                "ackfail"
            } else {
                "closeall"
            },
            3,
        );
        for c in &clients {
            app.start_journey(c).await;
        }
        // The first task of each journey is held, unacked.
        let (r, n) = (rec.clone(), clients.len());
        wait_until("requests held by the agent", WAIT, move || {
            deliveries(&r) >= n
        })
        .await;
        let held: Vec<String> = handed(&rec).into_keys().collect();
        let prefix = format!("{}.intent.", app.names.namespace);
        // The broker's counters lag a little (quorum queue metrics).
        let deadline = Instant::now() + WAIT;
        while node.unacked_total(&prefix).await < held.len() as u64 {
            assert!(Instant::now() < deadline, "held requests are unacked");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let agent_t = Transitions::watch(agent_ready(&agent));
        let orch_t = Transitions::watch(orchestrator_ready(&app.stats));
        if only_agent_consumer {
            let n = node.close_connections_named("test-agent-consume").await;
            assert_eq!(n, 1, "one agent consuming connection");
        } else {
            node.close_all_connections().await;
            orch_t
                .wait_down_then_up("orchestrator", Duration::from_secs(60), &node)
                .await;
        }
        agent_t
            .wait_down_then_up("agent", Duration::from_secs(60), &node)
            .await;
        // The held requests come back to the reconnected agent (redelivered).
        let r = rec.clone();
        let h = held.clone();
        wait_until("held requests redelivered", WAIT, move || {
            let m = handed(&r);
            h.iter().all(|c| m.get(c).copied().unwrap_or(0) >= 2)
        })
        .await;
        open_tx.send(true).unwrap();

        log.wait_all_in_production(&clients, Duration::from_secs(60))
            .await;
        assert_exactly_once(&pb, &rec, &log, &clients);
        if only_agent_consumer {
            // Each held request was answered twice (its ack failed the first time); the
            // orchestrator applied one answer and ignored the other.
            assert!(
                Stats::get(&app.stats.stale_replies) >= held.len() as u64,
                "stale replies: {}",
                Stats::get(&app.stats.stale_replies)
            );
        }
        assert_eq!(
            node.queue_counts(&app.names.dead_letter()).await,
            Some((0, 0)),
            "nothing dead-lettered"
        );
        assert_eq!(node.connections_named("test-agent-consume").await, 1);
        assert_eq!(node.connections_named("test-agent-publish").await, 1);
        app.stop_orchestrator().await.unwrap();
    }
}

/// Which worker's queue the test deletes.
#[derive(PartialEq)]
enum Cancelled {
    Agent,
    Orchestrator,
}

/// A consumer cancelled by the broker (its queue deleted) is not a silent idle worker: the
/// worker notices, goes not-ready, redeclares the queue, consumes again, and leaves no
/// session behind (one connection of each kind, one consumer per queue, each with its
/// prefetch). Journeys then run as usual.
async fn consumer_cancelled(which: Cancelled) {
    let node = BrokerNode::shared().await;
    let pb = patient_playbook();
    let mut app = TestApp::spawn_on(&node.url(), pb.clone(), Mode::InProcess).await;
    let mut log = EventLog::declare(&mut app).await;
    let rec = Recorder::new(SimAgent::default());
    let agent = app.start_agent_for_all(rec.clone()).await;
    wait_until("orchestrator ready", WAIT, orchestrator_ready(&app.stats)).await;

    let (t, q, what) = match which {
        // The agent's queue of the first task.
        Cancelled::Agent => (
            Transitions::watch(agent_ready(&agent)),
            app.names.intent_queue("provision_sandbox_environment"),
            "agent",
        ),
        Cancelled::Orchestrator => (
            Transitions::watch(orchestrator_ready(&app.stats)),
            app.names.partition_queue(0, PartitionQueue::Replies),
            "orchestrator",
        ),
    };
    let ch = app.conn.create_channel().await.unwrap();
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    t.wait_down_then_up(what, Duration::from_secs(60), &node)
        .await;
    broker::queue_len(&app.conn, &q)
        .await
        .expect("the queue is declared again");

    // No session left behind.
    for name in [
        "test-agent-consume",
        "test-agent-publish",
        "journeyman-orchestrator-consume",
        "journeyman-orchestrator-publish",
    ] {
        assert_eq!(
            node.connections_named(name).await,
            1,
            "connections named {name}:\n{}",
            node.diagnostics().await
        );
    }
    assert_consumers_restored(&node, &pb).await;

    let clients = clients("cancel", 3);
    for c in &clients {
        app.start_journey(c).await;
    }
    log.wait_all_in_production(&clients, Duration::from_secs(60))
        .await;
    assert_exactly_once(&pb, &rec, &log, &clients);
    app.stop_orchestrator().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_consumer_cancelled_by_the_broker_redeclares_and_resumes() {
    consumer_cancelled(Cancelled::Agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_consumer_cancelled_by_the_broker_redeclares_and_resumes() {
    consumer_cancelled(Cancelled::Orchestrator).await;
}

/// The memory alarm blocks publishers; consumers on their own connection keep consuming
/// and acking. The orchestrator (a child process here, so it can be stopped and started)
/// applies and acks the replies queued while it was down, publishes nothing during the
/// alarm, and resumes when the alarm clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_alarm_blocks_publishing_but_not_acking() {
    let mut node = BrokerNode::shared().await;
    let pb = patient_playbook();
    let mut app = TestApp::spawn_on(&node.url(), pb.clone(), Mode::ChildProcess).await;
    let mut log = EventLog::declare(&mut app).await;
    let (open_tx, open) = watch::channel(false);
    let rec = Recorder::new(Gated {
        inner: SimAgent::default(),
        open,
    });
    app.start_agent_for_all(rec.clone()).await;
    let clients = clients("alarm", 3);
    for c in &clients {
        app.start_journey(c).await;
    }
    let (r, n) = (rec.clone(), clients.len());
    wait_until("first tasks held by the agent", WAIT, move || {
        deliveries(&r) >= n
    })
    .await;
    // The orchestrator goes away; the agent answers; the replies wait in the queue.
    app.kill_child().await;
    let held = deliveries(&rec);
    open_tx.send(true).unwrap();
    let replies = app.names.partition_queue(0, PartitionQueue::Replies);
    let deadline = Instant::now() + WAIT;
    while node.queue_counts(&replies).await != Some((held as u64, 0)) {
        assert!(Instant::now() < deadline, "replies queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    node.set_vm_memory_high_watermark(0.0).await;
    assert!(node.memory_alarm().await, "memory alarm in effect");
    app.start_child().await;
    // The orchestrator consumes and acks the replies although it cannot publish.
    let deadline = Instant::now() + WAIT;
    while node.queue_counts(&replies).await != Some((0, 0)) {
        assert!(
            Instant::now() < deadline,
            "replies acked during the alarm: {:?}; log:\n{}",
            node.queue_counts(&replies).await,
            app.orchestrator_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and publishes nothing: no next task reaches the agent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        deliveries(&rec),
        held,
        "no task request published during the alarm"
    );
    assert!(node.memory_alarm().await);

    node.set_vm_memory_high_watermark(0.4).await;
    assert!(!node.memory_alarm().await, "memory alarm cleared");
    log.wait_all_in_production(&clients, Duration::from_secs(90))
        .await;
    assert_exactly_once(&pb, &rec, &log, &clients);
    assert_eq!(
        node.queue_counts(&app.names.dead_letter()).await,
        Some((0, 0))
    );
}

/// Crashes (panics) on one request every time it sees it; serves the rest.
struct CrashesOn {
    inner: SimAgent,
    poison: String,
}

impl Agent for CrashesOn {
    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        if request.message_id.to_string() == self.poison {
            panic!("injected crash on the poison message");
        }
        self.inner.handle(request, input).await
    }
}

/// A request that crashes the agent every time: the queue's delivery limit dead-letters
/// it (with the broker's x-death), and the journeys in flight alongside it complete and
/// are not dead-lettered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_by_the_delivery_limit() {
    let mut app = TestApp::spawn_with(patient_playbook(), Mode::InProcess).await;
    let pb = app.playbook.clone();
    let mut log = EventLog::declare(&mut app).await;
    let mut poison = Envelope::new(
        AgentRef::new("test-upstream", "tests"),
        AgentRef::new("test-agent", "journeyman"),
        MessageType::Request,
        "provision_sandbox_environment",
        json!({"client_id": "poison"}),
        chrono::Utc::now(),
    );
    poison.correlation_id = Some(poison.message_id.to_string());
    let rec = Recorder::new(CrashesOn {
        inner: slow_sim(),
        poison: poison.message_id.to_string(),
    });
    app.start_agent_for_all(rec.clone()).await;
    // The poison request goes into the agent's queue, then journeys whose first requests
    // share the queue with it while it crashes the agent again and again.
    publish_request(&app, &poison).await;
    let clients = clients("poison", 3);
    for c in &clients {
        app.start_journey(c).await;
    }

    let dl = app.dead_letters(1).await;
    let body: Value = serde_json::from_slice(&dl[0].body).unwrap();
    assert_eq!(body["message_id"], poison.message_id.to_string());
    assert!(dl[0].headers.contains_key("x-death"), "{:?}", dl[0].headers);
    assert_eq!(
        dl[0]
            .headers
            .get("x-first-death-reason")
            .map(String::as_str),
        Some("delivery_limit"),
        "dead-lettered by the delivery limit: {:?}",
        dl[0].headers
    );
    assert_eq!(
        dl[0].headers.get("x-first-death-queue").map(String::as_str),
        Some(
            app.names
                .intent_queue("provision_sandbox_environment")
                .as_str()
        )
    );
    let crashes = rec
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, m)| *m == poison.message_id.to_string())
        .count();
    assert!(
        crashes as i64 > broker::DELIVERY_LIMIT,
        "handled {crashes} times"
    );

    log.wait_all_in_production(&clients, Duration::from_secs(60))
        .await;
    let poison_id = poison.message_id.to_string();
    assert_exactly_once_but(&pb, &rec, &log, &clients, Some(&poison_id));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.dead_letter_count().await,
        0,
        "only the poison dead-lettered"
    );
    app.stop_orchestrator().await.unwrap();
}

/// Publishes a task request straight to the intents exchange, as the orchestrator would.
async fn publish_request(app: &TestApp, env: &Envelope) {
    let publisher = broker::Publisher::start(&app.conn).await.unwrap();
    let out = broker::Outgoing {
        exchange: app.names.intents(),
        routing_key: env.intent.clone(),
        mandatory: true,
        message_id: env.message_id.to_string(),
        correlation_id: Some(env.message_id.to_string()),
        reply_to: Some(app.names.partition_queue(0, PartitionQueue::Replies)),
        message_type: "request".into(),
        headers: Vec::new(),
        body: env.to_bytes(),
    };
    assert!(matches!(
        publisher.publish(out).await.unwrap(),
        broker::Published::Confirmed
    ));
}

/// A queue that exists with other arguments (406) is a clear start-up error, not a
/// reconnect loop: for the orchestrator and for an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_other_arguments_is_a_clear_startup_error() {
    let names = Names::new(format!(
        "t-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    let url = amqp_url();
    let conn = broker::connect(&url, "journeyman-test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    // A classic queue where journeyman declares a quorum queue with a delivery limit.
    let replies = names.partition_queue(0, PartitionQueue::Replies);
    let task_q = names.intent_queue("provision_sandbox_environment");
    for q in [&replies, &task_q] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = orchestrator::Config::new(&url, &names.namespace, dir.path().join("store"));
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        orchestrator::run(config, Arc::new(Stats::default()), std::future::pending()),
    )
    .await
    .expect("the orchestrator gives up at once instead of reconnecting");
    let err = res.expect_err("the orchestrator refuses to start");
    assert!(
        matches!(err, OrchestratorError::Broker(BrokerError::QueueMismatch { ref queue, .. }) if *queue == replies),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&replies)
            && msg.contains("other arguments")
            && msg.contains("PRECONDITION_FAILED"),
        "clear message: {msg}"
    );

    let config = AgentConfig {
        amqp_url: url.clone(),
        names: names.clone(),
        agent_id: "test-agent".into(),
        intents: vec!["provision_sandbox_environment".into()],
        prefetch: 16,
        max_message_bytes: journeyman::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        keyring: None,
        signing_key: None,
        shutdown_timeout: journeyman::agent::DEFAULT_SHUTDOWN_TIMEOUT,
    };
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        agent::run(
            config,
            Arc::new(SimAgent::default()),
            Arc::new(AgentStats::default()),
            std::future::pending(),
        ),
    )
    .await
    .expect("the agent gives up at once instead of reconnecting");
    let err = res.expect_err("the agent refuses to start");
    assert!(
        matches!(err, BrokerError::QueueMismatch { ref queue, .. } if *queue == task_q),
        "{err:?}"
    );

    let mut queues = vec![names.dead_letter(), replies, task_q];
    queues.extend(JOURNEY_INTENTS.iter().map(|i| names.intent_queue(i)));
    broker::delete_namespace(&conn, &names, &queues).await;
}

/// Only a 406 is a mismatch. A queue held exclusively by another connection (405
/// RESOURCE_LOCKED) is transient: the orchestrator must keep retrying, not exit with
/// "already exists with other arguments", and start once the owner is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_queue_is_retried_not_reported_as_a_mismatch() {
    let names = Names::new(format!(
        "t-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    let url = amqp_url();
    let conn = broker::connect(&url, "journeyman-test").await.unwrap();
    let owner = broker::connect(&url, "journeyman-test-owner")
        .await
        .unwrap();
    let replies = names.partition_queue(0, PartitionQueue::Replies);
    let ch = owner.create_channel().await.unwrap();
    ch.queue_declare(
        replies.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = orchestrator::Config::new(&url, &names.namespace, dir.path().join("store"));
    let stats = Arc::new(Stats::default());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let run = tokio::spawn(orchestrator::run(config, stats.clone(), async move {
        let _ = stop_rx.wait_for(|v| *v).await;
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !run.is_finished(),
        "the orchestrator gave up on a locked queue: {:?}",
        run.await
    );
    assert!(!stats.ready.load(Ordering::Relaxed));
    // The owner goes away, its exclusive queue with it.
    owner.close(200, "bye".into()).await.unwrap();
    wait_until(
        "orchestrator ready once the queue is free",
        Duration::from_secs(30),
        orchestrator_ready(&stats),
    )
    .await;
    stop_tx.send(true).unwrap();
    run.await.unwrap().unwrap();

    let mut queues = vec![names.dead_letter(), replies];
    queues.extend(JOURNEY_INTENTS.iter().map(|i| names.intent_queue(i)));
    broker::delete_namespace(&conn, &names, &queues).await;
}
