//! The orchestrator part: `journeyman orchestrator` as a child process (its CPU time and
//! peak RSS are then its own) with a bench playbook and --no-auto-promote, simulated
//! agents without latency or failures in this process, journeys started with signed
//! `journey.start` commands (pipelined confirms) and counted done at their
//! `work.completed` event. Its round trips come from its `/api/stats`; its store is
//! measured after it exits on SIGTERM (it flushes on the way out).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use super::probe::{cpu_seconds, dir_size, peak_rss_kib};
use super::{
    AbortOnDrop, BenchConfig, BenchError, PREFETCH, Progress, Row, Shape, TASKS_PER_JOURNEY, amqp,
    check_confirm, failed, fresh_names, io, per_1k, say,
};
use crate::agent::sim::SimAgent;
use crate::agent::{self, AgentConfig, AgentStats};
use crate::broker::{self, Names, Outgoing, Publisher};
use crate::domain::playbook::Playbook;
use crate::http::StatsView;
use crate::wire::auth::{Key, Keyring, Signer};
use crate::wire::protocol::{AgentRef, Envelope, MessageType};

fn client_name(i: usize) -> String {
    format!("bench-{i:06}")
}

fn client_index(name: &str) -> Option<usize> {
    name.strip_prefix("bench-")?.parse().ok()
}

/// The fields of a journey event the bench reads; the rest is skipped unparsed.
#[derive(Deserialize)]
struct EventEnvelope {
    payload: EventPayload,
}

#[derive(Deserialize)]
struct EventPayload {
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    stage: String,
}

/// The orchestrator child, killed if the bench fails before stopping it.
struct Orchestrator {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl Orchestrator {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

pub(super) async fn orchestrator_part(
    cfg: &BenchConfig,
    shape: Shape,
    journeys: usize,
    concurrency: usize,
    replicas: u16,
) -> Result<Row, BenchError> {
    let names = fresh_names(cfg);
    let part = if replicas > 1 || cfg.orchestrators.len() > 1 {
        format!("orchestrator {} x{replicas}", shape.as_str())
    } else {
        format!("orchestrator {}", shape.as_str())
    };
    say(
        cfg,
        format!(
            "{part}: {journeys} journeys of {TASKS_PER_JOURNEY} tasks, {concurrency} in flight, namespace {}",
            names.namespace
        ),
    );
    let playbook = Playbook::from_yaml(shape.yaml())?;
    let tmp = tempfile::Builder::new()
        .prefix("journeyman-bench-")
        .tempdir()
        .map_err(io("cannot create a temporary directory"))?;
    let admin = broker::connect(&cfg.amqp_url, "journeyman-bench-admin").await?;
    let intents = playbook.namespace_intents();
    let mut queues: Vec<String> = intents.iter().map(|i| names.intent_queue(i)).collect();
    queues.push(names.dead_letter());
    queues.push(names.replies("0"));
    let result = cfg
        .interruptible(orchestrator_on(
            cfg,
            &admin,
            &names,
            &part,
            &playbook,
            shape,
            tmp.path(),
            journeys,
            concurrency,
            replicas,
        ))
        .await;
    if !cfg.keep {
        broker::delete_namespace(&admin, &names, &queues).await;
    }
    let _ = admin.close(200, "bench done".into()).await;
    match result {
        Ok(mut row) => {
            if cfg.keep {
                row.kept_dir = Some(tmp.keep().display().to_string());
            }
            Ok(row)
        }
        Err(BenchError::Interrupted) => Err(BenchError::Interrupted),
        Err(e) => {
            // Kept for its log, which the error names; the store too only with --keep
            // (a large run's is gigabytes).
            if !cfg.keep {
                let _ = std::fs::remove_dir_all(tmp.path().join("store"));
            }
            let kept = tmp.keep();
            say(
                cfg,
                format!("{part}: failed; its directory is kept: {}", kept.display()),
            );
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn orchestrator_on(
    cfg: &BenchConfig,
    admin: &lapin::Connection,
    names: &Names,
    part: &str,
    playbook: &Playbook,
    shape: Shape,
    dir: &Path,
    journeys: usize,
    concurrency: usize,
    replicas: u16,
) -> Result<Row, BenchError> {
    let ch = admin
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    let intents = playbook.namespace_intents();
    // Declared here too, so the first commands are routable before the orchestrator runs.
    let partitions = broker::resolve_partitions(admin, &cfg.amqp_url, names, None, 1).await?;
    broker::declare_topology(&ch, names, intents, partitions).await?;

    let playbook_file = dir.join("playbook.yaml");
    std::fs::write(&playbook_file, shape.yaml()).map_err(io("cannot write the playbook"))?;
    // One store per replica; with one replica the layout of before (`store`).
    let store_dirs: Vec<PathBuf> = (0..replicas)
        .map(|i| {
            if replicas == 1 {
                dir.join("store")
            } else {
                dir.join(format!("store-{i}"))
            }
        })
        .collect();
    let store_dir = store_dirs[0].clone();
    let log = dir.join("orchestrator.log");
    // One key pair per sender, as deployed: the orchestrator's, the agents', upstream's.
    let keys = if cfg.auth {
        Some(BenchKeys {
            orchestrator: Key::generate("bench-orch", AgentRef::orchestrator().agent_id)?,
            agent: Key::generate("bench-agent", "bench-agent")?,
            upstream: Key::generate("bench-upstream", "journeyman-bench")?,
        })
    } else {
        None
    };
    let mut orchs = Vec::new();
    let mut https = Vec::new();
    for i in 0..replicas {
        let port = free_port().map_err(io("cannot find a free loopback port"))?;
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let log_i = if replicas == 1 {
            log.clone()
        } else {
            dir.join(format!("orchestrator-{i}.log"))
        };
        orchs.push(spawn_orchestrator(
            cfg,
            names,
            &store_dirs[usize::from(i)],
            &playbook_file,
            &log_i,
            addr,
            keys.as_ref(),
            (i, replicas, partitions),
        )?);
        https.push(crate::http::client::Client::new(
            addr,
            Duration::from_secs(10),
        ));
    }
    let log_name = log.display().to_string();

    // Simulated agents: no latency, no failures, in this process.
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent_stats = Arc::new(AgentStats::default());
    let ring = match &keys {
        Some(k) => Some(Arc::new(Keyring::own_and_public(
            &k.agent,
            &[&k.orchestrator],
        )?)),
        None => None,
    };
    let config = AgentConfig {
        amqp_url: cfg.amqp_url.clone(),
        names: names.clone(),
        agent_id: "bench-agent".into(),
        intents: playbook.intents().into_iter().collect(),
        prefetch: PREFETCH,
        max_message_bytes: crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        keyring: ring,
        signing_key: keys.as_ref().map(|k| k.agent.clone()),
        shutdown_timeout: Duration::from_secs(5),
    };
    let sim = Arc::new(SimAgent {
        min_latency: Duration::ZERO,
        max_latency: Duration::ZERO,
        failure_rate: 0.0,
        duplicate_rate: 0.0,
    });
    let agents = {
        let (st, mut rx) = (agent_stats.clone(), stop_rx.clone());
        AbortOnDrop(tokio::spawn(async move {
            agent::run(config, sim, st, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
        }))
    };
    const READY_TIMEOUT: Duration = Duration::from_secs(60);
    if tokio::time::timeout(READY_TIMEOUT, agent_stats.wait_ready())
        .await
        .is_err()
    {
        return Err(failed(
            part,
            format!("the simulated agents were not consuming within {READY_TIMEOUT:?}"),
        ));
    }
    for (orch, http) in orchs.iter_mut().zip(&https) {
        wait_ready(part, orch, http, READY_TIMEOUT).await?;
    }

    let watch_conn = broker::connect(&cfg.amqp_url, "journeyman-bench-watch").await?;
    let (_watch, mut events) = broker::watch_events_on(
        &watch_conn,
        names,
        &["work.completed", "work.failed", "journey.paused"],
    )
    .await?;
    let publish_conn = broker::connect(&cfg.amqp_url, "journeyman-bench-publish").await?;
    let publisher = Publisher::start(&publish_conn).await?;
    let upstream = match &keys {
        Some(k) => Some(
            Signer::new(k.upstream.clone(), "journeyman-bench")?
                .with_ttl(Duration::from_secs(24 * 3600)),
        ),
        None => None,
    };
    let start_cmd = |i: usize| {
        let mut env = Envelope::new(
            AgentRef::new("journeyman-bench", "bench"),
            AgentRef::orchestrator(),
            MessageType::Request,
            "journey.start",
            json!({"client_id": client_name(i), "context": {
                "data_sources": ["drive", "confluence", "jira"],
                "connectors": ["gdrive", "confluence", "jira"],
            }}),
            Utc::now(),
        );
        if let Some(s) = &upstream {
            env = s.sign(env, Utc::now());
        }
        Outgoing::command(
            names,
            "journey.start",
            &client_name(i),
            env.message_id.to_string(),
            env.to_bytes(),
        )
    };

    let cpu_of = |orchs: &[Orchestrator]| {
        orchs
            .iter()
            .map(|o| cpu_seconds(&o.pid.to_string()))
            .sum::<Option<f64>>()
    };
    let cpu0 = cpu_of(&orchs);
    let self0 = cpu_seconds("self");
    let start = Instant::now();
    let mut confirms = FuturesUnordered::new();
    let mut started = 0;
    let mut done = vec![false; journeys];
    let mut finished = 0;
    while started < concurrency.min(journeys) {
        confirms.push(publisher.enqueue(start_cmd(started)).await?);
        started += 1;
        // Read confirms as they come, so a long scale-run start keeps memory flat.
        while let Some(Some(c)) = confirms.next().now_or_never() {
            check_confirm(part, c)?;
        }
    }
    // Stalls are counted from here: starting 100,000 journeys takes a while by itself.
    let mut progress = Progress::new(part, journeys);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while finished < journeys {
        tokio::select! {
            next = events.next() => {
                let d = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(amqp("watch events")(e)),
                    None => return Err(failed(part, "the event watch ended (connection lost?)")),
                };
                let Ok(ev) = serde_json::from_slice::<EventEnvelope>(&d.data) else { continue };
                let p = ev.payload;
                match p.event.as_str() {
                    "work.completed" if p.stage == "sandbox" => {
                        if let Some(i) = client_index(&p.client_id).filter(|i| *i < journeys)
                            && !done[i]
                        {
                            done[i] = true;
                            finished += 1;
                            if started < journeys {
                                confirms.push(publisher.enqueue(start_cmd(started)).await?);
                                started += 1;
                            }
                        }
                    }
                    "journey.paused" => {
                        return Err(failed(part, format!(
                            "journey {} paused with {finished} of {journeys} finished: a task failed, which the simulated agents never do; see {log_name}",
                            p.client_id
                        )));
                    }
                    _ => {}
                }
            }
            Some(c) = confirms.next(), if !confirms.is_empty() => check_confirm(part, c)?,
            _ = tick.tick() => {
                for orch in orchs.iter_mut() {
                    if let Ok(Some(status)) = orch.child.try_wait() {
                        return Err(failed(part, format!(
                            "an orchestrator exited ({status}) with {finished} of {journeys} journeys finished; last lines of {}:\n{}",
                            orch.log.display(),
                            orch.log_tail()
                        )));
                    }
                }
                if let Err(mut e) = progress.tick(cfg, finished, &log_name) {
                    // Why it stalled is usually in the orchestrator's counters (timeouts
                    // turn into retries, late replies into stale ones).
                    if let BenchError::Unfinished { why, .. } = &mut e
                        && let Ok(s) = https[0].get::<StatsView>("/api/stats").await
                    {
                        let c = |k: &str| s.counters.get(k).copied().unwrap_or(0);
                        why.push_str(&format!(
                            "; the orchestrator's counters: tasks dispatched {}, completed {}, retries {}, stale replies {}, pauses {}",
                            c("tasks_dispatched"),
                            c("tasks_completed"),
                            c("retries"),
                            c("stale_replies"),
                            c("pauses")
                        ));
                    }
                    return Err(e);
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_of(&orchs).zip(cpu0).map(|(b, a)| b - a).unwrap_or(0.0);
    let self_cpu = cpu_seconds("self")
        .zip(self0)
        .map(|(b, a)| b - a)
        .unwrap_or(0.0);
    // The largest replica's peak: what one pod needs.
    let peak_rss = orchs
        .iter()
        .map(|o| peak_rss_kib(&o.pid.to_string()).unwrap_or(0))
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    let mut tasks = 0;
    let mut stats: Option<StatsView> = None;
    for http in &https {
        let s: StatsView = http.get("/api/stats").await?;
        tasks += s.counters.get("tasks_completed").copied().unwrap_or(0);
        // Round trips as replica 0 saw them: percentiles do not add up across replicas.
        stats.get_or_insert(s);
    }
    let stats = stats.expect("at least one replica");
    let soak = match cfg.soak {
        Some(d) if shape == Shape::Chain && replicas == 1 => {
            soak_run(
                cfg,
                names,
                &publisher,
                upstream.as_ref(),
                journeys,
                d,
                &store_dir,
            )
            .await?
        }
        _ => Vec::new(),
    };

    // Stop the orchestrator (it flushes its store on the way out), then the agents.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    for orch in &orchs {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(orch.pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let mut flushed = true;
    for orch in orchs.iter_mut() {
        flushed &= match tokio::time::timeout(Duration::from_secs(60), orch.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = orch.child.kill().await;
                false
            }
        };
    }
    let _ = stop_tx.send(true);
    let mut agents = agents;
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut agents.0).await;
    drop(agents);
    for c in [&watch_conn, &publish_conn] {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), c.close(200, "bench done".into())).await;
    }
    let mut store_bytes = 0;
    for d in &store_dirs {
        store_bytes += dir_size(d).map_err(io("cannot measure the data directory"))?;
    }
    // What the records themselves take; the rest of the directory is sled's log, which
    // it reclaims segment by segment as the live share of each drops.
    let live_bytes = store_dirs
        .iter()
        .map(|d| {
            crate::store::Store::open(d)
                .and_then(|s| s.census())
                .map(|c| c.total_bytes())
                .ok()
        })
        .sum::<Option<u64>>();
    Ok(Row {
        part: part.to_string(),
        namespace: names.namespace.clone(),
        journeys,
        concurrency,
        tasks,
        elapsed_s: elapsed,
        tasks_per_s: tasks as f64 / elapsed,
        journeys_per_s: finished as f64 / elapsed,
        round_trip: stats.round_trip,
        cpu_s: cpu,
        cpu_s_per_1k_tasks: per_1k(cpu, tasks),
        cpu_of: "orchestrator process".into(),
        bench_process_cpu_s: self_cpu,
        peak_rss_mib: peak_rss,
        store_bytes: Some(store_bytes),
        store_bytes_per_journey: Some(store_bytes as f64 / journeys as f64),
        store_flushed: Some(flushed),
        live_bytes_per_journey: live_bytes.map(|b| b as f64 / journeys as f64),
        kept_dir: None,
        soak_live_bytes: if soak.is_empty() { None } else { live_bytes },
        soak,
    })
}

/// Streams evidence updates at the finished journeys for `duration`, 256 unconfirmed at
/// most, and samples the data directory ten times: a store that keeps disk bounded grows
/// only by what it keeps (a history line per update), not by superseded records.
async fn soak_run(
    cfg: &BenchConfig,
    names: &Names,
    publisher: &Publisher,
    upstream: Option<&Signer>,
    journeys: usize,
    duration: Duration,
    store_dir: &Path,
) -> Result<Vec<super::report::SoakSample>, BenchError> {
    const WINDOW: usize = 256;
    say(
        cfg,
        format!("soak: evidence updates at {journeys} journeys for {duration:?}"),
    );
    let every = duration / 10;
    let start = Instant::now();
    let mut next_sample = every;
    let mut samples = Vec::new();
    let mut confirms = FuturesUnordered::new();
    let (mut sent, mut confirmed) = (0u64, 0u64);
    while start.elapsed() < duration || !confirms.is_empty() {
        if start.elapsed() < duration && confirms.len() < WINDOW {
            let client = client_name(sent as usize % journeys);
            let mut env = Envelope::new(
                AgentRef::new("journeyman-bench", "bench"),
                AgentRef::orchestrator(),
                MessageType::Request,
                "journey.evidence",
                json!({"client_id": client, "metrics": {"soak.update": sent as f64}}),
                Utc::now(),
            );
            if let Some(s) = upstream {
                env = s.sign(env, Utc::now());
            }
            let out = Outgoing::command(
                names,
                "journey.evidence",
                &client,
                env.message_id.to_string(),
                env.to_bytes(),
            );
            confirms.push(publisher.enqueue(out).await?);
            sent += 1;
            continue;
        }
        if let Some(c) = confirms.next().await {
            check_confirm("soak", c)?;
            confirmed += 1;
        }
        if start.elapsed() >= next_sample {
            next_sample += every;
            samples.push(super::report::SoakSample {
                at_s: start.elapsed().as_secs_f64(),
                updates: confirmed,
                store_bytes: dir_size(store_dir)
                    .map_err(io("cannot measure the data directory"))?,
            });
        }
    }
    Ok(samples)
}

/// The bench's senders, each with its own key pair.
struct BenchKeys {
    orchestrator: Key,
    agent: Key,
    upstream: Key,
}

#[allow(clippy::too_many_arguments)]
fn spawn_orchestrator(
    cfg: &BenchConfig,
    names: &Names,
    store_dir: &Path,
    playbook: &Path,
    log: &Path,
    addr: std::net::SocketAddr,
    keys: Option<&BenchKeys>,
    (index, replicas, partitions): (u16, u16, u16),
) -> Result<Orchestrator, BenchError> {
    let log_file =
        std::fs::File::create(log).map_err(io("cannot create the orchestrator's log"))?;
    let mut cmd = tokio::process::Command::new(&cfg.binary);
    cmd.arg("--namespace")
        .arg(&names.namespace)
        .arg("--queue-type")
        .arg(names.queue_type.as_str())
        .arg("--http-addr")
        .arg(addr.to_string())
        .arg("orchestrator")
        .arg("--data-dir")
        .arg(store_dir)
        .arg("--playbook")
        .arg(playbook)
        .arg("--replica")
        .arg(format!("{index}/{replicas}"))
        .arg("--partitions")
        .arg(partitions.to_string())
        .arg("--prefetch")
        .arg(PREFETCH.to_string())
        .arg("--no-auto-promote")
        .env("JOURNEYMAN_AMQP_URL", &cfg.amqp_url)
        .env("RUST_LOG", "warn")
        // Nothing of the caller's own deployment leaks into the measured process.
        .env_remove(crate::wire::auth::KEYS_FILE_ENV)
        .env_remove("JOURNEYMAN_WEBHOOK_URL")
        .env_remove("JOURNEYMAN_WEBHOOK_TOKEN")
        .env_remove("JOURNEYMAN_ALLOW_LIST")
        .env_remove("JOURNEYMAN_FAILPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    match keys {
        Some(k) => {
            let ring = Keyring::own_and_public(&k.orchestrator, &[&k.agent, &k.upstream])?;
            cmd.env(crate::wire::auth::KEYS_ENV, ring.expose_inline());
        }
        None => {
            cmd.env_remove(crate::wire::auth::KEYS_ENV)
                .arg("--insecure-no-auth");
        }
    }
    let child = cmd
        .spawn()
        .map_err(io(format!("cannot run {}", cfg.binary.display())))?;
    let pid = child.id().unwrap_or(0);
    Ok(Orchestrator {
        child,
        pid,
        log: log.to_path_buf(),
    })
}

/// Waits for `/readyz` to say 200 (connected, consuming, store open).
async fn wait_ready(
    part: &str,
    orch: &mut Orchestrator,
    http: &crate::ops::client::Client,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = orch.child.try_wait() {
            return Err(failed(
                part,
                format!(
                    "the orchestrator exited at start ({status}); last lines of {}:\n{}",
                    orch.log.display(),
                    orch.log_tail()
                ),
            ));
        }
        if let Ok((s, _)) = http.raw("/readyz").await
            && s.is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(failed(
                part,
                format!(
                    "the orchestrator was not ready within {timeout:?}; last lines of {}:\n{}",
                    orch.log.display(),
                    orch.log_tail()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
