//! Graceful shutdown and agent replicas, with the real binary as child processes: a
//! SIGTERM (what Kubernetes sends on a rolling update) to the orchestrator or to an
//! `agents` process mid-run loses nothing and makes nothing happen twice; several
//! `agents` processes share the work of one orchestrator.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use journeyman::domain::playbook::Playbook;
use serde_json::{Value, json};

use crate::helpers::*;

/// The shutdown bound given to the processes; they must exit well within it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The default playbook without gates or rollback triggers (journeys run on their own),
/// and with task timeouts longer than the test: a request lost in a shutdown would never
/// be retried, and its journey would never reach production.
fn playbook() -> Playbook {
    let mut p = Playbook::default_playbook();
    for stage in p.stages.values_mut() {
        stage.exit_criteria.clear();
        stage.rollback_triggers.clear();
        for t in &mut stage.tasks {
            t.timeout = Duration::from_secs(300);
        }
    }
    p
}

/// Stage tasks per journey: what the agents must handle, once each, per journey.
fn tasks_per_journey(p: &Playbook) -> usize {
    p.stages.values().map(|s| s.tasks.len()).sum()
}

/// A `journeyman agents` child process and its JSON log.
struct AgentsProcess {
    id: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl AgentsProcess {
    /// Starts `journeyman agents` with agent id `id` and waits until it consumes.
    async fn start(app: &TestApp, id: &str, extra: &[&str]) -> Self {
        let log = app.dir.path().join(format!("agents-{id}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args([
                "--namespace",
                &app.names.namespace,
                "--log-format",
                "json",
                "agents",
                "--agent-id",
                id,
                "--shutdown-timeout",
                &format!("{}s", SHUTDOWN_TIMEOUT.as_secs()),
                "--playbook",
            ])
            .arg(app.playbook_file())
            .args(extra)
            .env("JOURNEYMAN_AMQP_URL", &app.url)
            .env("RUST_LOG", "info")
            .env_remove("JOURNEYMAN_AUTH_KEYS")
            .env_remove("JOURNEYMAN_AUTH_KEYS_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn journeyman agents");
        let p = Self {
            id: id.to_string(),
            child,
            log,
        };
        p.wait_log("agent consuming").await;
        p
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn find(&self, message: &str) -> Option<Value> {
        self.lines()
            .into_iter()
            .find(|l| l["fields"]["message"] == message)
    }

    /// Waits (bounded) until the process logs `message`: the log is its event stream.
    async fn wait_log(&self, message: &str) -> Value {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(l) = self.find(message) {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "agents {} never logged '{message}'; log:\n{}",
                self.id,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }

    /// SIGTERMs the process, checks it exits 0 within the bound, and returns how many
    /// requests it handled (from its own "agent stopped" line).
    async fn terminate(mut self) -> u64 {
        let (status, took) = terminate(&mut self.child, SHUTDOWN_TIMEOUT + WAIT).await;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let status = status.unwrap_or_else(|| panic!("agents {} ignored SIGTERM:\n{log}", self.id));
        assert!(
            status.success(),
            "agents {} exit status {status:?}:\n{log}",
            self.id
        );
        assert!(
            took < SHUTDOWN_TIMEOUT,
            "agents {} took {took:?} to stop",
            self.id
        );
        let stopped = self
            .find("agent stopped")
            .unwrap_or_else(|| panic!("agents {} did not log its stop:\n{log}", self.id));
        assert_eq!(stopped["fields"]["failed"], 0, "{}", self.id);
        let errors: Vec<Value> = self
            .lines()
            .into_iter()
            .filter(|l| l["level"] == "ERROR")
            .collect();
        assert!(
            errors.is_empty(),
            "agents {}: errors logged: {errors:?}",
            self.id
        );
        assert!(
            !log.contains("requests still in flight go back"),
            "agents {}: the shutdown timed out:\n{log}",
            self.id
        );
        let warnings: Vec<String> = self
            .lines()
            .iter()
            .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
            .map(|l| l["fields"]["message"].to_string())
            .collect();
        eprintln!(
            "agents {}: stopped in {took:?}, handled {}; warnings: {warnings:?}",
            self.id, stopped["fields"]["handled"]
        );
        stopped["fields"]["handled"].as_u64().unwrap()
    }
}

fn start_command(client: &str) -> journeyman::wire::protocol::Envelope {
    TestApp::command(
        "journey.start",
        json!({"client_id": client, "context": {"data_sources": ["drive"], "connectors": ["gdrive"]}}),
    )
}

/// Effects that happen once per journey (per stage): each must carry one message id
/// only. A second id would be the same change applied twice; copies with the same id are
/// a republished outbox entry, absorbed downstream.
fn applied_twice<'a>(events: impl Iterator<Item = (&'a str, &'a Value)>) -> Vec<String> {
    let mut effects: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (message_id, p) in events {
        let name = p["event"].as_str().unwrap_or_default();
        let stage = match name {
            "journey.started" => "-",
            "journey.promoted" | "work.completed" => p["stage"].as_str().unwrap_or_default(),
            _ => continue,
        };
        effects
            .entry((
                p["client_id"].as_str().unwrap_or_default().into(),
                name.into(),
                stage.into(),
            ))
            .or_default()
            .insert(message_id.into());
    }
    effects
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(k, ids)| format!("{k:?} x{}", ids.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_orchestrator_and_an_agent_mid_run_loses_nothing() {
    let mut app = TestApp::spawn_with(playbook(), Mode::Manual).await;
    let timeout_env = format!("{}s", SHUTDOWN_TIMEOUT.as_secs());
    let env = [("JOURNEYMAN_SHUTDOWN_TIMEOUT", timeout_env.as_str())];
    // Slow enough agents that requests are in flight whenever a SIGTERM lands.
    let slow = ["--min-latency-ms", "20", "--max-latency-ms", "120"];
    let a = AgentsProcess::start(&app, "agents-a", &slow).await;
    let b = AgentsProcess::start(&app, "agents-b", &slow).await;
    app.start_child_with(&env).await;

    let clients: Vec<String> = (1..=30).map(|i| format!("term-{i:02}")).collect();
    for c in &clients {
        app.send(&start_command(c)).await;
    }

    // SIGTERM the orchestrator once journeys are under way.
    let promoted = |p: &Value| p["event"] == "journey.promoted";
    app.wait_events("a first promotion", 1, promoted).await;
    let before = app.seen_events().iter().filter(|p| promoted(p)).count();
    let (status, took) = app.terminate_child(SHUTDOWN_TIMEOUT + WAIT).await;
    let log = app.orchestrator_log();
    assert!(status.success(), "orchestrator exit {status:?}:\n{log}");
    assert!(took < SHUTDOWN_TIMEOUT, "the orchestrator took {took:?}");
    assert!(log.contains("drained"), "no drain logged:\n{log}");
    assert!(!log.contains("ERROR"), "errors logged:\n{log}");
    assert!(
        !log.contains("shutdown timeout"),
        "the drain hit its bound:\n{log}"
    );
    let drained = log
        .lines()
        .find(|l| l.contains("drained"))
        .unwrap_or_default();
    eprintln!("orchestrator: SIGTERM after {before} promotions, exited 0 in {took:?}: {drained}");

    // Restart on the same directory; once it makes progress, SIGTERM one agents process
    // mid-run and start another.
    app.start_child_with(&env).await;
    app.wait_events("ten more promotions", before + 10, promoted)
        .await;
    let handled_a = a.terminate().await;
    let c = AgentsProcess::start(&app, "agents-c", &slow).await;

    for client in &clients {
        app.wait_in_production(client).await;
    }
    let handled_b = b.terminate().await;
    let handled_c = c.terminate().await;

    // Nothing lost: every journey is in production (above), none paused or failed.
    let events = app.seen_events().to_vec();
    let trouble: Vec<&Value> = events
        .iter()
        .filter(|p| matches!(p["event"].as_str(), Some("journey.paused" | "work.failed")))
        .collect();
    assert!(trouble.is_empty(), "paused or failed: {trouble:?}");
    // Nothing twice: each effect under one message id, and every task handled exactly
    // once across the agents processes (a request handled twice would be one whose ack
    // a shutdown lost, or one the orchestrator published twice).
    assert_eq!(
        applied_twice(app.seen_events_with_ids()),
        Vec::<String>::new()
    );
    let expected = (tasks_per_journey(&app.playbook) * clients.len()) as u64;
    assert_eq!(
        handled_a + handled_b + handled_c,
        expected,
        "requests handled by a, b, c: {handled_a} + {handled_b} + {handled_c}"
    );
    assert_eq!(app.dead_letter_count().await, 0, "dead letters");
    let (status, _) = app.terminate_child(SHUTDOWN_TIMEOUT + WAIT).await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_processes_share_the_work_of_one_orchestrator() {
    let mut app = TestApp::spawn_with(playbook(), Mode::Manual).await;
    // A small prefetch, so that RabbitMQ spreads each queue's requests over the replicas.
    let opts = [
        "--prefetch",
        "2",
        "--min-latency-ms",
        "5",
        "--max-latency-ms",
        "30",
    ];
    let mut replicas = Vec::new();
    for id in ["replica-1", "replica-2", "replica-3"] {
        replicas.push(AgentsProcess::start(&app, id, &opts).await);
    }
    app.start_child().await;
    let clients: Vec<String> = (1..=24).map(|i| format!("spread-{i:02}")).collect();
    for c in &clients {
        app.send(&start_command(c)).await;
    }
    for c in &clients {
        app.wait_in_production(c).await;
    }
    let mut handled = BTreeMap::new();
    for r in replicas {
        let id = r.id.clone();
        handled.insert(id, r.terminate().await);
    }
    eprintln!("requests handled per agents process: {handled:?}");
    for (id, n) in &handled {
        assert!(*n > 0, "{id} handled nothing: {handled:?}");
    }
    let expected = (tasks_per_journey(&app.playbook) * clients.len()) as u64;
    assert_eq!(handled.values().sum::<u64>(), expected, "{handled:?}");
    assert_eq!(
        applied_twice(app.seen_events_with_ids()),
        Vec::<String>::new()
    );
    let (status, _) = app.terminate_child(SHUTDOWN_TIMEOUT + WAIT).await;
    assert!(status.success());
}
