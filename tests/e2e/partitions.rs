//! Scale-out (issue 12): journey commands routed by the broker to 16 partitions, dealt to
//! several orchestrator replicas. Journeys spread over the replicas; a replica killed
//! and restarted loses and doubles nothing while the others keep going; a second process
//! with the same replica index stands by (single active consumer); the fleet is
//! repartitioned from 2 to 3 replicas with work in flight; a command without its client
//! id header is refused.
//!
//! These need the consistent-hash exchange: they run on the private broker node
//! ([`BrokerNode::shared`]), one test at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use journeyman::agent::sim::SimAgent;
use journeyman::domain::partition::Replica;
use journeyman::domain::playbook::Playbook;
use journeyman::http::fleet::{FleetList, FleetReport};
use journeyman::orchestrator::{self, Stats};
use journeyman::wire::protocol::{Decoder, Envelope, MessageType};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use crate::{Gate, Recorder};

const PARTITIONS: u16 = 16;

/// The default playbook without gates (journeys run to production on their own) and with
/// task timeouts long enough that a backlog on two debug-build cores, or a task held
/// through a kill or a repartition, is never timed out and retried: every task attempt
/// here is the first one, which is what the exactly-once checks count.
fn ungated() -> Playbook {
    let mut playbook = Playbook::default_playbook();
    for stage in playbook.stages.values_mut() {
        stage.exit_criteria.clear();
        stage.rollback_triggers.clear();
        for t in &mut stage.tasks {
            t.timeout = Duration::from_secs(600);
        }
    }
    playbook
}

fn clients(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Publishes a `journey.start` for every client on one confirmed channel, each with its
/// client id header (as upstream agents send them), and waits for every confirm.
async fn start_all(app: &TestApp, clients: &[String]) {
    let ch = app.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for c in clients {
        let env = TestApp::command(
            "journey.start",
            json!({"client_id": c, "context": {"data_sources": ["drive"], "connectors": ["gdrive"]}}),
        );
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(env.message_id.to_string()))
            .with_headers(client_header(c));
        confirms.push(
            ch.basic_publish(
                app.names.intents().as_str().into(),
                "journey.start".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &env.to_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert_eq!(c.await.unwrap(), Confirmation::Ack(None), "start routed");
    }
    let _ = ch.close(200, "done".into()).await;
}

/// Clients among `among` whose production work has completed, by the events seen so far.
fn produced(app: &TestApp, among: &BTreeSet<String>) -> BTreeSet<String> {
    app.seen_events()
        .iter()
        .filter(|p| p["event"] == "work.completed" && p["stage"] == "production")
        .filter_map(|p| p["client_id"].as_str())
        .filter(|c| among.contains(*c))
        .map(str::to_string)
        .collect()
}

/// Waits for every client's production work (each wait bounded by `WAIT`).
async fn wait_all_in_production<'a>(
    app: &mut TestApp,
    clients: impl IntoIterator<Item = &'a String>,
) {
    for c in clients {
        app.wait_in_production(c).await;
    }
}

/// One in-process orchestrator replica: its own stats, data directory and HTTP address.
struct InProc {
    dir: PathBuf,
    stats: Arc<Stats>,
    bound: journeyman::http::BoundAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), orchestrator::OrchestratorError>>>,
}

impl InProc {
    fn start(app: &TestApp, dir: &Path, replica: Replica, id: &str) -> Self {
        let mut config =
            orchestrator::Config::new(&app.url, &app.names.namespace, dir.to_path_buf());
        config.playbook = app.playbook.clone();
        config.partitions = Some(PARTITIONS);
        config.replica = replica;
        config.orchestrator_id = id.to_string();
        let stats = Arc::new(Stats::default());
        let bound = journeyman::http::BoundAddr::default();
        let (stop, mut rx) = watch::channel(false);
        let (st, b) = (stats.clone(), bound.clone());
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let addr = ([127, 0, 0, 1], 0).into();
            match journeyman::http::serve_orchestrator(config, st, addr, &b, stopped).await {
                Ok(()) => Ok(()),
                Err(journeyman::http::HttpError::Orchestrator(e)) => Err(e),
                Err(e) => panic!("a test replica's HTTP server failed: {e}"),
            }
        });
        Self {
            dir: dir.to_path_buf(),
            stats,
            bound,
            stop,
            task: Some(task),
        }
    }

    /// Starts replica `index` of `count`, with id `index`.
    fn replica(app: &TestApp, dir: &Path, index: u16, count: u16) -> Self {
        Self::start(
            app,
            dir,
            Replica::new(index, count).unwrap(),
            &index.to_string(),
        )
    }

    async fn addr(&self) -> SocketAddr {
        tokio::time::timeout(WAIT, self.bound.wait())
            .await
            .expect("the replica serves HTTP")
    }

    /// Waits until the replica consumes its partitions' queues.
    async fn wait_ready(&self) {
        wait_until("the replica consumes", || {
            self.stats.ready.load(std::sync::atomic::Ordering::Relaxed)
        })
        .await;
    }

    fn started(&self) -> u64 {
        Stats::get(&self.stats.journeys_started)
    }

    /// A graceful stop (what SIGTERM does), which must succeed and let go of the data
    /// directory (a process exiting would; in-process, nothing may keep the store open).
    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("the replica stops")
                .unwrap()
                .expect("the replica stops cleanly");
        }
        // The HTTP server's connections close just after: the store is free soon.
        let deadline = Instant::now() + WAIT;
        loop {
            match journeyman::store::Store::open(&self.dir) {
                Ok(store) => break drop(store),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the stopped replica still holds {}: {e}",
                    self.dir.display()
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Polls `cond` (every 20 ms, bounded by `WAIT`): for state with nothing to wait on.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on right now, for a child replica's HTTP server.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A replica as a child process of the real binary, serving HTTP on `http`, logging to
/// `log` (appended).
fn spawn_child(
    app: &TestApp,
    dir: &Path,
    replica: &str,
    http: SocketAddr,
    log: &Path,
) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args([
            "--namespace",
            &app.names.namespace,
            "orchestrator",
            "--insecure-no-auth",
            "--replica",
            replica,
            "--partitions",
            &PARTITIONS.to_string(),
            "--http-addr",
            &http.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .arg("--playbook")
        .arg(app.playbook_file())
        .env("JOURNEYMAN_AMQP_URL", &app.url)
        .env_remove("JOURNEYMAN_PARTITIONS")
        .env_remove("JOURNEYMAN_REPLICA")
        .env_remove("JOURNEYMAN_REPLICAS")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the journeyman binary")
}

/// Waits until the replica at `addr` says it is ready (consuming).
async fn wait_ready_http(addr: SocketAddr, log: &Path) {
    let c = journeyman::http::client::Client::new(addr, Duration::from_secs(2));
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok((s, _)) = c.raw("/readyz").await
            && s.is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica at {addr} did not become ready; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the real binary with `--http-addr addrs`: (success, stdout, stderr).
async fn cli(addrs: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .arg("--http-addr")
        .arg(addrs)
        .args(args)
        .env_remove("JOURNEYMAN_HTTP_ADDR")
        .output()
        .await
        .expect("run the journeyman binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `journey list --json` over `addrs`, complete (every replica answered).
async fn fleet_list(addrs: &[SocketAddr]) -> FleetList {
    let joined = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (ok, out, err) = cli(&joined, &["journey", "list", "--json"]).await;
    assert!(ok, "journey list over {joined}: {err}");
    let list: FleetList = serde_json::from_str(&out).unwrap();
    assert!(
        !list.partial,
        "every replica answered: {:?}",
        list.unreachable
    );
    list
}

/// The client ids one replica lists (`journey list --json --http-addr <its address>`).
async fn replica_list(addr: SocketAddr) -> BTreeSet<String> {
    let (ok, out, err) = cli(&addr.to_string(), &["journey", "list", "--json"]).await;
    assert!(ok, "journey list at {addr}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let rows = match &v {
        Value::Array(rows) => rows.clone(),
        other => other["journeys"].as_array().cloned().unwrap_or_default(),
    };
    rows.iter()
        .map(|r| r["client_id"].as_str().unwrap().to_string())
        .collect()
}

/// Client id -> the replica (address) listing it; panics if one is listed twice.
fn owners(list: &FleetList) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for j in &list.journeys {
        if let Some(other) = out.insert(j.summary.client_id.clone(), j.replica.clone()) {
            panic!(
                "{} is on two replicas: {other} and {}",
                j.summary.client_id, j.replica
            );
        }
    }
    out
}

/// Checks what the product guarantees about task dispatch, over `journeys` journeys that
/// each ran every forward task of `playbook` once: each task went out under exactly one
/// correlation id (an attempt), and a request the agent saw more than once carried the
/// same message id every time (the orchestrator republishing its outbox after a crash,
/// never a second attempt). With `redelivery_allowed` false, no request was seen twice
/// at all. Returns how many requests were seen again.
fn check_exactly_once<A>(
    rec: &Recorder<A>,
    playbook: &Playbook,
    journeys: usize,
    redelivery_allowed: bool,
) -> usize {
    let seen = rec.seen.lock().unwrap().clone();
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for stage in playbook.stages.values() {
        for t in &stage.tasks {
            *expected.entry(t.intent.clone()).or_default() += journeys;
        }
    }
    for (intent, n) in &expected {
        assert_eq!(
            rec.attempts(intent).len(),
            *n,
            "distinct correlation ids (attempts) of {intent}"
        );
    }
    let mut by_corr: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (_, corr, msg) in &seen {
        by_corr.entry(corr).or_default().insert(msg);
    }
    for (corr, msgs) in &by_corr {
        assert_eq!(
            msgs.len(),
            1,
            "attempt {corr} was sent as {} different requests: {msgs:?}",
            msgs.len()
        );
    }
    let distinct: BTreeSet<&str> = seen.iter().map(|(_, _, m)| m.as_str()).collect();
    let again = seen.len() - distinct.len();
    if !redelivery_allowed {
        assert_eq!(again, 0, "no task request was handled twice");
    }
    again
}

/// The journey's history on the replica holding it: every forward task completed exactly
/// once and none retried (what the journey applied, whatever the agent saw twice).
async fn check_applied_once(holder: &str, client: &str, playbook: &Playbook) {
    let addr: SocketAddr = holder.parse().unwrap();
    let c = journeyman::http::client::Client::new(addr, Duration::from_secs(10));
    let history: Vec<Value> = c
        .get(&format!("/api/journeys/{client}/history"))
        .await
        .unwrap_or_else(|e| panic!("{client}'s history at {addr}: {e}"));
    let mut completed: BTreeMap<String, usize> = BTreeMap::new();
    for e in &history {
        assert_ne!(e["kind"], "task_retry", "{client}: {e}");
        if e["kind"] == "task_completed" {
            *completed
                .entry(e["detail"]["task_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = playbook
        .stages
        .values()
        .flat_map(|s| s.tasks.iter().map(|t| (t.task_id.clone(), 1)))
        .collect();
    assert_eq!(completed, expected, "{client}: each task applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_journeys_spread_over_three_replicas_each_task_once() {
    const N: usize = 300;
    let node = BrokerNode::shared().await;
    let mut app =
        TestApp::spawn_partitioned(&node.url(), ungated(), Mode::Manual, PARTITIONS).await;
    let rec = Recorder::new(SimAgent {
        min_latency: Duration::ZERO,
        max_latency: Duration::from_millis(2),
        ..Default::default()
    });
    app.start_agent_for_all(rec.clone()).await;
    let dirs = tempfile::tempdir().unwrap();
    let replicas: Vec<InProc> = (0..3)
        .map(|i| InProc::replica(&app, &dirs.path().join(format!("r{i}")), i, 3))
        .collect();
    for r in &replicas {
        r.wait_ready().await;
    }
    let all = clients("j", N);
    let began = Instant::now();
    start_all(&app, &all).await;
    wait_all_in_production(&mut app, &all).await;
    let took = began.elapsed();
    let started: Vec<u64> = replicas.iter().map(InProc::started).collect();
    eprintln!(
        "{N} journeys to production over 3 replicas in {took:.1?}; started per replica: {started:?}"
    );

    assert_eq!(
        started.iter().sum::<u64>(),
        N as u64,
        "each journey started once"
    );
    for (i, s) in started.iter().enumerate() {
        assert!(
            *s >= (N as u64) / 5,
            "replica {i} started {s} of {N} journeys, under 20 %: {started:?}"
        );
    }
    check_exactly_once(&rec, &app.playbook, N, false);

    let mut addrs = Vec::new();
    for r in &replicas {
        addrs.push(r.addr().await);
    }
    let list = fleet_list(&addrs).await;
    let owners = owners(&list);
    assert_eq!(
        owners.keys().cloned().collect::<BTreeSet<_>>(),
        all.iter().cloned().collect::<BTreeSet<_>>(),
        "the fleet lists every journey once"
    );
    // Each replica lists exactly the journeys it started.
    for (i, addr) in addrs.iter().enumerate() {
        let held = owners.values().filter(|r| **r == addr.to_string()).count() as u64;
        assert_eq!(held, started[i], "replica {i} at {addr}");
    }
    assert!(
        list.journeys
            .iter()
            .all(|j| j.summary.stage == "production"),
        "every journey is in production"
    );
    let joined = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (ok, out, err) = cli(&joined, &["report", "--json"]).await;
    assert!(ok, "{err}");
    let r: FleetReport = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r.report.journeys, r.replicas_answered),
        (N as u64, 3),
        "{out}"
    );
    assert_eq!(app.dead_letter_count().await, 0);
    for mut r in replicas {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_resumes_its_journeys_while_the_others_keep_going() {
    let node = BrokerNode::shared().await;
    let mut app =
        TestApp::spawn_partitioned(&node.url(), ungated(), Mode::Manual, PARTITIONS).await;
    // Every journey's first pilot task is held at the agent until released: journeys of
    // the replica to be killed are mid-work, their task in flight, when it dies.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    let rec = Recorder::new(Gate {
        intent: "deploy_pilot".into(),
        arrived: arrived_tx,
        open: open_rx,
    });
    let intents: Vec<String> = app.playbook.intents().into_iter().collect();
    let refs: Vec<&str> = intents.iter().map(String::as_str).collect();
    app.start_agent_with(rec.clone(), &refs, |c| c.prefetch = 200)
        .await;

    let dirs = tempfile::tempdir().unwrap();
    let d0 = dirs.path().join("r0");
    let log0 = dirs.path().join("r0.log");
    let http0 = free_port();
    let mut child = spawn_child(&app, &d0, "0/3", http0, &log0);
    wait_ready_http(http0, &log0).await;
    let others = [
        InProc::replica(&app, &dirs.path().join("r1"), 1, 3),
        InProc::replica(&app, &dirs.path().join("r2"), 2, 3),
    ];
    for r in &others {
        r.wait_ready().await;
    }
    let other_addrs = [others[0].addr().await, others[1].addr().await];

    let before = clients("a", 30);
    start_all(&app, &before).await;
    for _ in &before {
        tokio::time::timeout(WAIT, arrived.recv())
            .await
            .expect("every journey's deploy_pilot reaches the agent")
            .unwrap();
    }
    let list = fleet_list(&[http0, other_addrs[0], other_addrs[1]]).await;
    let on0: BTreeSet<String> = owners(&list)
        .into_iter()
        .filter(|(_, r)| *r == http0.to_string())
        .map(|(c, _)| c)
        .collect();
    assert!(
        !on0.is_empty(),
        "replica 0 started some journeys: {:?}",
        list.journeys
    );
    let all_before: BTreeSet<String> = before.iter().cloned().collect();
    assert!(
        produced(&app, &all_before).is_empty(),
        "none finished yet: their pilot task is held"
    );

    // SIGKILL replica 0 with its journeys' tasks in flight, then let the tasks finish:
    // the replies of replica 0's journeys wait in their partitions' reply queues.
    child.start_kill().unwrap();
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the killed replica exits")
        .unwrap();
    open_tx.send(true).unwrap();
    // The other replicas carry on: their journeys from before finish, and new journeys
    // started during the outage run to production on them.
    let on_others: Vec<String> = before
        .iter()
        .filter(|c| !on0.contains(*c))
        .cloned()
        .collect();
    wait_all_in_production(&mut app, &on_others).await;
    let during = clients("b", 30);
    start_all(&app, &during).await;
    let during_set: BTreeSet<String> = during.iter().cloned().collect();
    let ds = during_set.clone();
    app.wait_events(
        "journeys started during the outage in production",
        5,
        move |p| {
            p["event"] == "work.completed"
                && p["stage"] == "production"
                && p["client_id"].as_str().is_some_and(|c| ds.contains(c))
        },
    )
    .await;
    let done_during_outage = produced(&app, &during_set);
    assert!(
        produced(&app, &on0).is_empty(),
        "nothing of the dead replica's progressed"
    );
    assert!(
        child.try_wait().unwrap().is_some(),
        "replica 0 was down all along"
    );
    eprintln!(
        "while replica 0 was down: {} of its journeys waited, {} others finished, {} of {} new ones reached production",
        on0.len(),
        on_others.len(),
        done_during_outage.len(),
        during.len()
    );

    // Restarted on the same data directory, it finishes its journeys and the new ones
    // that waited in its partitions.
    let http0 = free_port();
    let mut child = spawn_child(&app, &d0, "0/3", http0, &log0);
    wait_ready_http(http0, &log0).await;
    let everyone: Vec<String> = before.iter().chain(&during).cloned().collect();
    wait_all_in_production(&mut app, &everyone).await;

    let list = fleet_list(&[http0, other_addrs[0], other_addrs[1]]).await;
    let owners = owners(&list);
    assert_eq!(owners.len(), everyone.len(), "every journey listed once");
    for c in &on0 {
        assert_eq!(owners[c], http0.to_string(), "{c} stayed on replica 0");
    }
    for c in &done_during_outage {
        assert_ne!(
            owners[c],
            http0.to_string(),
            "{c} ran during the outage, so elsewhere"
        );
    }
    // Exactly once, as the product means it: every task went out under one correlation
    // id (the orchestrator never starts a second attempt because of the kill, and the
    // reply the agent sent to a dead replica waited for it in the partition's reply
    // queue). Agents do not deduplicate (src/agent/mod.rs handles every delivery): a
    // request the killed replica had published but not yet marked sent in its outbox is
    // published again on restart with the same message id, and handled again; its
    // second reply is then stale for the journey, which applies each task once.
    let again = check_exactly_once(&rec, &app.playbook, everyone.len(), true);
    for c in &everyone {
        check_applied_once(&owners[c], c, &app.playbook).await;
    }
    eprintln!("task requests redelivered after the kill: {again}");
    let log = std::fs::read_to_string(&log0).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(app.dead_letter_count().await, 0);
    let _ = terminate(&mut child, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_replica_index_stands_by() {
    let node = BrokerNode::shared().await;
    let mut app =
        TestApp::spawn_partitioned(&node.url(), ungated(), Mode::Manual, PARTITIONS).await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    let dirs = tempfile::tempdir().unwrap();
    let r0 = Replica::new(0, 2).unwrap();
    let mut first = InProc::start(&app, &dirs.path().join("first"), r0, "0");
    first.wait_ready().await;
    // Same index, its own data directory: it consumes the same queues, but the broker
    // delivers each partition queue to its first consumer only.
    let standby = InProc::start(&app, &dirs.path().join("standby"), r0, "0-standby");
    standby.wait_ready().await;
    let one = InProc::replica(&app, &dirs.path().join("one"), 1, 2);
    one.wait_ready().await;

    let batch = clients("s", 20);
    start_all(&app, &batch).await;
    wait_all_in_production(&mut app, &batch).await;
    assert_eq!(first.started() + one.started(), 20);
    assert!(
        first.started() > 0,
        "replica 0 applied its partitions' starts"
    );
    assert_eq!(
        standby.started(),
        0,
        "the second 0/2 applied nothing while the first runs"
    );
    assert_eq!(Stats::get(&standby.stats.inputs), 0, "nor saw anything");

    // The first stops: the broker hands its queues to the one standing by.
    first.stop().await;
    let later = clients("t", 20);
    start_all(&app, &later).await;
    wait_all_in_production(&mut app, &later).await;
    let on_one = one.started();
    assert_eq!(standby.started() + on_one, 40 - first.started());
    assert!(standby.started() > 0, "the standby took over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repartitioning_two_replicas_into_three_with_work_in_flight_loses_and_doubles_nothing() {
    let node = BrokerNode::shared().await;
    let mut app =
        TestApp::spawn_partitioned(&node.url(), ungated(), Mode::Manual, PARTITIONS).await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    let rec = Recorder::new(Gate {
        intent: "deploy_pilot".into(),
        arrived: arrived_tx,
        open: open_rx,
    });
    let intents: Vec<String> = app.playbook.intents().into_iter().collect();
    let refs: Vec<&str> = intents.iter().map(String::as_str).collect();
    app.start_agent_with(rec.clone(), &refs, |c| c.prefetch = 200)
        .await;
    let base = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| base.path().join(format!("r{i}")).join("store"))
        .collect();

    // Two replicas; every journey gets as far as its first pilot task, held at the agent.
    let mut two = [
        InProc::replica(&app, &dirs[0], 0, 2),
        InProc::replica(&app, &dirs[1], 1, 2),
    ];
    for r in &two {
        r.wait_ready().await;
    }
    let before = clients("p", 24);
    start_all(&app, &before).await;
    for _ in &before {
        tokio::time::timeout(WAIT, arrived.recv())
            .await
            .expect("deploy_pilot requested")
            .unwrap();
    }
    assert!(
        two.iter().all(|r| r.started() > 0),
        "both replicas hold journeys"
    );

    // deploy/README.md, changing the number of orchestrators: stop the fleet, move the
    // journeys, start the new count. Commands sent meanwhile wait in their queues.
    for r in &mut two {
        r.stop().await;
    }
    let meanwhile = clients("q", 8);
    start_all(&app, &meanwhile).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args([
            "store",
            "repartition",
            "--partitions",
            "16",
            "--replicas",
            "3",
        ])
        .args(&dirs)
        .env_remove("JOURNEYMAN_PARTITIONS")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "$ journeyman store repartition --partitions 16 --replicas 3 d0 d1 d2\n{stdout}{stderr}"
    );
    assert!(out.status.success(), "{stdout}{stderr}");

    let three: Vec<InProc> = (0..3)
        .map(|i| InProc::replica(&app, &dirs[usize::from(i)], i, 3))
        .collect();
    for r in &three {
        r.wait_ready().await;
    }
    // The held tasks finish now; their replies reach the replica that owns the journey.
    open_tx.send(true).unwrap();
    let everyone: Vec<String> = before.iter().chain(&meanwhile).cloned().collect();
    wait_all_in_production(&mut app, &everyone).await;

    // Each journey lives on exactly one replica.
    let mut held: Vec<BTreeSet<String>> = Vec::new();
    for r in &three {
        let addr = r.addr().await;
        let h = replica_list(addr).await;
        for c in &h {
            check_applied_once(&addr.to_string(), c, &app.playbook).await;
        }
        held.push(h);
    }
    eprintln!(
        "journeys per replica after the repartition: {:?}",
        held.iter().map(BTreeSet::len).collect::<Vec<_>>()
    );
    let mut union = BTreeSet::new();
    for (i, h) in held.iter().enumerate() {
        assert!(!h.is_empty(), "replica {i}/3 holds journeys");
        for c in h {
            assert!(union.insert(c.clone()), "{c} is on two replicas");
        }
    }
    assert_eq!(
        union,
        everyone.iter().cloned().collect::<BTreeSet<_>>(),
        "every journey on one replica"
    );
    // The meanwhile starts were applied by the new owners only.
    assert_eq!(
        three.iter().map(InProc::started).sum::<u64>(),
        meanwhile.len() as u64
    );
    check_exactly_once(&rec, &app.playbook, everyone.len(), false);
    assert_eq!(app.dead_letter_count().await, 0);
    for mut r in three {
        r.stop().await;
    }
    // And on the replica owning its partition under the new count (p % 3).
    for (i, dir) in dirs.iter().enumerate() {
        let store = journeyman::store::Store::open(dir).unwrap();
        for rec in store.journeys::<orchestrator::JourneyRecord>() {
            let rec = rec.unwrap();
            let p = rec.partition.expect("a journey records its partition");
            assert!(
                Replica::new(i as u16, 3).unwrap().owns(p),
                "{} (partition {p}) is in replica {i}'s directory",
                rec.journey.client_id
            );
        }
    }
}

/// Publishes `env` as a command without the client id header, with a private `reply_to`
/// when `answered`; returns the answer if any.
async fn send_headerless(app: &TestApp, env: &Envelope, answered: bool) -> Option<Envelope> {
    let ch = app.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(env.message_id.to_string()));
    let mut replies = None;
    if answered {
        let (reply_to, consumer) = private_reply_queue(&ch).await;
        props = props
            .with_correlation_id(ShortString::from(env.message_id.to_string()))
            .with_reply_to(ShortString::from(reply_to));
        replies = Some(consumer);
    }
    let c = ch
        .basic_publish(
            app.names.intents().as_str().into(),
            env.intent.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &env.to_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        c,
        Confirmation::Ack(None),
        "a command without the header still reaches a partition"
    );
    let answer = match replies.as_mut() {
        Some(r) => {
            let d = tokio::time::timeout(WAIT, r.next())
                .await
                .expect("an answer within the wait")
                .expect("reply consumer open")
                .expect("delivery");
            Some(Decoder::default().envelope(&d.data).unwrap())
        }
        None => None,
    };
    let _ = ch.close(200, "done".into()).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_its_client_id_header_is_refused_on_a_partitioned_namespace() {
    let node = BrokerNode::shared().await;
    let mut app =
        TestApp::spawn_partitioned(&node.url(), ungated(), Mode::Manual, PARTITIONS).await;
    // One replica owning all 16 partitions: wherever the broker puts a headerless
    // command, it is here.
    app.start_orchestrator();
    app.http_addr().await;
    let start = TestApp::command("journey.start", json!({"client_id": "acme"}));
    let reply = send_headerless(&app, &start, true).await.unwrap();
    assert_eq!(reply.message_type, MessageType::Error, "{}", reply.payload);
    assert_eq!(
        reply.payload["code"], "client_id_header",
        "{}",
        reply.payload
    );
    assert!(
        reply.payload["message"]
            .as_str()
            .unwrap()
            .contains("x-journeyman-client-id"),
        "{}",
        reply.payload
    );
    assert_eq!(Stats::get(&app.stats.journeys_started), 0, "not applied");
    assert_eq!(
        app.dead_letter_count().await,
        0,
        "answered, not dead-lettered"
    );

    // Without reply_to nobody can be told: a dead letter with the reason.
    let status = TestApp::command("journey.status", json!({"client_id": "acme"}));
    assert!(send_headerless(&app, &status, false).await.is_none());
    let dl = app.dead_letters(1).await;
    let body: Value = serde_json::from_slice(&dl[0].body).unwrap();
    assert_eq!(body["message_id"], status.message_id.to_string());
    assert_eq!(dl[0].reason(), "client_id_header");

    // With the header, the same start is applied.
    app.start_journey("acme").await;
    assert_eq!(Stats::get(&app.stats.journeys_started), 1);
    app.stop_orchestrator().await.unwrap();
}
