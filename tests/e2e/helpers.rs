//! Spawns an isolated app per test: its own namespace on the shared broker, its own sled
//! directory, an in-process orchestrator (or a child process), and a window on the
//! journey events and dead letters. Every wait is bounded; everything is deleted after.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use journeyman::agent::{self, Agent, AgentConfig, AgentStats};
use journeyman::broker::{self, Names};
use journeyman::domain::playbook::Playbook;
use journeyman::orchestrator::{self, Stats};
use journeyman::wire::protocol::{
    AgentRef, Command, Decoder, Envelope, EvidenceEvent, EvidencePayload, JOURNEY_INTENTS,
    MessageType,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn amqp_url() -> String {
    std::env::var("JOURNEYMAN_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A dead-lettered message: its reason headers and body.
#[derive(Debug)]
pub struct DeadLetter {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl DeadLetter {
    pub fn reason(&self) -> &str {
        self.headers
            .get("x-journeyman-reason")
            .map(String::as_str)
            .unwrap_or("")
    }
}

pub struct TestApp {
    pub names: Names,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub conn: Connection,
    pub stats: Arc<Stats>,
    pub playbook: Playbook,
    /// The in-process orchestrator's HTTP address, once bound (it serves on port 0).
    pub http: journeyman::http::BoundAddr,
    stop: watch::Sender<bool>,
    orchestrator: Option<JoinHandle<Result<(), orchestrator::OrchestratorError>>>,
    child: Option<tokio::process::Child>,
    events: mpsc::UnboundedReceiver<Envelope>,
    /// Every event received so far: a wait may look for one that arrived while the test
    /// was waiting for another.
    seen: Vec<Value>,
    /// The message id of each event in `seen`, same order.
    seen_ids: Vec<String>,
    dead: Option<lapin::Consumer>,
    queues: Vec<String>,
    /// Partitions of the namespace: 1 unless a test asks for more (which needs the
    /// consistent-hash exchange, so a node of the test's own).
    pub partitions: u16,
}

pub enum Mode {
    InProcess,
    ChildProcess,
    /// No orchestrator yet: the test starts one itself.
    Manual,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Playbook::default_playbook(), Mode::InProcess).await
    }

    pub async fn spawn_with(playbook: Playbook, mode: Mode) -> Self {
        Self::spawn_on(&amqp_url(), playbook, mode).await
    }

    /// Like `spawn_with`, on the broker at `url` (a test's own node, see `broker_node`).
    pub async fn spawn_on(url: &str, playbook: Playbook, mode: Mode) -> Self {
        Self::spawn_partitioned(url, playbook, mode, 1).await
    }

    /// Like `spawn_on`, with the namespace declared with `partitions` partitions.
    pub async fn spawn_partitioned(
        url: &str,
        playbook: Playbook,
        mode: Mode,
        partitions: u16,
    ) -> Self {
        static LOGS: std::sync::Once = std::sync::Once::new();
        LOGS.call_once(|| {
            let filter =
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "info,lapin=warn,lapin::returned_messages=error",
                    )
                });
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
        let names = Names::new(format!(
            "t-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ));
        let url = url.to_string();
        let conn = broker::connect(&url, "journeyman-test")
            .await
            .expect("the tests need RabbitMQ: run scripts/test, which starts one");
        let ch = conn.create_channel().await.unwrap();
        // Journey command queues exist before the orchestrator starts, so commands sent
        // early wait for it. Task queues are declared by the agents that serve them.
        let journey_intents = JOURNEY_INTENTS.iter().map(|s| s.to_string());
        let mut queues = broker::declare_topology(&ch, &names, journey_intents, partitions)
            .await
            .unwrap();
        queues.extend(playbook.intents().iter().map(|i| names.intent_queue(i)));
        let events = subscribe_events(&conn, &names).await;
        let (stop, _) = watch::channel(false);
        let dir = tempfile::tempdir().unwrap();
        let mut app = Self {
            names,
            url,
            dir,
            conn,
            stats: Arc::new(Stats::default()),
            playbook,
            http: Default::default(),
            stop,
            orchestrator: None,
            child: None,
            events,
            seen: Vec::new(),
            seen_ids: Vec::new(),
            dead: None,
            queues,
            partitions,
        };
        match mode {
            Mode::InProcess => app.start_orchestrator(),
            Mode::ChildProcess => app.start_child().await,
            Mode::Manual => {}
        }
        app
    }

    /// Deletes `queue` with the namespace when the app is dropped.
    pub fn track_queue(&mut self, queue: String) {
        self.queues.push(queue);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn start_orchestrator(&mut self) {
        self.start_orchestrator_with(|_| {})
    }

    /// The in-process orchestrator with a test's own settings.
    pub fn start_orchestrator_with(&mut self, configure: impl FnOnce(&mut orchestrator::Config)) {
        let mut config =
            orchestrator::Config::new(&self.url, &self.names.namespace, self.data_dir());
        config.playbook = self.playbook.clone();
        config.partitions = Some(self.partitions);
        configure(&mut config);
        let stats = self.stats.clone();
        let mut rx = self.stop.subscribe();
        let bound = self.http.clone();
        self.orchestrator = Some(tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let addr = ([127, 0, 0, 1], 0).into();
            match journeyman::http::serve_orchestrator(config, stats, addr, &bound, stopped).await {
                Ok(()) => Ok(()),
                Err(journeyman::http::HttpError::Orchestrator(e)) => Err(e),
                Err(e) => panic!("the test orchestrator's HTTP server failed: {e}"),
            }
        }));
    }

    /// The in-process orchestrator as one replica of a fleet: serving on `addr`, its
    /// dashboard and `/api/fleet/*` gathering `fleet.peers`.
    pub fn start_replica(
        &mut self,
        addr: std::net::SocketAddr,
        fleet: journeyman::http::FleetConfig,
    ) {
        let mut config =
            orchestrator::Config::new(&self.url, &self.names.namespace, self.data_dir());
        config.playbook = self.playbook.clone();
        let stats = self.stats.clone();
        let mut rx = self.stop.subscribe();
        let bound = self.http.clone();
        self.orchestrator = Some(tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            match journeyman::http::serve_orchestrator_with(
                config, stats, addr, fleet, &bound, stopped,
            )
            .await
            {
                Ok(()) => Ok(()),
                Err(journeyman::http::HttpError::Orchestrator(e)) => Err(e),
                Err(e) => panic!("the test replica's HTTP server failed: {e}"),
            }
        }));
    }

    /// The orchestrator as a separate process (the real binary), so a test can kill it.
    pub async fn start_child(&mut self) {
        self.start_child_with(&[]).await
    }

    /// Waits for the child orchestrator to exit on its own (a crash point) and returns how.
    pub async fn wait_child_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("a child orchestrator runs");
        match tokio::time::timeout(WAIT, c.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "the child orchestrator did not exit; log:\n{}",
                self.orchestrator_log()
            ),
        }
    }

    /// The orchestrator binary as a child process, with extra environment variables.
    pub async fn start_child_with(&mut self, env: &[(&str, &str)]) {
        let playbook_file = self.playbook_file();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("orchestrator.log"))
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args([
                "--namespace",
                &self.names.namespace,
                "orchestrator",
                "--insecure-no-auth",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(self.data_dir())
            .arg("--playbook")
            .arg(&playbook_file)
            .env("JOURNEYMAN_AMQP_URL", &self.url)
            .env("JOURNEYMAN_PARTITIONS", self.partitions.to_string())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the journeyman binary");
        self.child = Some(child);
    }

    /// The in-process orchestrator's HTTP address, waiting until it has bound.
    pub async fn http_addr(&self) -> std::net::SocketAddr {
        tokio::time::timeout(WAIT, self.http.wait())
            .await
            .expect("the orchestrator serves HTTP")
    }

    /// SIGTERMs the child orchestrator (a graceful stop, as Kubernetes does on a rolling
    /// update) and waits up to `within` for it to exit; returns how and how long it took.
    pub async fn terminate_child(
        &mut self,
        within: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("a child orchestrator runs");
        let (status, took) = terminate(&mut c, within).await;
        let status = status.unwrap_or_else(|| {
            panic!(
                "the orchestrator did not exit within {within:?} of SIGTERM; log:\n{}",
                self.orchestrator_log()
            )
        });
        (status, took)
    }

    /// Writes the app's playbook to a file (for child processes) and returns its path.
    pub fn playbook_file(&self) -> PathBuf {
        let path = self.dir.path().join("playbook.yaml");
        std::fs::write(&path, serde_norway::to_string(&self.playbook).unwrap()).unwrap();
        path
    }

    /// SIGKILLs the child orchestrator and waits for it to be gone.
    pub async fn kill_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().unwrap();
            let _ = tokio::time::timeout(WAIT, c.wait())
                .await
                .expect("child exits");
        }
    }

    pub fn orchestrator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("orchestrator.log")).unwrap_or_default()
    }

    /// Stops the in-process orchestrator and returns its result.
    pub async fn stop_orchestrator(&mut self) -> Result<(), orchestrator::OrchestratorError> {
        let _ = self.stop.send(true);
        let r = match self.orchestrator.take() {
            Some(h) => tokio::time::timeout(WAIT, h)
                .await
                .expect("orchestrator stops")
                .unwrap(),
            None => Ok(()),
        };
        self.stop = watch::channel(false).0;
        r
    }

    /// Starts an agent serving `intents` until the app is dropped, and waits until it
    /// consumes.
    pub async fn start_agent<A: Agent>(&self, agent: Arc<A>, intents: &[&str]) -> Arc<AgentStats> {
        self.start_agent_with(agent, intents, |_| {}).await
    }

    /// Like `start_agent`, with the config adjusted first (keys, agent id, ...).
    pub async fn start_agent_with<A: Agent>(
        &self,
        agent: Arc<A>,
        intents: &[&str],
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> Arc<AgentStats> {
        let mut config = AgentConfig {
            amqp_url: self.url.clone(),
            names: self.names.clone(),
            agent_id: "test-agent".into(),
            intents: intents.iter().map(|s| s.to_string()).collect(),
            prefetch: 16,
            max_message_bytes: journeyman::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
            keyring: None,
            signing_key: None,
            shutdown_timeout: journeyman::agent::DEFAULT_SHUTDOWN_TIMEOUT,
        };
        adjust(&mut config);
        let stats = Arc::new(AgentStats::default());
        let st = stats.clone();
        let mut rx = self.stop.subscribe();
        tokio::spawn(async move {
            let _ = agent::run(config, agent, st, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
        });
        tokio::time::timeout(WAIT, stats.wait_ready())
            .await
            .expect("agent starts consuming");
        stats
    }

    /// Serves every intent of the playbook with `agent`.
    pub async fn start_agent_for_all<A: Agent>(&self, agent: Arc<A>) -> Arc<AgentStats> {
        let intents: Vec<String> = self.playbook.intents().into_iter().collect();
        let refs: Vec<&str> = intents.iter().map(String::as_str).collect();
        self.start_agent(agent, &refs).await
    }

    /// A journey command envelope from the test's upstream agent.
    pub fn command(intent: &str, payload: Value) -> Envelope {
        Envelope::new(
            AgentRef::new("test-upstream", "tests"),
            AgentRef::orchestrator(),
            MessageType::Request,
            intent,
            payload,
            Utc::now(),
        )
    }

    /// Publishes raw bytes to the intents exchange with confirms.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(ShortString::from(id));
        }
        // As upstream agents do: the client id header routes the command to its partition.
        if let Some(client) = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["payload"]["client_id"].as_str().map(str::to_string))
        {
            props = props.with_headers(client_header(&client));
        }
        let c = ch
            .basic_publish(
                self.names.intents().as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(c, Confirmation::Ack(None), "command routed");
        let _ = ch.close(200, "done".into()).await;
    }

    pub async fn send(&self, env: &Envelope) {
        self.publish_raw(
            &env.intent,
            &env.to_bytes(),
            Some(&env.message_id.to_string()),
        )
        .await;
    }

    /// Starts a journey, waits until it has started, and reports what upstream agents
    /// report for the sandbox gate (DES-002 §1); the rest comes from task outputs.
    pub async fn start_journey(&mut self, client: &str) -> Envelope {
        let env = Self::command(
            "journey.start",
            serde_json::json!({"client_id": client, "context": {"data_sources": ["drive"], "connectors": ["gdrive"]}}),
        );
        self.send(&env).await;
        let c = client.to_string();
        self.wait_event(&format!("{client} started"), move |p| {
            p["event"] == "journey.started" && p["client_id"] == c.as_str()
        })
        .await;
        self.evidence(
            client,
            &[("search.precision", 0.9)],
            &[("demo.approved", true)],
        )
        .await;
        env
    }

    /// Reports evidence and waits until the orchestrator has applied it.
    pub async fn evidence(
        &self,
        client: &str,
        metrics: &[(&str, f64)],
        flags: &[(&str, bool)],
    ) -> Envelope {
        let cmd = Command::Evidence(EvidencePayload {
            client_id: client.into(),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            flags: flags.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            events: Vec::new(),
        });
        self.request(&cmd).await
    }

    /// Reports a dated event (a bug, an incident) and waits until it is applied.
    pub async fn report_event(&self, client: &str, name: &str, severity: Option<&str>) -> Envelope {
        let cmd = Command::Evidence(EvidencePayload {
            client_id: client.into(),
            metrics: Default::default(),
            flags: Default::default(),
            events: vec![EvidenceEvent {
                name: name.into(),
                at: Some(Utc::now()),
                severity: severity.map(str::to_string),
                detail: None,
            }],
        });
        self.request(&cmd).await
    }

    /// A command with a reply, through the same code path as the CLI.
    pub async fn request(&self, cmd: &Command) -> Envelope {
        journeyman::ops::cli::request(&self.conn, &self.names, cmd, WAIT)
            .await
            .expect("the orchestrator answers")
    }

    /// Every event received so far.
    pub fn seen_events(&self) -> &[Value] {
        &self.seen
    }

    /// Waits for a journey event matching `pred` (or finds it among those already seen).
    pub async fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let fut = async {
            while let Some(env) = self.events.recv().await {
                self.seen.push(env.payload.clone());
                self.seen_ids.push(env.message_id.to_string());
                if pred(&env.payload) {
                    return env.payload;
                }
            }
            panic!("event stream ended while waiting for {what}");
        };
        match tokio::time::timeout(WAIT, fut).await {
            Ok(v) => v,
            Err(_) => panic!(
                "timed out waiting for {what}; orchestrator log:\n{}",
                self.orchestrator_log()
            ),
        }
    }

    /// Every event received so far with its message id.
    pub fn seen_events_with_ids(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.seen_ids.iter().map(String::as_str).zip(&self.seen)
    }

    /// Waits until `n` of the events received match `pred`.
    pub async fn wait_events(&mut self, what: &str, n: usize, pred: impl Fn(&Value) -> bool) {
        let fut = async {
            while self.seen.iter().filter(|v| pred(v)).count() < n {
                let Some(env) = self.events.recv().await else {
                    panic!("event stream ended while waiting for {what}");
                };
                self.seen.push(env.payload);
                self.seen_ids.push(env.message_id.to_string());
            }
        };
        if tokio::time::timeout(WAIT, fut).await.is_err() {
            panic!(
                "timed out waiting for {what}; orchestrator log:\n{}",
                self.orchestrator_log()
            );
        }
    }

    /// Waits until `client`'s production unit of work completes.
    pub async fn wait_in_production(&mut self, client: &str) -> Value {
        let c = client.to_string();
        self.wait_event(&format!("{client} through production"), move |p| {
            p["client_id"] == c.as_str()
                && p["event"] == "work.completed"
                && p["stage"] == "production"
        })
        .await
    }

    /// Takes the next `n` dead letters (acking them), waiting for each.
    pub async fn dead_letters(&mut self, n: usize) -> Vec<DeadLetter> {
        if self.dead.is_none() {
            let ch = self.conn.create_channel().await.unwrap();
            let c = ch
                .basic_consume(
                    self.names.dead_letter().as_str().into(),
                    "test".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            self.dead = Some(c);
        }
        let consumer = self.dead.as_mut().unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let d = tokio::time::timeout(WAIT, consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out waiting for dead letter {} of {n}", out.len() + 1)
                })
                .expect("dead-letter consumer open")
                .expect("delivery");
            let mut headers = BTreeMap::new();
            if let Some(h) = d.properties.headers() {
                for k in h.inner().keys() {
                    if let Some(v) = broker::header(&d.properties, k.as_str()) {
                        headers.insert(k.as_str().to_string(), v);
                    }
                }
            }
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            out.push(DeadLetter {
                headers,
                body: d.data,
            });
        }
        out
    }

    pub async fn dead_letter_count(&self) -> u32 {
        broker::queue_len(&self.conn, &self.names.dead_letter())
            .await
            .unwrap()
    }
}

async fn subscribe_events(conn: &Connection, names: &Names) -> mpsc::UnboundedReceiver<Envelope> {
    let (ch, mut consumer) = broker::watch_events(conn, names).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _ch = ch;
        let decoder = Decoder::default();
        while let Some(Ok(d)) = consumer.next().await {
            if let Ok(env) = decoder.envelope(&d.data)
                && tx.send(env).is_err()
            {
                return;
            }
        }
    });
    rx
}

impl Drop for TestApp {
    /// Deletes the namespace even when the test panicked: on a thread of its own, since
    /// the test's runtime may be gone.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let (url, names, queues) = (self.url.clone(), self.names.clone(), self.queues.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = broker::connect(&url, "journeyman-test-cleanup").await {
                    broker::delete_namespace(&conn, &names, &queues).await;
                    let _ = conn.close(200, "bye".into()).await;
                }
            });
        })
        .join();
    }
}

/// Sends SIGTERM to `child` and waits up to `within` for it to exit: its status (`None`
/// if it did not exit in time) and how long it took.
pub async fn terminate(
    child: &mut tokio::process::Child,
    within: Duration,
) -> (Option<std::process::ExitStatus>, Duration) {
    let pid = child.id().expect("the child still runs") as libc::pid_t;
    let started = std::time::Instant::now();
    // SAFETY: kill(2) on our own child's pid; no memory is shared.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to {pid}");
    let status = tokio::time::timeout(within, child.wait())
        .await
        .ok()
        .map(|s| s.expect("wait for the child"));
    (status, started.elapsed())
}

/// Parses a playbook for a test.
pub fn playbook(yaml: &str) -> Playbook {
    Playbook::from_yaml(yaml).expect("test playbook is valid")
}

/// A private queue of the test (exclusive, gone with the connection) and an auto-ack
/// consumer on it: where a test standing in for the orchestrator gets agents' replies.
pub async fn private_reply_queue(ch: &lapin::Channel) -> (String, lapin::Consumer) {
    let q = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "replies".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    (q.name().to_string(), consumer)
}

/// The `x-journeyman-client-id` header a journey command carries.
pub fn client_header(client: &str) -> lapin::types::FieldTable {
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        ShortString::from(journeyman::wire::headers::CLIENT_ID),
        lapin::types::AMQPValue::LongString(client.into()),
    );
    lapin::types::FieldTable::from(t)
}
