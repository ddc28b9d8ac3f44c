//! `journeyman demo`: the orchestrator and simulated agents in one process against a real
//! broker, N journeys started at once, live progress per stage, and a summary.
//!
//! It runs in a namespace and data directory of its own (unless told otherwise) and
//! removes its queues afterwards, so it can run beside anything on a shared broker.
//!
//! Progress goes to stderr: on a terminal, a block of lines redrawn in place (journeys in
//! each stage and those past it, then the task totals), drawn a last time when the run
//! ends; elsewhere (a CI log, a file) a plain line every few seconds and a final one, with
//! no cursor codes. The summary goes to stdout and names the journeys that paused or were
//! dead-lettered, why, and how to look at them.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::Args;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;

use crate::agent::sim::SimAgent;
use crate::agent::{self, AgentConfig, AgentStats};
use crate::broker::{self, Names, Outgoing, Published, Publisher};
use crate::ops::settings::Global;
use crate::orchestrator::{self, Stats};
use crate::wire::auth::{Guard, Key, Keyring, Policy, Signer};
use crate::wire::protocol::{AgentRef, Decoder, Envelope, MessageType};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many client journeys to run.
    #[arg(long, default_value_t = 50)]
    pub journeys: usize,
    /// Fraction of task attempts the simulated agents fail (retryably), so retries show.
    #[arg(long, default_value_t = 0.1)]
    pub failure_rate: f64,
    /// Share of journeys whose first sandbox evidence fails the gate (then is corrected).
    #[arg(long, default_value_t = 0.1)]
    pub gate_refusals: f64,
    /// Share of journeys whose pilot users report low satisfaction, rolling them back.
    #[arg(long, default_value_t = 0.1)]
    pub rollbacks: f64,
    /// Shortest simulated task latency, in milliseconds (0 and 0 to measure throughput).
    #[arg(long, default_value_t = 5)]
    pub min_latency_ms: u64,
    /// Longest simulated task latency, in milliseconds.
    #[arg(long, default_value_t = 30)]
    pub max_latency_ms: u64,
    /// Inputs per store flush in the orchestrator (1 = an fsync per message), to measure
    /// what group commit buys.
    #[arg(long, default_value_t = 512, hide = true)]
    pub max_group: usize,
    /// Replicas of the simulated agents (competing consumers).
    #[arg(long, default_value_t = 2)]
    pub agent_replicas: usize,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_parser = crate::ops::settings::duration)]
    pub timeout: Duration,
    /// Store directory; a temporary one when absent.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the demo's namespace (queues, exchanges, dead letters) and its store
    /// afterwards, to look at what happened with `dlq list` or an orchestrator on the store.
    #[arg(long)]
    pub keep: bool,
    /// Orchestrator replicas, each owning a share of the partitions in its own store
    /// (needs the broker's consistent-hash exchange; without it the demo runs on a
    /// private RabbitMQ node of its own when RabbitMQ is installed here).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub orchestrators: u16,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default, Clone)]
struct Track {
    stage: String,
    production_done: bool,
    /// The refused cohort has reported its corrected precision.
    fixed: bool,
    /// The rollback cohort has reported its unhappy pilot users.
    complained: bool,
}

#[derive(Default)]
struct Counts {
    gate_refusals: u64,
    rollbacks_started: u64,
    rollbacks_completed: u64,
    rollbacks_failed: u64,
    pauses: u64,
    /// Every pause, in order: (client, stage, failed task, why).
    paused: Vec<(String, String, String, String)>,
}

/// The stages the progress display follows, in journey order.
const STAGES: [&str; 3] = ["sandbox", "pilot", "production"];

/// What the progress display shows at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    elapsed: Duration,
    journeys: usize,
    /// Journeys in sandbox, pilot and production now (production: rollout not done yet).
    in_stage: [usize; 3],
    /// Journeys past each stage now: in a later stage, or (production) rolled out.
    passed: [usize; 3],
    rolling_back: usize,
    tasks: u64,
    retries: u64,
    rollbacks: u64,
    pauses: u64,
}

impl Snapshot {
    fn of(track: &HashMap<String, Track>, journeys: usize) -> Self {
        let mut s = Snapshot {
            journeys,
            ..Default::default()
        };
        for t in track.values() {
            let rank = match t.stage.as_str() {
                "sandbox" => Some(0),
                "pilot" => Some(1),
                "production" => Some(2),
                _ => None,
            };
            if t.stage == "rollback" {
                s.rolling_back += 1;
            }
            match rank {
                // Rolled out: past every stage.
                Some(2) if t.production_done => s.passed.iter_mut().for_each(|p| *p += 1),
                Some(r) => {
                    s.in_stage[r] += 1;
                    for p in s.passed.iter_mut().take(r) {
                        *p += 1;
                    }
                }
                None => {}
            }
        }
        s
    }

    /// The lines drawn on a terminal: a bar per stage (`=` past it, `-` in it), then the
    /// totals on a line of their own.
    fn frame(&self) -> Vec<String> {
        const WIDTH: usize = 30;
        let n = self.journeys.max(1);
        let mut lines = Vec::new();
        for (i, stage) in STAGES.iter().enumerate() {
            let passed = self.passed[i] * WIDTH / n;
            let inside = (self.in_stage[i] * WIDTH / n).min(WIDTH - passed);
            let past = if i == 2 { "rolled out" } else { "passed" };
            lines.push(format!(
                "{stage:>10} [{}{}{}] in it {:>4}   {past:>10} {:>4}/{}",
                "=".repeat(passed),
                "-".repeat(inside),
                " ".repeat(WIDTH - passed - inside),
                self.in_stage[i],
                self.passed[i],
                self.journeys
            ));
        }
        lines.push(format!("{:>10}  {}", "", self.totals()));
        lines
    }

    fn totals(&self) -> String {
        let mut t = format!(
            "tasks {} dispatched, {} retries · {} rollbacks",
            self.tasks, self.retries, self.rollbacks
        );
        if self.rolling_back > 0 {
            let _ = std::fmt::Write::write_fmt(
                &mut t,
                format_args!(" ({} rolling back now)", self.rolling_back),
            );
        }
        let _ = std::fmt::Write::write_fmt(
            &mut t,
            format_args!(
                " · {} paused · {:.1}s",
                self.pauses,
                self.elapsed.as_secs_f64()
            ),
        );
        t
    }

    /// One plain line, for logs.
    fn line(&self) -> String {
        let stages: Vec<String> = STAGES
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let past = if i == 2 { "rolled out" } else { "passed" };
                format!(
                    "{stage} {} in, {}/{} {past}",
                    self.in_stage[i], self.passed[i], self.journeys
                )
            })
            .collect();
        format!("{} | {}", stages.join(" | "), self.totals())
    }
}

/// The demo's orchestrator replicas' counters, summed for the totals.
struct Replicas(Vec<(String, Arc<Stats>)>);

impl Replicas {
    fn get(&self, f: impl Fn(&Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.0.iter().map(|(_, s)| Stats::get(f(s))).sum()
    }
}

fn snapshot(
    track: &HashMap<String, Track>,
    stats: &Replicas,
    counts: &Counts,
    started: Instant,
    journeys: usize,
) -> Snapshot {
    Snapshot {
        elapsed: started.elapsed(),
        tasks: stats.get(|s| &s.tasks_dispatched),
        retries: stats.get(|s| &s.retries),
        rollbacks: counts.rollbacks_started,
        pauses: counts.pauses,
        ..Snapshot::of(track, journeys)
    }
}

/// Draws snapshots on stderr: redrawn in place on a terminal, plain lines otherwise.
struct Display {
    tty: bool,
    /// Lines of the last frame drawn on the terminal, to move back over.
    drawn: usize,
    last: Option<Instant>,
}

impl Display {
    /// How often a log gets a line; a terminal is redrawn up to ten times a second.
    const LOG_EVERY: Duration = Duration::from_secs(2);
    const TTY_EVERY: Duration = Duration::from_millis(100);

    fn new(tty: bool) -> Self {
        Self {
            tty,
            drawn: 0,
            last: None,
        }
    }

    fn due(&self) -> bool {
        let every = if self.tty {
            Self::TTY_EVERY
        } else {
            Self::LOG_EVERY
        };
        self.last.is_none_or(|t| t.elapsed() >= every)
    }

    fn show(&mut self, s: &Snapshot) {
        if self.due() {
            self.draw(s, false);
        }
    }

    /// The last frame: drawn once, whatever was drawn before.
    fn finish(&mut self, s: &Snapshot) {
        self.draw(s, true);
    }

    fn draw(&mut self, s: &Snapshot, last: bool) {
        use std::io::Write as _;
        self.last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let mut out = String::new();
            if self.drawn > 0 {
                // Up over the previous frame; each line is cleared as it is redrawn.
                out.push_str(&format!("\x1b[{}A", self.drawn));
            }
            let lines = s.frame();
            for l in &lines {
                out.push_str("\r\x1b[2K");
                out.push_str(l);
                out.push('\n');
            }
            self.drawn = lines.len();
            let _ = err.write_all(out.as_bytes());
        } else {
            let _ = writeln!(
                err,
                "[{:>6.1}s] {}{}",
                s.elapsed.as_secs_f64(),
                if last { "done: " } else { "" },
                s.line()
            );
        }
        let _ = err.flush();
    }
}

/// Which journeys play which part: a share fails the sandbox gate first, another is
/// rolled back automatically from pilot.
struct Cohorts {
    refused: std::collections::HashSet<String>,
    rolled_back: std::collections::HashSet<String>,
}

impl Cohorts {
    fn new(n: usize, refusals: f64, rollbacks: f64) -> Self {
        let pick = |share: f64, offset: usize| {
            let k = ((n as f64) * share.clamp(0.0, 1.0)).round() as usize;
            (0..n)
                .filter(|i| (i + offset) % n.max(1) < k)
                .map(client_name)
                .collect()
        };
        Self {
            refused: pick(refusals, 0),
            rolled_back: pick(rollbacks, n / 2),
        }
    }
    fn refused(&self, c: &str) -> bool {
        self.refused.contains(c)
    }
    fn rolled_back(&self, c: &str) -> bool {
        self.rolled_back.contains(c)
    }
}

fn client_name(i: usize) -> String {
    format!("client-{:03}", i + 1)
}

/// A journey command from the demo's upstream agent.
fn command(names: &Names, signer: &Signer, intent: &str, payload: serde_json::Value) -> Outgoing {
    let env = Envelope::new(
        AgentRef::new("journeyman-demo", "demo"),
        AgentRef::orchestrator(),
        MessageType::Request,
        intent,
        payload,
        Utc::now(),
    );
    let env = signer.sign(env, Utc::now());
    let client = env.payload["client_id"].as_str().unwrap_or_default();
    Outgoing::command(
        names,
        intent,
        client,
        env.message_id.to_string(),
        env.to_bytes(),
    )
}

pub async fn run(g: &Global, a: DemoArgs) -> Result<()> {
    let own_namespace = g.namespace.is_none();
    let names = match &g.namespace {
        Some(ns) => Names::new(ns.clone()),
        None => Names::new(format!(
            "demo-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    }
    .with_queue_type(g.queue_type);
    let tmp = tempfile::Builder::new()
        .prefix("journeyman-demo-")
        .tempdir()?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let playbook = crate::domain::playbook::Playbook::default_playbook();
    // Several orchestrators need the consistent-hash exchange.
    let (amqp_url, _private) = if a.orchestrators > 1 {
        crate::ops::node::with_consistent_hash(&g.amqp_url, "demo").await?
    } else {
        (g.amqp_url.clone(), None)
    };
    let url = amqp_url.as_str();
    eprintln!(
        "journeyman demo: {} journeys, {} orchestrator(s), namespace '{}', broker {}, store {}",
        a.journeys,
        a.orchestrators,
        names.namespace,
        broker::redact(url),
        data_dir.display()
    );

    let conn = broker::connect(url, "journeyman-demo").await?;
    let ch = conn.create_channel().await?;
    let intents = playbook.namespace_intents();
    let partitions = broker::resolve_partitions(&conn, url, &names, None, 1).await?;
    let queues = broker::declare_topology(&ch, &names, intents, partitions).await?;

    // Watch every journey event on a private queue.
    let (_watch, mut events) = broker::watch_events(&conn, &names).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Authentication on, as in production: each sender its own key pair, generated for
    // this run; the registry grants the demo's own key (the operator) its role.
    let orch_id = AgentRef::orchestrator().agent_id;
    let orch_key = Key::generate("demo-orchestrator", orch_id.clone())?;
    let upstream_key = Key::generate("demo-upstream", "journeyman-demo")?
        .with_roles(vec![crate::wire::auth::OPERATOR.into()]);
    let upstream = Signer::new(upstream_key.clone(), "journeyman-demo")?;
    let agent_keys = (0..a.agent_replicas.max(1))
        .map(|i| Key::generate(format!("demo-agent-{i}"), format!("sim-agent-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let agent_stats = Arc::new(AgentStats::default());
    let sim = Arc::new(SimAgent {
        failure_rate: a.failure_rate.clamp(0.0, 1.0),
        min_latency: Duration::from_millis(a.min_latency_ms),
        max_latency: Duration::from_millis(a.max_latency_ms.max(a.min_latency_ms)),
        duplicate_rate: 0.0,
    });
    let mut workers = Vec::new();
    for (i, agent_key) in agent_keys.iter().enumerate() {
        let config = AgentConfig {
            amqp_url: url.to_string(),
            names: names.clone(),
            agent_id: format!("sim-agent-{i}"),
            intents: playbook.intents().into_iter().collect(),
            prefetch: 32,
            max_message_bytes: crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
            keyring: Some(Arc::new(Keyring::own_and_public(agent_key, &[&orch_key])?)),
            signing_key: Some(agent_key.clone()),
            shutdown_timeout: crate::agent::DEFAULT_SHUTDOWN_TIMEOUT,
        };
        let (sim, st, rx) = (sim.clone(), agent_stats.clone(), stop_rx.clone());
        workers.push(tokio::spawn(async move {
            agent::run(config, sim, st, stopped(rx))
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let mut others: Vec<&Key> = agent_keys.iter().collect();
    others.push(&upstream_key);
    let ring = Arc::new(Keyring::own_and_public(&orch_key, &others)?);
    let mut replicas = Vec::new();
    let mut orchs = Vec::new();
    for i in 0..a.orchestrators {
        let dir = if a.orchestrators == 1 {
            data_dir.clone()
        } else {
            data_dir.join(format!("replica-{i}"))
        };
        let mut config = orchestrator::Config::new(url, &names.namespace, dir);
        config.names = names.clone();
        config.max_group = a.max_group;
        config.replica = crate::domain::partition::Replica::new(i, a.orchestrators)?;
        config.orchestrator_id = i.to_string();
        config.partitions = Some(partitions);
        config.auth = Some((
            Guard::new(ring.clone(), Policy::default()),
            Signer::new(orch_key.clone(), orch_id.clone())?,
        ));
        let stats = Arc::new(Stats::default());
        replicas.push((config.orchestrator_id.clone(), stats.clone()));
        let rx = stop_rx.clone();
        orchs.push(tokio::spawn(async move {
            orchestrator::run(config, stats, stopped(rx))
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let stats = Replicas(replicas);

    // Start the journeys.
    let started = Instant::now();
    let publisher = Publisher::start(&conn).await?;
    let cohorts = Cohorts::new(a.journeys, a.gate_refusals, a.rollbacks);
    let mut pending = Vec::new();
    for i in 0..a.journeys {
        let payload = json!({"client_id": client_name(i), "context": {
            "data_sources": ["drive", "confluence", "jira"],
            "connectors": ["gdrive", "confluence", "jira"],
        }});
        pending.push(
            publisher
                .enqueue(command(&names, &upstream, "journey.start", payload))
                .await?,
        );
    }
    for p in pending {
        match p
            .await
            .map_err(|_| anyhow::anyhow!("the publisher stopped"))??
        {
            Published::Confirmed => {}
            Published::Unroutable => {
                bail!("a journey.start command was not routed; the topology is missing")
            }
        }
    }

    // Watch progress.
    let mut display = Display::new(std::io::stderr().is_terminal());
    let decoder = Decoder::default();
    let mut track: HashMap<String, Track> = HashMap::new();
    let mut counts = Counts::default();
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut timed_out = false;
    loop {
        let done = track.values().filter(|t| t.production_done).count();
        if done >= a.journeys {
            break;
        }
        let next = tokio::select! {
            d = events.next() => match d {
                Some(d) => Some(d),
                None => bail!("the event consumer ended; is the broker still up?"),
            },
            _ = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
            // Redraw at least once a second even when nothing happens.
            _ = tokio::time::sleep(Duration::from_secs(1)) => None,
        };
        if let Some(Ok(d)) = next
            && let Ok(env) = decoder.envelope(&d.data)
        {
            let p = &env.payload;
            let client = p["client_id"].as_str().unwrap_or_default().to_string();
            let event = p["event"].as_str().unwrap_or_default().to_string();
            let t = track.entry(client.clone()).or_default();
            t.stage = p["stage"].as_str().unwrap_or_default().to_string();
            let mut reply: Option<(&str, serde_json::Value)> = None;
            match event.as_str() {
                "journey.started" => {
                    // Upstream agents report what the sandbox gate needs; one cohort
                    // reports a precision below the gate's 80 %.
                    let precision = if cohorts.refused(&client) { 0.78 } else { 0.9 };
                    reply = Some((
                        "journey.evidence",
                        json!({"client_id": client,
                        "metrics": {"search.precision": precision}, "flags": {"demo.approved": true}}),
                    ));
                }
                "gate.failed" => {
                    counts.gate_refusals += 1;
                    if t.stage == "sandbox" && cohorts.refused(&client) && !t.fixed {
                        t.fixed = true;
                        reply = Some((
                            "journey.evidence",
                            json!({"client_id": client,
                            "metrics": {"search.precision": 0.88}}),
                        ));
                    }
                }
                "journey.promoted"
                    if t.stage == "pilot" && cohorts.rolled_back(&client) && !t.complained =>
                {
                    // Pilot users are unhappy: satisfaction below 3.5 triggers a rollback.
                    t.complained = true;
                    reply = Some((
                        "journey.evidence",
                        json!({"client_id": client,
                        "metrics": {"user.satisfaction": 3.2}}),
                    ));
                }
                "journey.rollback_started" => counts.rollbacks_started += 1,
                "journey.rollback_completed" => {
                    counts.rollbacks_completed += 1;
                    // Back in sandbox: its gate judges evidence observed since the
                    // landing, so upstream reports what the sandbox gate needs again.
                    if t.stage == "sandbox" {
                        reply = Some((
                            "journey.evidence",
                            json!({"client_id": client,
                            "metrics": {"search.precision": 0.9}, "flags": {"demo.approved": true}}),
                        ));
                    }
                }
                "rollback.failed" => {
                    counts.rollbacks_failed += 1;
                    reply = Some((
                        "journey.rollback",
                        json!({"client_id": client,
                        "reason": "on-call retry of a failed rollback"}),
                    ));
                }
                "journey.paused" => {
                    counts.pauses += 1;
                    counts.paused.push((
                        client.clone(),
                        t.stage.clone(),
                        p["detail"]["task_id"].as_str().unwrap_or("-").to_string(),
                        p["detail"]["failure"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| p["detail"]["failure"].to_string()),
                    ));
                    reply = Some(("journey.resume", json!({"client_id": client})));
                }
                "work.completed" if t.stage == "production" => t.production_done = true,
                _ => {}
            }
            if let Some((intent, payload)) = reply {
                // Pipelined: the confirm is awaited off the event loop.
                let rx = publisher
                    .enqueue(command(&names, &upstream, intent, payload))
                    .await?;
                tokio::spawn(async move {
                    if !matches!(rx.await, Ok(Ok(Published::Confirmed))) {
                        tracing::warn!("a demo command was not confirmed");
                    }
                });
            }
        }
        display.show(&snapshot(&track, &stats, &counts, started, a.journeys));
    }
    display.finish(&snapshot(&track, &stats, &counts, started, a.journeys));
    let elapsed = started.elapsed();

    let mut per_stage: std::collections::BTreeMap<String, usize> = Default::default();
    for t in track.values() {
        let key = if t.production_done {
            "production (rollout complete)".to_string()
        } else {
            t.stage.clone()
        };
        *per_stage.entry(key).or_default() += 1;
    }
    // Read (without consuming) what was dead-lettered, to name the clients and reasons.
    let dead: Vec<crate::ops::dlq::DeadLetter> = crate::ops::dlq::Dlq::new(&conn, names.clone())
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| {
            eprintln!("journeyman demo: cannot read the dead-letter queue: {e}");
            Vec::new()
        });
    let dead_letters = dead.len();
    let in_production = track.values().filter(|t| t.production_done).count();
    // First-attempt success: rollbacks whose unit of work did not fail after its retries.
    let rollback_rate = if counts.rollbacks_started == 0 {
        serde_json::Value::Null
    } else {
        json!(
            (counts.rollbacks_started - counts.rollbacks_failed.min(counts.rollbacks_started))
                as f64
                / counts.rollbacks_started as f64
        )
    };
    let summary = json!({
        "journeys": a.journeys,
        "in_production": in_production,
        "per_stage": per_stage,
        "tasks_dispatched": stats.get(|s| &s.tasks_dispatched),
        "tasks_completed": stats.get(|s| &s.tasks_completed),
        "retries": stats.get(|s| &s.retries),
        "agent_failures_injected": agent_stats.failed.load(Ordering::Relaxed),
        "promotions": stats.get(|s| &s.promotions),
        "gate_evaluations_passed": stats.get(|s| &s.gate_passed),
        "gate_refusals": counts.gate_refusals,
        "rollbacks_started": counts.rollbacks_started,
        "rollbacks_automatic": stats.get(|s| &s.rollbacks_automatic),
        "rollbacks_completed": counts.rollbacks_completed,
        "rollbacks_failed_then_retried": counts.rollbacks_failed,
        "rollback_success_rate": rollback_rate,
        "pauses_resumed": counts.pauses,
        "paused": counts.paused.iter().map(|(c, stage, task, why)| json!({
            "client_id": c, "stage": stage, "task_id": task, "why": why,
        })).collect::<Vec<_>>(),
        "dead_letters": dead_letters,
        "dead_lettered": dead.iter().map(|d| json!({
            "client_id": d.client_id, "reason": d.reason, "why": d.reason_message,
            "intent": d.intent(), "task_id": d.task_id, "id": d.id,
        })).collect::<Vec<_>>(),
        "duplicates_absorbed": stats.get(|s| &s.duplicates),
        "store_flushes": stats.get(|s| &s.flushes),
        "inputs": stats.get(|s| &s.inputs),
        "elapsed_s": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "tasks_per_s": (stats.get(|s| &s.tasks_completed) as f64 / elapsed.as_secs_f64()).round(),
        "timed_out": timed_out,
        "orchestrators": stats.0.iter().map(|(id, s)| json!({
            "id": id,
            "journeys": Stats::get(&s.journeys_started),
            "partitions": s.partitions.get().cloned().unwrap_or_default(),
        })).collect::<Vec<_>>(),
    });

    let _ = stop_tx.send(true);
    let mut orch_result = Ok(());
    for o in orchs {
        let r = o.await.context("orchestrator task")?;
        if orch_result.is_ok() {
            orch_result = r;
        }
    }
    for w in workers {
        let _ = w.await;
    }
    if own_namespace && !a.keep {
        broker::delete_namespace(&conn, &names, &queues).await;
    }
    // --keep keeps the store too, also when it is the run's temporary directory.
    let kept_store = (a.keep && a.data_dir.is_none()).then(|| tmp.keep());
    orch_result?;

    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!("== journeyman demo summary ==");
        println!("journeys:            {}", a.journeys);
        for (id, s) in &stats.0 {
            let parts = s.partitions.get().cloned().unwrap_or_default();
            println!(
                "orchestrator {id}: {} journeys (partitions {})",
                Stats::get(&s.journeys_started),
                crate::domain::partition::list(&parts)
            );
        }
        for (stage, count) in &per_stage {
            println!("  {stage:<30} {count}");
        }
        println!(
            "tasks dispatched:    {} ({} completed, {} retries after {} injected failures)",
            summary["tasks_dispatched"],
            summary["tasks_completed"],
            summary["retries"],
            summary["agent_failures_injected"]
        );
        println!(
            "promotions:          {} (gate passed {} times, refused {} times)",
            summary["promotions"], summary["gate_evaluations_passed"], summary["gate_refusals"]
        );
        println!(
            "rollbacks:           {} started ({} automatic), {} completed, {} failed and retried",
            summary["rollbacks_started"],
            summary["rollbacks_automatic"],
            summary["rollbacks_completed"],
            summary["rollbacks_failed_then_retried"]
        );
        if counts.rollbacks_started > 0 {
            println!(
                "rollback success:    {:.2}% on the first attempt (DES-002 §8.2 target: > 99%)",
                rollback_rate.as_f64().unwrap_or(0.0) * 100.0
            );
        }
        println!("pauses (resumed):    {}", summary["pauses_resumed"]);
        print_list(
            // `why` names the task already ("task deploy-pilot failed: ...").
            counts
                .paused
                .iter()
                .map(|(c, stage, _, why)| format!("{c:<12} paused in {stage}: {why}")),
        );
        println!("dead letters:        {}", summary["dead_letters"]);
        print_list(dead.iter().map(|d| {
            format!(
                "{:<12} {}: {}",
                d.client_id.as_deref().unwrap_or("-"),
                d.reason,
                d.reason_message
            )
        }));
        if !counts.paused.is_empty() || !dead.is_empty() {
            let ns = &names.namespace;
            let store = kept_store.as_deref().unwrap_or(&data_dir).display();
            let example = counts
                .paused
                .first()
                .map(|p| p.0.clone())
                .or_else(|| dead.iter().find_map(|d| d.client_id.clone()))
                .unwrap_or_else(|| "client-001".into());
            if a.keep {
                println!(
                    "look at them:        the namespace '{ns}' and the store {store} were kept (--keep):"
                );
            } else {
                println!(
                    "look at them:        run again with --keep, which keeps the namespace and the store; then:"
                );
            }
            println!("  journeyman --namespace {ns} dlq list");
            println!(
                "  journeyman --namespace {ns} orchestrator --insecure-no-auth --data-dir {store} &"
            );
            println!(
                "  journeyman journey history {example}   # or the dashboard: http://127.0.0.1:8080/?client={example}"
            );
        }
        println!("duplicates absorbed: {}", summary["duplicates_absorbed"]);
        println!(
            "store flushes:       {} for {} inputs (group commit)",
            summary["store_flushes"], summary["inputs"]
        );
        println!(
            "elapsed:             {:.2}s ({} tasks/s)",
            elapsed.as_secs_f64(),
            summary["tasks_per_s"]
        );
    }
    if a.keep && !a.json {
        eprintln!(
            "kept: namespace '{}' (delete its queues in RabbitMQ's UI or with rabbitmqctl) and the store {}",
            names.namespace,
            kept_store.as_deref().unwrap_or(&data_dir).display()
        );
    }
    if timed_out {
        bail!(
            "the demo timed out after {:?} with {in_production}/{} journeys through production; see the log above",
            a.timeout,
            a.journeys
        );
    }
    if in_production < a.journeys {
        bail!(
            "{} journeys did not reach production; see the summary",
            a.journeys - in_production
        );
    }
    Ok(())
}

/// Up to ten lines, indented under a summary line, and how many more there are.
fn print_list(lines: impl Iterator<Item = String>) {
    let lines: Vec<String> = lines.collect();
    for l in lines.iter().take(10) {
        println!("  {l}");
    }
    if lines.len() > 10 {
        println!(
            "  ... and {} more (--json lists them all)",
            lines.len() - 10
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(stage: &str, done: bool) -> Track {
        Track {
            stage: stage.into(),
            production_done: done,
            ..Default::default()
        }
    }

    #[test]
    fn progress_counts_journeys_in_each_stage_and_past_it() {
        let mut t = HashMap::new();
        t.insert("a".to_string(), track("sandbox", false));
        t.insert("b".to_string(), track("pilot", false));
        t.insert("c".to_string(), track("production", false));
        t.insert("d".to_string(), track("production", true));
        t.insert("e".to_string(), track("rollback", false));
        let s = Snapshot {
            tasks: 40,
            retries: 3,
            ..Snapshot::of(&t, 6)
        };
        assert_eq!(s.in_stage, [1, 1, 1]);
        assert_eq!(s.passed, [3, 2, 1]);
        assert_eq!(s.rolling_back, 1);
        let frame = s.frame();
        assert_eq!(frame.len(), 4, "three stages and the totals: {frame:#?}");
        assert_eq!(
            frame[0],
            "   sandbox [===============-----          ] in it    1       passed    3/6"
        );
        assert!(frame[2].contains("rolled out    1/6"), "{}", frame[2]);
        assert!(
            frame[3].contains("tasks 40 dispatched, 3 retries") && !frame[0].contains("tasks"),
            "totals on a line of their own"
        );
        let line = s.line();
        assert!(
            line.starts_with("sandbox 1 in, 3/6 passed | pilot 1 in, 2/6 passed | production 1 in, 1/6 rolled out | tasks 40"),
            "{line}"
        );
        assert!(!line.contains('\x1b'), "no escape codes in a log line");
    }
}
