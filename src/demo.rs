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
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use serde_json::json;
use tokio::sync::watch;

use crate::agent::{self, AgentConfig, AgentStats};
use crate::broker::{self, Names};
use crate::cli::Global;
use crate::orchestrator::{self, Stats};
use crate::protocol::{AgentRef, Decoder, Envelope, JOURNEY_INTENTS, MessageType};
use crate::sim::SimAgent;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many client journeys to run.
    #[arg(long, default_value_t = 50)]
    pub journeys: usize,
    /// Fraction of task attempts the simulated agents fail (retryably), so retries show.
    #[arg(long, default_value_t = 0.1)]
    pub failure_rate: f64,
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
    failed: bool,
}

pub async fn run(g: &Global, a: DemoArgs) -> Result<()> {
    let own_namespace = g.namespace.is_none();
    let names = match &g.namespace {
        Some(ns) => Names::new(ns.clone()),
        None => Names::new(format!(
            "demo-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    };
    let tmp = tempfile::Builder::new()
        .prefix("journeyman-demo-")
        .tempdir()?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let playbook = crate::playbook::Playbook::default_playbook();
    eprintln!(
        "journeyman demo: {} journeys, namespace '{}', broker {}, store {}",
        a.journeys,
        names.namespace,
        broker::redact(&g.amqp_url),
        data_dir.display()
    );

    let conn = broker::connect(&g.amqp_url, "journeyman-demo").await?;
    let ch = conn.create_channel().await?;
    let intents: Vec<String> = JOURNEY_INTENTS
        .iter()
        .map(|s| s.to_string())
        .chain(playbook.intents())
        .collect();
    let mut queues = broker::declare_topology(&ch, &names, intents).await?;
    queues.push(names.replies("0"));

    // Watch every journey event on a private queue.
    let events_q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        events_q.name().clone(),
        names.events().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut events = ch
        .basic_consume(
            events_q.name().clone(),
            "demo".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let agent_stats = Arc::new(AgentStats::default());
    let sim = Arc::new(SimAgent {
        failure_rate: a.failure_rate.clamp(0.0, 1.0),
        ..SimAgent::default()
    });
    let mut workers = Vec::new();
    for i in 0..a.agent_replicas.max(1) {
        let config = AgentConfig {
            amqp_url: g.amqp_url.clone(),
            names: names.clone(),
            agent_id: format!("sim-agent-{i}"),
            intents: playbook.intents().into_iter().collect(),
            prefetch: 32,
            max_message_bytes: crate::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        };
        let (sim, st, rx) = (sim.clone(), agent_stats.clone(), stop_rx.clone());
        workers.push(tokio::spawn(async move {
            agent::run(config, sim, st, stopped(rx))
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let stats = Arc::new(Stats::default());
    let config = orchestrator::Config::new(&g.amqp_url, &names.namespace, data_dir.clone());
    let (st, rx) = (stats.clone(), stop_rx.clone());
    let orch = tokio::spawn(async move {
        orchestrator::run(config, st, stopped(rx))
            .await
            .map_err(anyhow::Error::from)
    });

    // Start the journeys.
    let started = Instant::now();
    let pubch = conn.create_channel().await?;
    pubch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::new();
    for i in 0..a.journeys {
        let client = format!("client-{:03}", i + 1);
        let env = Envelope::new(
            AgentRef::new("journeyman-demo", "demo"),
            AgentRef::orchestrator(),
            MessageType::Request,
            "journey.start",
            json!({"client_id": client, "context": {
                "data_sources": ["drive", "confluence", "jira"],
                "connectors": ["gdrive", "confluence", "jira"],
            }}),
            Utc::now(),
        );
        let props = BasicProperties::default()
            .with_content_type(ShortString::from(crate::protocol::CONTENT_TYPE))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(env.message_id.to_string()))
            .with_type(ShortString::from("request"));
        confirms.push(
            pubch
                .basic_publish(
                    names.intents().as_str().into(),
                    "journey.start".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &env.to_bytes(),
                    props,
                )
                .await?,
        );
    }
    for c in confirms {
        if !matches!(c.await?, Confirmation::Ack(None)) {
            bail!("a journey.start command was not routed; the topology is missing");
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
    let mut last_line = Instant::now();
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut timed_out = false;
    loop {
        let done = track
            .values()
            .filter(|t| t.production_done || t.failed)
            .count();
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
            let t = track.entry(client).or_default();
            t.stage = p["stage"].as_str().unwrap_or_default().to_string();
            match p["event"].as_str().unwrap_or_default() {
                "work.completed" if t.stage == "production" => t.production_done = true,
                "work.failed" => t.failed = true,
                _ => {}
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
        let key = if t.failed {
            format!("{} (failed)", t.stage)
        } else if t.production_done {
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
    let summary = json!({
        "journeys": a.journeys,
        "in_production": in_production,
        "per_stage": per_stage,
        "tasks_dispatched": Stats::get(&stats.tasks_dispatched),
        "tasks_completed": Stats::get(&stats.tasks_completed),
        "retries": Stats::get(&stats.retries),
        "agent_failures_injected": agent_stats.failed.load(Ordering::Relaxed),
        "promotions": Stats::get(&stats.promotions),
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
        println!("promotions:          {}", summary["promotions"]);
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
