//! `journeyman demo`: the orchestrator and simulated agents in one process against a real
//! broker, N journeys started at once, live progress per stage, and a summary.
//!
//! It runs in a namespace and data directory of its own (unless told otherwise) and
//! removes its queues afterwards, so it can run beside anything on a shared broker.

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
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
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
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Store directory; a temporary one when absent.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the demo's queues and exchanges afterwards.
    #[arg(long)]
    pub keep: bool,
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
    Outgoing::command(names, intent, env.message_id.to_string(), env.to_bytes())
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
    eprintln!(
        "journeyman demo: {} journeys, namespace '{}', broker {}, store {}",
        a.journeys,
        names.namespace,
        broker::redact(&g.amqp_url),
        data_dir.display()
    );

    let conn = broker::connect(&g.amqp_url, "journeyman-demo").await?;
    let ch = conn.create_channel().await?;
    let intents = playbook.namespace_intents();
    let mut queues = broker::declare_topology(&ch, &names, intents).await?;
    queues.push(names.replies("0"));

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
            amqp_url: g.amqp_url.clone(),
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
    let stats = Arc::new(Stats::default());
    let mut config = orchestrator::Config::new(&g.amqp_url, &names.namespace, data_dir.clone());
    config.names = names.clone();
    config.max_group = a.max_group;
    let mut others: Vec<&Key> = agent_keys.iter().collect();
    others.push(&upstream_key);
    let ring = Arc::new(Keyring::own_and_public(&orch_key, &others)?);
    config.auth = Some((
        Guard::new(ring, Policy::default()),
        Signer::new(orch_key.clone(), orch_id)?,
    ));
    let (st, rx) = (stats.clone(), stop_rx.clone());
    let orch = tokio::spawn(async move {
        orchestrator::run(config, st, stopped(rx))
            .await
            .map_err(anyhow::Error::from)
    });

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
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>11} [{bar:40.cyan/blue}] {pos:>3}/{len:3} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let n = a.journeys as u64;
    let bars: Vec<ProgressBar> = ["sandbox", "pilot", "production"]
        .iter()
        .map(|s| {
            let b = multi.add(ProgressBar::new(n));
            b.set_style(style.clone());
            b.set_prefix(s.to_string());
            if !tty {
                b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            b
        })
        .collect();
    let decoder = Decoder::default();
    let mut track: HashMap<String, Track> = HashMap::new();
    let mut counts = Counts::default();
    let mut last_line = Instant::now();
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
                "journey.rollback_completed" => counts.rollbacks_completed += 1,
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
        let reached = |s: &str| {
            track
                .values()
                .filter(|t| match s {
                    "sandbox" => !t.stage.is_empty(),
                    "pilot" => t.stage == "pilot" || t.stage == "production",
                    _ => t.stage == "production",
                })
                .count() as u64
        };
        let retries = Stats::get(&stats.retries);
        for (b, s) in bars.iter().zip(["sandbox", "pilot", "production"]) {
            b.set_position(reached(s));
        }
        let rollout = track.values().filter(|t| t.production_done).count();
        bars[2].set_message(format!("rollout done: {rollout}"));
        bars[0].set_message(format!(
            "tasks: {} dispatched, {} retries",
            Stats::get(&stats.tasks_dispatched),
            retries
        ));
        if !tty && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            eprintln!(
                "[{:>5.1}s] entered sandbox {:>3}/{n}  pilot {:>3}/{n}  production {:>3}/{n}  rollout done {:>3}/{n}  tasks {} (retries {})",
                started.elapsed().as_secs_f64(),
                reached("sandbox"),
                reached("pilot"),
                reached("production"),
                rollout,
                Stats::get(&stats.tasks_dispatched),
                retries
            );
        }
    }
    for b in &bars {
        b.finish();
    }
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
    // Give the outbox a moment to publish its last dead letters before counting them.
    let dead_letters = broker::queue_len(&conn, &names.dead_letter())
        .await
        .unwrap_or(0);
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
        "tasks_dispatched": Stats::get(&stats.tasks_dispatched),
        "tasks_completed": Stats::get(&stats.tasks_completed),
        "retries": Stats::get(&stats.retries),
        "agent_failures_injected": agent_stats.failed.load(Ordering::Relaxed),
        "promotions": Stats::get(&stats.promotions),
        "gate_evaluations_passed": Stats::get(&stats.gate_passed),
        "gate_refusals": counts.gate_refusals,
        "rollbacks_started": counts.rollbacks_started,
        "rollbacks_automatic": Stats::get(&stats.rollbacks_automatic),
        "rollbacks_completed": counts.rollbacks_completed,
        "rollbacks_failed_then_retried": counts.rollbacks_failed,
        "rollback_success_rate": rollback_rate,
        "pauses_resumed": counts.pauses,
        "dead_letters": dead_letters,
        "duplicates_absorbed": Stats::get(&stats.duplicates),
        "store_flushes": Stats::get(&stats.flushes),
        "inputs": Stats::get(&stats.inputs),
        "elapsed_s": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "tasks_per_s": (Stats::get(&stats.tasks_completed) as f64 / elapsed.as_secs_f64()).round(),
        "timed_out": timed_out,
    });

    let _ = stop_tx.send(true);
    let orch_result = orch.await.context("orchestrator task")?;
    for w in workers {
        let _ = w.await;
    }
    if own_namespace && !a.keep {
        broker::delete_namespace(&conn, &names, &queues).await;
    }
    orch_result?;

    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!("== journeyman demo summary ==");
        println!("journeys:            {}", a.journeys);
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
        println!("dead letters:        {}", summary["dead_letters"]);
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
