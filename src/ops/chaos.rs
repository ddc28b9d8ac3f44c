//! `journeyman chaos`: many journeys while the orchestrator is SIGKILLed again and again
//! (and, when a hook is given, the broker restarted), agents fail a share of attempts and
//! duplicate a share of replies, and poison messages are mixed in. At the end it checks,
//! the way a Jepsen checker would: every journey is where it should be (none lost), no
//! command or reply took effect twice, and the dead letters are exactly the poison.
//!
//! The orchestrator runs as a child process (this binary), so a kill is a real one.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::agent::sim::SimAgent;
use crate::agent::{self, AgentConfig, AgentStats};
use crate::broker::{self, Names, Outgoing, Publisher};
use crate::domain::playbook::Playbook;
use crate::wire::headers;
use crate::wire::protocol::{AgentRef, ClientPayload, Command, Decoder, Envelope, MessageType};

/// Restarts the broker once mid-run (a test's own node; never a shared broker).
pub type BrokerRestart = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct ChaosConfig {
    pub amqp_url: String,
    /// The journeyman binary to run the orchestrator from.
    pub binary: PathBuf,
    pub journeys: usize,
    /// How many times the orchestrator is killed.
    pub kills: usize,
    pub failure_rate: f64,
    pub duplicate_rate: f64,
    /// Malformed and schema-invalid commands mixed in.
    pub poison: usize,
    pub timeout: Duration,
    pub broker_restart: Option<BrokerRestart>,
}

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub journeys: usize,
    pub in_production: usize,
    pub lost: usize,
    pub applied_twice: usize,
    pub dead_letters: usize,
    pub poison: usize,
    pub unexpected_dead_letters: Vec<String>,
    pub kills: usize,
    pub broker_restarts: usize,
    pub duplicate_events_absorbed: usize,
    pub elapsed_s: f64,
}

impl ChaosReport {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.applied_twice == 0
            && self.unexpected_dead_letters.is_empty()
            && self.dead_letters == self.poison
    }

    pub fn line(&self) -> String {
        format!(
            "chaos: journeys={} in_production={} lost={} applied_twice={} dead_letters={} (poison={}, unexpected={}) kills={} broker_restarts={} duplicate_events_absorbed={} elapsed={:.1}s => {}",
            self.journeys,
            self.in_production,
            self.lost,
            self.applied_twice,
            self.dead_letters,
            self.poison,
            self.unexpected_dead_letters.len(),
            self.kills,
            self.broker_restarts,
            self.duplicate_events_absorbed,
            self.elapsed_s,
            if self.ok() { "OK" } else { "FAILED" }
        )
    }
}

/// The chaos playbook: the default units of work without gates (evidence is not what is
/// tested here), with retries enough that injected failures never exhaust them.
fn playbook() -> Playbook {
    let mut p = Playbook::default_playbook();
    for stage in p.stages.values_mut() {
        stage.exit_criteria.clear();
        stage.rollback_triggers.clear();
        for t in stage
            .tasks
            .iter_mut()
            .chain(stage.rollback.tasks.iter_mut())
        {
            t.max_retries = 12;
            t.backoff.initial = Duration::from_millis(20);
            t.backoff.max = Duration::from_millis(500);
        }
    }
    p
}

fn client(i: usize) -> String {
    format!("chaos-{:04}", i + 1)
}

struct Child {
    child: tokio::process::Child,
}

async fn spawn_orchestrator(
    cfg: &ChaosConfig,
    names: &Names,
    dir: &std::path::Path,
    playbook: &std::path::Path,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("orchestrator.log"))?;
    let child = tokio::process::Command::new(&cfg.binary)
        .args([
            "--namespace",
            &names.namespace,
            "orchestrator",
            "--insecure-no-auth",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.join("store"))
        .arg("--playbook")
        .arg(playbook)
        .env("JOURNEYMAN_AMQP_URL", &cfg.amqp_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", cfg.binary.display()))?;
    Ok(Child { child })
}

/// Runs the chaos scenario and returns what the checker found.
pub async fn run(cfg: ChaosConfig) -> Result<ChaosReport> {
    let started = Instant::now();
    let names = Names::new(format!(
        "chaos-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let tmp = tempfile::Builder::new()
        .prefix("journeyman-chaos-")
        .tempdir()?;
    let playbook = playbook();
    let playbook_file = tmp.path().join("playbook.yaml");
    std::fs::write(&playbook_file, serde_norway::to_string(&playbook)?)?;

    let conn = broker::connect(&cfg.amqp_url, "journeyman-chaos").await?;
    let ch = conn.create_channel().await?;
    let intents = playbook.namespace_intents();
    let partitions = broker::resolve_partitions(&conn, &cfg.amqp_url, &names, None, 1).await?;
    let mut queues = broker::declare_topology(&ch, &names, intents, partitions).await?;
    // Every event, kept durably for the checker (it survives a broker restart).
    let events_q = format!("{}.chaos.events", names.namespace);
    broker::declare_queue(&ch, &names, &events_q, None).await?;
    ch.queue_bind(
        events_q.as_str().into(),
        names.events().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    queues.push(events_q.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let sim = Arc::new(SimAgent {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(10),
        failure_rate: cfg.failure_rate,
        duplicate_rate: cfg.duplicate_rate,
    });
    for i in 0..2 {
        let config = AgentConfig {
            amqp_url: cfg.amqp_url.clone(),
            names: names.clone(),
            agent_id: format!("chaos-agent-{i}"),
            intents: playbook.intents().into_iter().collect(),
            prefetch: 32,
            max_message_bytes: crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
            keyring: None,
            signing_key: None,
            shutdown_timeout: crate::agent::DEFAULT_SHUTDOWN_TIMEOUT,
        };
        let (sim, mut rx) = (sim.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _ = agent::run(config, sim, Arc::new(AgentStats::default()), async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
        });
    }

    let mut orch = spawn_orchestrator(&cfg, &names, tmp.path(), &playbook_file).await?;

    // Journeys, with poison spread among them.
    let publisher = Publisher::start(&conn).await?;
    let poison_every = cfg
        .journeys
        .checked_div(cfg.poison)
        .map_or(usize::MAX, |n| n.max(1));
    let mut poison_sent = 0;
    for i in 0..cfg.journeys {
        let env = Envelope::new(
            AgentRef::new("chaos", "chaos"),
            AgentRef::orchestrator(),
            MessageType::Request,
            "journey.start",
            json!({"client_id": client(i), "context": {"data_sources": ["drive"]}}),
            Utc::now(),
        );
        publisher
            .publish(Outgoing::command(
                &names,
                &env.intent,
                &client(i),
                env.message_id.to_string(),
                env.to_bytes(),
            ))
            .await?;
        if poison_sent < cfg.poison && i % poison_every == 0 {
            let body = if poison_sent % 2 == 0 {
                b"{\"message_id\": not json".to_vec()
            } else {
                let mut bad = env.clone();
                bad.message_id = uuid::Uuid::new_v4();
                bad.payload = json!({"client": "no client_id"});
                bad.to_bytes()
            };
            publisher
                .publish(Outgoing::command(
                    &names,
                    "journey.start",
                    "poison",
                    uuid::Uuid::new_v4().to_string(),
                    body,
                ))
                .await?;
            poison_sent += 1;
        }
    }

    // Kill the orchestrator at random moments while journeys run; restart the broker once.
    let mut kills = 0;
    let mut broker_restarts = 0;
    let deadline = Instant::now() + cfg.timeout;
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut conn = conn;
    while done.len() < cfg.journeys {
        if Instant::now() > deadline {
            bail!(
                "chaos: timed out with {}/{} journeys through production; orchestrator log in {}",
                done.len(),
                cfg.journeys,
                tmp.path().join("orchestrator.log").display()
            );
        }
        let pause = Duration::from_millis(300 + rand::random_range(0..900));
        tokio::time::sleep(pause).await;
        if kills < cfg.kills {
            orch.child.start_kill()?;
            let _ = orch.child.wait().await;
            kills += 1;
            if broker_restarts == 0
                && kills == cfg.kills.div_ceil(2)
                && let Some(restart) = &cfg.broker_restart
            {
                restart().await;
                broker_restarts += 1;
            }
            orch = spawn_orchestrator(&cfg, &names, tmp.path(), &playbook_file).await?;
            continue;
        }
        // Once the kills are over, ask the orchestrator where each journey is.
        for i in 0..cfg.journeys {
            let c = client(i);
            if done.contains(&c) {
                continue;
            }
            let cmd = Command::Status(ClientPayload {
                client_id: c.clone(),
            });
            match crate::ops::request::request(&conn, &names, &cmd, Duration::from_secs(5)).await {
                Ok(r) if r.payload["status"] == "live" => {
                    done.insert(c);
                }
                Ok(_) => {}
                Err(_) => {
                    // The broker may have restarted under us: reconnect and go on.
                    if let Ok(c2) = broker::connect(&cfg.amqp_url, "journeyman-chaos").await {
                        conn = c2;
                    }
                    break;
                }
            }
        }
    }

    // The checker: every event once per effect, dead letters exactly the poison.
    let _ = orch.child.start_kill();
    let _ = orch.child.wait().await;
    let _ = stop_tx.send(true);
    let decoder = Decoder::default();
    let mut effects: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    let mut event_copies = 0usize;
    let ch = conn.create_channel().await?;
    let total = broker::queue_len(&conn, &events_q).await? as usize;
    let mut events = ch
        .basic_consume(
            events_q.as_str().into(),
            "checker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0;
    while seen < total {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), events.next()).await
        else {
            break;
        };
        seen += 1;
        d.acker.ack(BasicAckOptions::default()).await?;
        let Ok(env) = decoder.envelope(&d.data) else {
            continue;
        };
        let p = &env.payload;
        let name = p["event"].as_str().unwrap_or_default().to_string();
        // Effects that must happen once per journey (per stage).
        let key = match name.as_str() {
            "journey.started" => "-".to_string(),
            "journey.promoted" | "work.completed" => {
                p["stage"].as_str().unwrap_or_default().to_string()
            }
            _ => continue,
        };
        let ids = effects
            .entry((
                p["client_id"].as_str().unwrap_or_default().to_string(),
                name,
                key,
            ))
            .or_default();
        if !ids.insert(env.message_id.to_string()) {
            event_copies += 1;
        }
    }
    let applied_twice = effects.values().filter(|ids| ids.len() > 1).count();

    let dl_total = broker::queue_len(&conn, &names.dead_letter()).await? as usize;
    let mut unexpected = Vec::new();
    let mut dls = ch
        .basic_consume(
            names.dead_letter().as_str().into(),
            "checker-dl".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for _ in 0..dl_total {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), dls.next()).await
        else {
            break;
        };
        let reason = broker::header(&d.properties, headers::REASON).unwrap_or_default();
        if !matches!(reason.as_str(), "malformed_json" | "schema_invalid") {
            unexpected.push(reason);
        }
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    broker::delete_namespace(&conn, &names, &queues).await;

    Ok(ChaosReport {
        journeys: cfg.journeys,
        in_production: done.len(),
        lost: cfg.journeys - done.len(),
        applied_twice,
        dead_letters: dl_total,
        poison: poison_sent,
        unexpected_dead_letters: unexpected,
        kills,
        broker_restarts,
        duplicate_events_absorbed: event_copies,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}
