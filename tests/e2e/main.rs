//! End-to-end tests over the real RabbitMQ and real sled directories. Each test runs in a
//! namespace of its own (see `helpers`), so they run in parallel on a shared broker.

mod admission;
mod auth;
mod bench;
mod broker_faults;
mod broker_node;
mod cdp;
mod chaos;
mod cli;
mod conformance;
mod crash;
mod dlq;
mod fleet;
mod gates;
mod helpers;
mod http;
mod otel;
mod partitions;
mod refusals;
mod shutdown;
mod trace;
mod webhook;

use journeyman::wire::names::PartitionQueue;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use helpers::*;
use journeyman::agent::sim::SimAgent;
use journeyman::agent::{Agent, TaskError};
use journeyman::wire::protocol::{ClientPayload, Command, Envelope, MessageType, StartPayload};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

/// Wraps an agent and records every request it sees: (intent, correlation id, message id).
pub(crate) struct Recorder<A> {
    inner: A,
    seen: Mutex<Vec<(String, String, String)>>,
}

impl<A> Recorder<A> {
    pub(crate) fn new(inner: A) -> Arc<Self> {
        Arc::new(Self {
            inner,
            seen: Mutex::new(Vec::new()),
        })
    }
    pub(crate) fn attempts(&self, intent: &str) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, _)| i == intent)
            .map(|(_, c, _)| c.clone())
            .collect()
    }
}

impl<A: Agent> Agent for Recorder<A> {
    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        self.seen.lock().unwrap().push((
            request.intent.clone(),
            request.correlation_id.clone().unwrap_or_default(),
            request.message_id.to_string(),
        ));
        self.inner.handle(request, input).await
    }
}

/// Fails the first `n` attempts of chosen intents, then behaves like the simulated agent.
pub(crate) struct Flaky {
    remaining: Mutex<HashMap<String, u32>>,
    retryable: bool,
}

impl Flaky {
    pub(crate) fn new(intent: &str, n: u32, retryable: bool) -> Self {
        Self {
            remaining: Mutex::new(HashMap::from([(intent.to_string(), n)])),
            retryable,
        }
    }
}

impl Agent for Flaky {
    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        let fail = {
            let mut r = self.remaining.lock().unwrap();
            match r.get_mut(&request.intent) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if fail {
            return Err(TaskError {
                code: "injected".into(),
                message: format!("injected failure in {}", request.intent),
                retryable: self.retryable,
            });
        }
        SimAgent::default().handle(request, input).await
    }
}

fn status(client: &str) -> Command {
    Command::Status(ClientPayload {
        client_id: client.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journey_runs_to_production() {
    let mut app = TestApp::spawn().await;
    let rec = Recorder::new(SimAgent::default());
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;

    let reply = app.request(&status("acme")).await;
    assert_eq!(reply.message_type, MessageType::Response);
    let p = &reply.payload;
    assert_eq!(p["stage"], "production");
    assert_eq!(p["completed_stages"], json!(["sandbox", "pilot"]));
    assert_eq!(p["work"]["status"], "completed");
    // The answer is what the published schema promises.
    let v = journeyman::wire::protocol::compile_schema(
        journeyman::wire::protocol::schemas::JOURNEY_STATE,
    );
    assert!(v.is_valid(p), "journey state matches its schema: {p}");
    // Every task of every stage ran exactly once.
    for stage in app.playbook.stages.values() {
        for t in &stage.tasks {
            let expected = stage.tasks.iter().filter(|x| x.intent == t.intent).count();
            assert_eq!(
                rec.attempts(&t.intent).len(),
                expected,
                "attempts of {}",
                t.intent
            );
        }
    }
    assert_eq!(app.dead_letter_count().await, 0);
    app.stop_orchestrator().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_refused_with_reasons() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;

    let reply = app.request(&status("nobody")).await;
    assert_eq!(reply.message_type, MessageType::Error);
    assert_eq!(reply.payload["code"], "not_found");

    let start = Command::Start(StartPayload {
        client_id: "acme".into(),
        context: None,
    });
    assert_eq!(
        app.request(&start).await.message_type,
        MessageType::Response
    );
    // A second start with a new message id is a refusal, not a no-op.
    let again = app.request(&start).await;
    assert_eq!(again.message_type, MessageType::Error);
    assert_eq!(again.payload["code"], "already_exists");
    // Without reply_to nobody can be told: only then is a refusal a dead letter.
    let unanswerable = TestApp::command("journey.start", json!({"client_id": "acme"}));
    app.send(&unanswerable).await;
    let dl = app.dead_letters(1).await;
    // The first dead letter is this one: the answered refusals before it left none.
    let body: Value = serde_json::from_slice(&dl[0].body).unwrap();
    assert_eq!(body["message_id"], unanswerable.message_id.to_string());
    assert_eq!(dl[0].reason(), "already_exists");
    assert_eq!(dl[0].headers["x-journeyman-client-id"], "acme");

    app.evidence(
        "acme",
        &[("search.precision", 0.9)],
        &[("demo.approved", true)],
    )
    .await;
    app.wait_in_production("acme").await;

    // Production's success metrics gate completion: refused with the failing checks.
    let complete = Command::Complete(ClientPayload {
        client_id: "acme".into(),
    });
    let refused = app.request(&complete).await;
    assert_eq!(refused.message_type, MessageType::Error);
    assert_eq!(refused.payload["code"], "gate_failed");
    let checks = refused.payload["details"]["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().all(|c| c["passed"] == false));
    assert!(
        refused.payload["message"]
            .as_str()
            .unwrap()
            .contains("users.adoption")
    );

    app.evidence(
        "acme",
        &[
            ("users.adoption", 0.75),
            ("search.satisfaction", 4.6),
            ("query.growth_mom", 0.25),
        ],
        &[],
    )
    .await;
    let ok = app.request(&complete).await;
    assert_eq!(ok.message_type, MessageType::Response, "{:?}", ok.payload);
    assert_eq!(ok.payload["stage"], "completed");
    assert_eq!(ok.payload["status"], "completed");
    // Nothing happens to a completed journey.
    let after = app.request(&complete).await;
    assert_eq!(after.payload["code"], "invalid_transition");
    assert!(
        after.payload["message"]
            .as_str()
            .unwrap()
            .contains("completed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_twice_then_succeeding_is_retried() {
    let mut app = TestApp::spawn().await;
    let rec = Recorder::new(Flaky::new("install_connectors", 2, true));
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;
    assert_eq!(
        rec.attempts("install_connectors").len(),
        3,
        "three attempts, each its own correlation id"
    );
    assert_eq!(Stats::get(&app.stats.retries), 2);
    assert_eq!(app.dead_letter_count().await, 0);
}

use journeyman::orchestrator::Stats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_past_max_retries_fails_the_work_and_is_dead_lettered() {
    let mut app = TestApp::spawn().await;
    let rec = Recorder::new(Flaky::new("provision_test_dataset", u32::MAX, true));
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    let ev = app
        .wait_event("work.failed", |p| {
            p["event"] == "work.failed" && p["client_id"] == "acme"
        })
        .await;
    assert_eq!(ev["detail"]["task_id"], "provision-test-data");
    let max = app
        .playbook
        .stage("sandbox")
        .unwrap()
        .task("provision-test-data")
        .unwrap()
        .max_retries;
    assert_eq!(rec.attempts("provision_test_dataset").len() as u32, max + 1);

    let dl = app.dead_letters(1).await;
    assert_eq!(dl[0].reason(), "task_failed");
    assert_eq!(dl[0].headers["x-journeyman-client-id"], "acme");
    assert_eq!(dl[0].headers["x-journeyman-task-id"], "provision-test-data");
    assert!(dl[0].headers["x-journeyman-reason-message"].contains("injected failure"));

    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["stage"], "sandbox");
    assert_eq!(s["work"]["status"], "failed");
    let task = s["work"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == "provision-test-data")
        .unwrap();
    assert_eq!(task["status"], "failed");
    assert_eq!(task["attempts"], max + 1);
    assert!(
        task["last_error"]
            .as_str()
            .unwrap()
            .contains("injected failure")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_error_fails_at_once() {
    let mut app = TestApp::spawn().await;
    let rec = Recorder::new(Flaky::new("provision_sandbox_environment", 1, false));
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    app.wait_event("work.failed", |p| p["event"] == "work.failed")
        .await;
    assert_eq!(rec.attempts("provision_sandbox_environment").len(), 1);
    assert_eq!(app.dead_letters(1).await[0].reason(), "task_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_intent_no_agent_serves_is_reported() {
    let pb = playbook(
        r#"
name: lonely
stages:
  sandbox:
    tasks:
      - task_id: ask-nobody
        name: Ask Nobody
        intent: nobody_serves_this
        max_retries: 2
        backoff: { initial: 20ms, max: 100ms, multiplier: 2.0, jitter: 0.0 }
"#,
    );
    let mut app = TestApp::spawn_with(pb, Mode::InProcess).await;
    app.start_journey("acme").await;
    let ev = app
        .wait_event("work.failed", |p| p["event"] == "work.failed")
        .await;
    assert!(
        ev["detail"]["failure"]
            .as_str()
            .unwrap()
            .contains("nobody_serves_this")
    );
    let dl = app.dead_letters(1).await;
    assert_eq!(dl[0].reason(), "no_agent");
    assert_eq!(dl[0].headers["x-journeyman-task-id"], "ask-nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_and_the_next_one_is_processed() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.publish_raw("journey.start", b"{not json", Some("bad-1"))
        .await;
    let invalid = TestApp::command("journey.start", json!({"client": "acme"}));
    app.send(&invalid).await;
    let unknown = TestApp::command("journey.fly", json!({"client_id": "acme"}));
    app.publish_raw("journey.start", &unknown.to_bytes(), None)
        .await;
    app.publish_raw("journey.start", &[0xff, 0xfe, 0x00], None)
        .await;
    app.start_journey("acme").await;
    app.wait_event("acme started", |p| {
        p["event"] == "journey.started" && p["client_id"] == "acme"
    })
    .await;

    let dls = app.dead_letters(4).await;
    let reasons: BTreeSet<&str> = dls.iter().map(|d| d.reason()).collect();
    assert_eq!(
        reasons,
        BTreeSet::from([
            "malformed_json",
            "schema_invalid",
            "unknown_intent",
            "not_utf8"
        ])
    );
    for d in &dls {
        assert_eq!(
            d.headers["x-journeyman-original-routing-key"],
            "journey.start"
        );
        assert_eq!(
            d.headers["x-journeyman-original-queue"],
            app.names.partition_queue(0, PartitionQueue::Start)
        );
        assert!(!d.headers["x-journeyman-reason-message"].is_empty());
    }
    let malformed = dls.iter().find(|d| d.reason() == "malformed_json").unwrap();
    assert_eq!(malformed.body, b"{not json", "the original body is kept");
    app.wait_in_production("acme").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_is_applied_once() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    let first = app.start_journey("acme").await;
    app.send(&first).await; // same message id: a redelivery, not a second command
    // Commands on one queue are handled in order: once "other" starts, the duplicate has
    // been handled too.
    app.start_journey("other").await;
    app.wait_event("other started", |p| {
        p["event"] == "journey.started" && p["client_id"] == "other"
    })
    .await;
    assert_eq!(Stats::get(&app.stats.journeys_started), 2);
    assert_eq!(Stats::get(&app.stats.duplicates), 1);
    assert_eq!(Stats::get(&app.stats.refusals), 0);
    app.wait_in_production("acme").await;
    app.wait_in_production("other").await;
    assert_eq!(app.dead_letter_count().await, 0);
}

/// Holds requests of one intent until released, reporting each arrival.
pub(crate) struct Gate {
    pub(crate) intent: String,
    pub(crate) arrived: mpsc::UnboundedSender<String>,
    pub(crate) open: watch::Receiver<bool>,
}

impl Agent for Gate {
    async fn handle(
        &self,
        request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        if request.intent == self.intent {
            let _ = self.arrived.send(request.message_id.to_string());
            let mut open = self.open.clone();
            let _ = open.wait_for(|v| *v).await;
        }
        SimAgent::default().handle(request, input).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_mid_work_resumes_without_losing_or_duplicating_tasks() {
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::ChildProcess,
    )
    .await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    let rec = Recorder::new(Gate {
        intent: "deploy_pilot".into(),
        arrived: arrived_tx,
        open: open_rx,
    });
    app.start_agent_for_all(rec.clone()).await;
    let clients = ["c1", "c2", "c3"];
    for c in clients {
        app.start_journey(c).await;
    }
    // Every journey is in pilot with its first task in flight at the agent.
    for _ in clients {
        tokio::time::timeout(WAIT, arrived.recv())
            .await
            .expect("deploy_pilot requested")
            .unwrap();
    }
    app.kill_child().await;
    app.start_child().await;
    open_tx.send(true).unwrap();
    for c in clients {
        app.wait_in_production(c).await;
    }
    // No task lost (all reached production) and none duplicated: each task of each
    // journey was dispatched under exactly one correlation id.
    let mut per_intent: BTreeMap<String, usize> = BTreeMap::new();
    for stage in app.playbook.stages.values() {
        for t in &stage.tasks {
            *per_intent.entry(t.intent.clone()).or_default() += clients.len();
        }
    }
    for (intent, expected) in per_intent {
        assert_eq!(
            rec.attempts(&intent).len(),
            expected,
            "distinct attempts of {intent}"
        );
    }
    let log = app.orchestrator_log();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_on_the_same_directory_is_refused() {
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::ChildProcess,
    )
    .await;
    // The first one holds the directory once it answers.
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.wait_event("acme started", |p| p["event"] == "journey.started")
        .await;
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args([
                "--namespace",
                &app.names.namespace,
                "orchestrator",
                "--insecure-no-auth",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(app.data_dir())
            .env("JOURNEYMAN_AMQP_URL", amqp_url())
            .output(),
    )
    .await
    .expect("the second orchestrator exits at once")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_with_another_body_is_a_conflict_not_a_duplicate() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    let first = app.start_journey("acme").await;
    let mut forged = TestApp::command("journey.start", json!({"client_id": "other"}));
    forged.message_id = first.message_id;
    app.send(&forged).await;
    let dl = app.dead_letters(1).await;
    assert_eq!(dl[0].reason(), "conflict");
    assert!(dl[0].headers["x-journeyman-reason-message"].contains("different body"));
    assert_eq!(
        dl[0].body,
        forged.to_bytes(),
        "the conflicting message is kept as sent"
    );
    let other = app.request(&status("other")).await;
    assert_eq!(
        other.payload["code"], "not_found",
        "the conflicting command was not applied"
    );
    assert_eq!(Stats::get(&app.stats.conflicts), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_data_directory_is_a_clear_fatal_error() {
    let app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let dir = app.data_dir();
    // A store that existed, then its log was destroyed.
    drop(journeyman::store::Store::open(&dir).unwrap());
    std::fs::write(dir.join("db"), vec![0x5a; 8192]).unwrap();
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args([
                "--namespace",
                &app.names.namespace,
                "orchestrator",
                "--insecure-no-auth",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&dir)
            .env("JOURNEYMAN_AMQP_URL", amqp_url())
            .output(),
    )
    .await
    .expect("it exits at once")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is corrupt") && stderr.contains("Move it aside"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Never answers: holds every request until the test ends.
struct Silent;

impl Agent for Silent {
    async fn handle(
        &self,
        _: &Envelope,
        _: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_times_out_retries_and_pauses_the_journey() {
    let pb = playbook(
        r#"
name: silent
stages:
  sandbox:
    tasks:
      - task_id: ask
        name: Ask The Silent Agent
        intent: never_answers
        max_retries: 2
        timeout: 300ms
        backoff: { initial: 20ms, max: 100ms, multiplier: 2.0, jitter: 0.0 }
"#,
    );
    let mut app = TestApp::spawn_with(pb, Mode::InProcess).await;
    let rec = Recorder::new(Silent);
    app.start_agent(rec.clone(), &["never_answers"]).await;
    app.start_journey("acme").await;
    app.wait_event("paused", |p| p["event"] == "journey.paused")
        .await;
    assert_eq!(
        rec.attempts("never_answers").len(),
        3,
        "the first attempt and two retries"
    );
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["status"], "paused");
    assert!(
        s["paused"]["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_an_unknown_correlation_id_is_recorded_and_ignored() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;
    let before = Stats::get(&app.stats.stale_replies);
    // A reply nobody asked for, straight to the orchestrator's reply queue.
    let mut stray = TestApp::command(
        "run_security_scan",
        json!({"status": "completed", "output": {}}),
    );
    stray.message_type = MessageType::Response;
    stray.correlation_id = Some("no-such-attempt".into());
    let ch = app.conn.create_channel().await.unwrap();
    let publisher = journeyman::broker::Publisher::start(&app.conn)
        .await
        .unwrap();
    publisher
        .publish(journeyman::broker::Outgoing {
            exchange: String::new(),
            routing_key: app.names.partition_queue(0, PartitionQueue::Replies),
            mandatory: true,
            message_id: stray.message_id.to_string(),
            correlation_id: stray.correlation_id.clone(),
            reply_to: None,
            message_type: "response".into(),
            headers: Vec::new(),
            body: stray.to_bytes(),
        })
        .await
        .unwrap();
    drop(ch);
    // The reply queue is handled in order: once a later journey's first task reply has
    // been applied, the stray one before it has been handled too.
    app.start_journey("beta").await;
    app.wait_event("beta's first task done", |p| {
        p["event"] == "dashboard.status_card"
            && p["client_id"] == "beta"
            && p["detail"]["progress"]["tasks_completed"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(Stats::get(&app.stats.stale_replies), before + 1);
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["status"], "live", "nothing changed");
    assert_eq!(app.dead_letter_count().await, 0);
}
