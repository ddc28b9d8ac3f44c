//! `journeyman bench`: what the orchestrator costs on top of the broker, measured in one run
//! on the user's own broker.
//!
//! Two parts, each in a fresh namespace of its own that is deleted afterwards:
//! - **the broker limit**: a minimal request/reply loop over lapin with our message pattern
//!   (requests published with confirms through the intents exchange to durable work
//!   queues, an echo consumer replying with confirms to a durable reply queue and acking
//!   after the confirm, the requester acking replies), C chains of four round trips in
//!   flight, no orchestration and no store. It runs in this process.
//! - **the orchestrator**: `journeyman orchestrator` as a child process (so its CPU time
//!   and peak RSS are its own) running journeys through a stage whose unit of work is
//!   DES-002 §3.2's four tasks, as a chain or with two parallel branches, served by
//!   simulated agents without latency or failures in this process. Journeys are started
//!   with `journey.start` commands and counted done at their `work.completed` event.
//!
//! The comparison is the point: orchestrator tasks/s over the limit's round trips/s.
//! Everything here measures and reports; it decides nothing about journeys. The pure parts
//! (parsing, /proc readers, the AMQP greeting, the text report) are tested below.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::{Args, ValueEnum};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};

use crate::agent::{self, AgentConfig, AgentStats};
use crate::auth::{Key, Keyring, Signer};
use crate::broker::{self, BrokerError, Names, Outgoing, Published, Publisher, QueueType};
use crate::http::StatsView;
use crate::http::metrics::RoundTripSummary;
use crate::playbook::{Playbook, PlaybookError};
use crate::protocol::{AgentRef, Envelope, JOURNEY_INTENTS, MessageType};
use crate::sim::SimAgent;

/// The chain variant's playbook: DES-002 §3.2's four tasks, A → B → C → D.
pub const CHAIN_PLAYBOOK: &str = include_str!("../playbooks/bench-chain.yaml");
/// The parallel variant's playbook: A → {B, C} → D.
pub const PARALLEL_PLAYBOOK: &str = include_str!("../playbooks/bench-parallel.yaml");
/// Tasks per journey in both variants, and round trips per chain in the broker limit.
pub const TASKS_PER_JOURNEY: usize = 4;
/// Unacknowledged messages per queue, for every consumer of both parts: the orchestrator's
/// default, so neither side is throttled where the other is not.
pub const PREFETCH: u16 = 256;
/// The targets of the issue: orchestrator tasks/s at least this share of the limit's...
pub const TARGET_RATIO: f64 = 0.7;
/// ...its task round-trip p99 at most this multiple of the limit's...
pub const TARGET_P99_FACTOR: f64 = 2.0;
/// ...and in the scale run, peak RSS at most this (MiB) and throughput within 20 % of the
/// first size.
pub const TARGET_RSS_MIB: f64 = 256.0;
pub const TARGET_SCALE_THROUGHPUT: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the bench playbook is invalid: {0}")]
    Playbook(#[from] PlaybookError),
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{part}: {message}")]
    Failed { part: String, message: String },
    #[error(
        "{part}: {missing} of {total} journeys did not finish ({why}); the orchestrator's log is {log}"
    )]
    Unfinished {
        part: String,
        missing: usize,
        total: usize,
        why: String,
        log: String,
    },
    #[error(transparent)]
    Api(#[from] anyhow::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn failed(part: &str, message: impl Into<String>) -> BenchError {
    BenchError::Failed {
        part: part.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Broker,
    Orchestrator,
    All,
}

impl Part {
    fn broker(self) -> bool {
        matches!(self, Part::Broker | Part::All)
    }
    fn orchestrator(self) -> bool {
        matches!(self, Part::Orchestrator | Part::All)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Chain,
    Parallel,
    Both,
}

impl Variant {
    fn shapes(self) -> Vec<Shape> {
        match self {
            Variant::Chain => vec![Shape::Chain],
            Variant::Parallel => vec![Shape::Parallel],
            Variant::Both => vec![Shape::Chain, Shape::Parallel],
        }
    }
}

/// The unit of work's shape in one orchestrator run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Chain,
    Parallel,
}

impl Shape {
    fn yaml(self) -> &'static str {
        match self {
            Shape::Chain => CHAIN_PLAYBOOK,
            Shape::Parallel => PARALLEL_PLAYBOOK,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Parallel => "parallel",
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Journeys (and broker-limit chains) per part; several comma-separated values make a
    /// scale run, each size started all at once (e.g. 1000,10000,100000).
    #[arg(long, value_parser = parse_journeys, default_value = "2000")]
    pub journeys: Vec<Vec<usize>>,
    /// Journeys (chains) in flight at once in the default run.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Which parts to measure.
    #[arg(long, value_enum, default_value = "all")]
    pub part: Part,
    /// Which unit of work the orchestrator runs: DES-002 §3.2's four tasks as a chain, with
    /// two parallel branches, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub variant: Variant,
    /// Run without signing (the orchestrator with --insecure-no-auth); by default a key
    /// is generated for the run and everything is signed and verified, as in production.
    #[arg(long)]
    pub no_auth: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the namespaces and data directories afterwards (their names are printed).
    #[arg(long)]
    pub keep: bool,
    /// Give up on a part after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Give up on a part when no journey finished for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}

/// `--journeys`: one or more positive counts, comma-separated; `_` separators and a `k`
/// suffix (thousands) are allowed.
pub fn parse_journeys(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let p = part.trim().replace('_', "");
        let (digits, mult) = match p.strip_suffix(['k', 'K']) {
            Some(d) => (d, 1000),
            None => (p.as_str(), 1),
        };
        let n: usize = digits
            .parse()
            .map_err(|_| format!("'{}' is not a number of journeys", part.trim()))?;
        let n = n
            .checked_mul(mult)
            .ok_or_else(|| format!("'{}' is too large", part.trim()))?;
        if n == 0 {
            return Err("the number of journeys must be at least 1".into());
        }
        out.push(n);
    }
    Ok(out)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub amqp_url: String,
    /// The journeyman binary the orchestrator runs from.
    pub binary: PathBuf,
    pub journeys: Vec<usize>,
    pub concurrency: usize,
    pub queue_type: QueueType,
    pub part: Part,
    pub variant: Variant,
    pub auth: bool,
    pub keep: bool,
    pub timeout: Duration,
    pub stall_timeout: Duration,
    /// A progress line on stderr every few seconds.
    pub progress: bool,
}

impl BenchConfig {
    pub fn from_args(
        amqp_url: &str,
        binary: PathBuf,
        queue_type: QueueType,
        a: &BenchArgs,
    ) -> Self {
        let mut journeys: Vec<usize> = a.journeys.iter().flatten().copied().collect();
        if journeys.is_empty() {
            journeys.push(2000);
        }
        Self {
            amqp_url: amqp_url.to_string(),
            binary,
            journeys,
            concurrency: a.concurrency.max(1),
            queue_type,
            part: a.part,
            variant: a.variant,
            auth: !a.no_auth,
            keep: a.keep,
            timeout: a.timeout,
            stall_timeout: a.stall_timeout,
            progress: true,
        }
    }

    fn scale(&self) -> bool {
        self.journeys.len() > 1
    }
}

/// One measured part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// "broker limit", "orchestrator chain" or "orchestrator parallel".
    pub part: String,
    pub namespace: String,
    pub journeys: usize,
    /// Journeys (chains) in flight at once.
    pub concurrency: usize,
    /// Tasks completed (round trips, for the broker limit).
    pub tasks: u64,
    pub elapsed_s: f64,
    pub tasks_per_s: f64,
    pub journeys_per_s: f64,
    /// Task round trip: publish to reply received (broker limit), or the orchestrator's
    /// dispatch of an attempt to its reply being applied.
    pub round_trip: RoundTripSummary,
    /// CPU seconds (user + system) over the measured window, of the process `cpu_of` says.
    pub cpu_s: f64,
    pub cpu_s_per_1k_tasks: f64,
    pub cpu_of: String,
    /// CPU seconds of this bench process over the window (agents, watcher, starter; or
    /// requester and echo for the broker limit).
    pub bench_process_cpu_s: f64,
    /// Peak resident set (VmHWM) of the process `cpu_of` says.
    pub peak_rss_mib: f64,
    /// The orchestrator's data directory after it exited (sum of file sizes).
    pub store_bytes: Option<u64>,
    pub store_bytes_per_journey: Option<f64>,
    /// The orchestrator exited cleanly on SIGTERM, so sled had flushed before the size
    /// was measured.
    pub store_flushed: Option<bool>,
    /// Where the data directory was kept (--keep).
    pub kept_dir: Option<String>,
}

/// A target of the issue and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub met: bool,
}

/// One size of the scale run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScaleRow {
    pub variant: Shape,
    pub journeys: usize,
    pub tasks_per_s: f64,
    pub journeys_per_s: f64,
    pub peak_rss_mib: f64,
    pub store_mib: f64,
    pub bytes_per_journey: f64,
    /// Throughput (tasks/s) relative to the first size of the same variant.
    pub relative_throughput: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    pub nproc: usize,
    /// From the broker's greeting (server properties), e.g. "RabbitMQ 3.10.8".
    pub broker_version: String,
    pub queue_type: QueueType,
    pub auth: bool,
    pub journeys: Vec<usize>,
    pub concurrency: usize,
    /// Every measured part: the broker limit, then the orchestrator runs.
    pub rows: Vec<Row>,
    /// Orchestrator tasks/s over the broker limit's round trips/s, by variant.
    pub ratios: BTreeMap<String, f64>,
    pub targets: Vec<Target>,
    /// The scale run, one row per size (empty for a default run).
    pub scale: Vec<ScaleRow>,
    /// Namespaces used (deleted afterwards unless --keep).
    pub namespaces: Vec<String>,
    pub namespaces_deleted: bool,
}

/// Runs what the configuration asks and reports it.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let broker_version = broker_version(&cfg.amqp_url).await;
    say(
        cfg,
        format!(
            "journeyman bench: journeys {:?}, concurrency {}, {} queues, auth {}, {} cores, broker {} ({})",
            cfg.journeys,
            cfg.concurrency,
            cfg.queue_type,
            if cfg.auth { "on" } else { "off" },
            nproc,
            broker_version,
            broker::redact(&cfg.amqp_url)
        ),
    );
    let mut rows = Vec::new();
    let first = cfg.journeys[0];
    if cfg.part.broker() {
        // The scale run compares every size with one reference at the default concurrency.
        rows.push(broker_limit(cfg, first, cfg.concurrency.min(first)).await?);
    }
    if cfg.part.orchestrator() {
        for shape in cfg.variant.shapes() {
            for &n in &cfg.journeys {
                let concurrency = if cfg.scale() {
                    n
                } else {
                    cfg.concurrency.min(n)
                };
                rows.push(orchestrator_part(cfg, shape, n, concurrency).await?);
            }
        }
    }
    let namespaces = rows.iter().map(|r| r.namespace.clone()).collect();
    Ok(assemble(
        nproc,
        broker_version,
        cfg,
        rows,
        namespaces,
        !cfg.keep,
    ))
}

/// The ratios, targets and scale rows from the measured rows (pure).
fn assemble(
    nproc: usize,
    broker_version: String,
    cfg: &BenchConfig,
    rows: Vec<Row>,
    namespaces: Vec<String>,
    namespaces_deleted: bool,
) -> BenchReport {
    let limit = rows.iter().find(|r| r.part == "broker limit").cloned();
    let mut ratios = BTreeMap::new();
    let mut targets = Vec::new();
    let orch = |shape: Shape| {
        rows.iter()
            .filter(move |r| r.part == format!("orchestrator {}", shape.as_str()))
    };
    if let Some(limit) = &limit {
        for shape in [Shape::Chain, Shape::Parallel] {
            // The default run, or the first size of a scale run (the limit's own size).
            let Some(r) = orch(shape).next() else {
                continue;
            };
            if limit.tasks_per_s > 0.0 {
                let ratio = r.tasks_per_s / limit.tasks_per_s;
                ratios.insert(shape.as_str().to_string(), ratio);
                targets.push(Target {
                    name: format!("{} tasks/s ≥ 0.7 × limit", shape.as_str()),
                    value: ratio,
                    limit: TARGET_RATIO,
                    met: ratio >= TARGET_RATIO,
                });
            }
            if limit.round_trip.p99_ms > 0.0 {
                let factor = r.round_trip.p99_ms / limit.round_trip.p99_ms;
                targets.push(Target {
                    name: format!("{} p99 within 2 × limit p99", shape.as_str()),
                    value: factor,
                    limit: TARGET_P99_FACTOR,
                    met: factor <= TARGET_P99_FACTOR,
                });
            }
        }
    }
    let mut scale = Vec::new();
    if cfg.scale() {
        for shape in [Shape::Chain, Shape::Parallel] {
            let runs: Vec<&Row> = orch(shape).collect();
            let Some(base) = runs.first().map(|r| r.tasks_per_s) else {
                continue;
            };
            for r in &runs {
                let relative = if base > 0.0 {
                    r.tasks_per_s / base
                } else {
                    0.0
                };
                scale.push(ScaleRow {
                    variant: shape,
                    journeys: r.journeys,
                    tasks_per_s: r.tasks_per_s,
                    journeys_per_s: r.journeys_per_s,
                    peak_rss_mib: r.peak_rss_mib,
                    store_mib: r.store_bytes.unwrap_or(0) as f64 / MIB,
                    bytes_per_journey: r.store_bytes_per_journey.unwrap_or(0.0),
                    relative_throughput: relative,
                    p99_ms: r.round_trip.p99_ms,
                });
            }
            if let Some(last) = runs.last().filter(|_| runs.len() > 1) {
                targets.push(Target {
                    name: format!(
                        "{} peak RSS at {} journeys ≤ 256 MiB",
                        shape.as_str(),
                        last.journeys
                    ),
                    value: last.peak_rss_mib,
                    limit: TARGET_RSS_MIB,
                    met: last.peak_rss_mib <= TARGET_RSS_MIB,
                });
                let relative = if base > 0.0 {
                    last.tasks_per_s / base
                } else {
                    0.0
                };
                targets.push(Target {
                    name: format!(
                        "{} throughput at {} journeys within 20 % of {}",
                        shape.as_str(),
                        last.journeys,
                        runs[0].journeys
                    ),
                    value: relative,
                    limit: TARGET_SCALE_THROUGHPUT,
                    met: relative >= TARGET_SCALE_THROUGHPUT,
                });
            }
        }
    }
    BenchReport {
        nproc,
        broker_version,
        queue_type: cfg.queue_type,
        auth: cfg.auth,
        journeys: cfg.journeys.clone(),
        concurrency: cfg.concurrency,
        rows,
        ratios,
        targets,
        scale,
        namespaces,
        namespaces_deleted,
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn met(b: bool) -> &'static str {
    if b { "met" } else { "not met" }
}

/// The report for people (pure).
pub fn render_text(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "journeyman bench: nproc {}, broker {}, {} queues, auth {}, concurrency {}",
        r.nproc,
        r.broker_version,
        r.queue_type,
        if r.auth { "on" } else { "off" },
        r.concurrency
    );
    let _ = writeln!(
        o,
        "{:<24} {:>8} {:>9} {:>10} {:>9} {:>9} {:>10} {:>14} {:>13}",
        "part",
        "journeys",
        "tasks/s",
        "journeys/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU s/1k tasks",
        "peak RSS MiB"
    );
    for row in &r.rows {
        let _ = writeln!(
            o,
            "{:<24} {:>8} {:>9.0} {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>14.3} {:>13.1}",
            row.part,
            row.journeys,
            row.tasks_per_s,
            row.journeys_per_s,
            row.round_trip.p50_ms,
            row.round_trip.p99_ms,
            row.round_trip.p999_ms,
            row.cpu_s_per_1k_tasks,
            row.peak_rss_mib
        );
    }
    if r.rows.iter().any(|x| x.part == "broker limit") {
        let _ = writeln!(
            o,
            "(CPU and RSS: the broker limit's are this process's (requester and echo); the orchestrator's are its own process's)"
        );
    }
    let stores: Vec<&Row> = r.rows.iter().filter(|x| x.store_bytes.is_some()).collect();
    if let Some(first) = stores.first() {
        let per = |x: &Row| x.store_bytes_per_journey.unwrap_or(0.0).round() as u64;
        let others: Vec<String> = stores
            .iter()
            .skip(1)
            .map(|x| format!("{} at {}: {}", x.part, x.journeys, per(x)))
            .collect();
        let flushed = stores.iter().all(|x| x.store_flushed == Some(true));
        let _ = writeln!(
            o,
            "sled bytes per journey: {} ({} at {} journeys{}{}; {})",
            per(first),
            first.part,
            first.journeys,
            if others.is_empty() { "" } else { "; " },
            others.join("; "),
            if flushed {
                "flushed: the orchestrator exited cleanly before the size was taken"
            } else {
                "NOT flushed: the orchestrator did not exit cleanly"
            }
        );
    }
    if let Some(ratio) = r.ratios.get("chain") {
        let _ = writeln!(o, "ratio: {ratio:.2}");
    }
    if let Some(ratio) = r.ratios.get("parallel") {
        let _ = writeln!(o, "ratio (parallel): {ratio:.2}");
    }
    let find = |prefix: &str, kind: &str| {
        r.targets
            .iter()
            .find(|t| t.name.starts_with(prefix) && t.name.contains(kind))
    };
    for (line, kind, unit) in [
        ("target tasks/s ≥ 0.7 × limit", "tasks/s", ""),
        ("target p99 within 2 × limit p99", "p99 within", "×"),
    ] {
        let chain = find("chain", kind);
        let parallel = find("parallel", kind);
        let Some(main) = chain.or(parallel) else {
            continue;
        };
        let detail: Vec<String> = [("chain", chain), ("parallel", parallel)]
            .into_iter()
            .filter_map(|(n, t)| t.map(|t| format!("{n} {:.2}{unit} {}", t.value, met(t.met))))
            .collect();
        let _ = writeln!(o, "{line}: {} ({})", met(main.met), detail.join(", "));
    }
    if !r.scale.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "scale run: each size started all at once");
        let _ = writeln!(
            o,
            "{:<9} {:>8} {:>9} {:>10} {:>13} {:>10} {:>14} {:>10} {:>20}",
            "variant",
            "journeys",
            "tasks/s",
            "journeys/s",
            "peak RSS MiB",
            "store MiB",
            "bytes/journey",
            "p99 ms",
            "throughput vs first"
        );
        for s in &r.scale {
            let _ = writeln!(
                o,
                "{:<9} {:>8} {:>9.0} {:>10.1} {:>13.1} {:>10.1} {:>14.0} {:>10.1} {:>20.2}",
                s.variant.as_str(),
                s.journeys,
                s.tasks_per_s,
                s.journeys_per_s,
                s.peak_rss_mib,
                s.store_mib,
                s.bytes_per_journey,
                s.p99_ms,
                s.relative_throughput
            );
        }
        for t in r
            .targets
            .iter()
            .filter(|t| t.name.contains("RSS") || t.name.contains("within 20"))
        {
            let _ = writeln!(o, "target {}: {} ({:.2})", t.name, met(t.met), t.value);
        }
    }
    if r.namespaces_deleted {
        let _ = writeln!(o, "namespaces deleted: {}", r.namespaces.join(", "));
    } else {
        let _ = writeln!(o, "namespaces kept: {}", r.namespaces.join(", "));
        for row in r.rows.iter().filter_map(|x| x.kept_dir.as_ref()) {
            let _ = writeln!(o, "data directory kept: {row}");
        }
    }
    o
}

fn say(cfg: &BenchConfig, line: String) {
    if cfg.progress {
        eprintln!("{line}");
    }
}

fn fresh_names(cfg: &BenchConfig) -> Names {
    Names::new(format!(
        "bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ))
    .with_queue_type(cfg.queue_type)
}

/// Progress and stall detection for a part's wait loop.
struct Progress {
    part: String,
    total: usize,
    started: Instant,
    /// When the last progress line was printed, and how many were done then.
    last_line: (Instant, usize),
    /// When the count last moved, and to what.
    last_change: (Instant, usize),
}

/// A progress line this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(part: &str, total: usize) -> Self {
        let now = Instant::now();
        Self {
            part: part.to_string(),
            total,
            started: now,
            last_line: (now, 0),
            last_change: (now, 0),
        }
    }

    /// Prints a line when due; fails when nothing finished for the stall timeout or the
    /// part took longer than its timeout.
    fn tick(&mut self, cfg: &BenchConfig, done: usize, log: &str) -> Result<(), BenchError> {
        let now = Instant::now();
        if done != self.last_change.1 {
            self.last_change = (now, done);
        }
        let since_line = now.duration_since(self.last_line.0);
        if since_line >= PROGRESS_EVERY {
            let rate = (done - self.last_line.1) as f64 / since_line.as_secs_f64();
            say(
                cfg,
                format!(
                    "  {}: {done}/{} journeys done after {:.0}s, {:.0} tasks/s",
                    self.part,
                    self.total,
                    now.duration_since(self.started).as_secs_f64(),
                    rate * TASKS_PER_JOURNEY as f64
                ),
            );
            self.last_line = (now, done);
        }
        let unfinished = |why: String| BenchError::Unfinished {
            part: self.part.clone(),
            missing: self.total - done,
            total: self.total,
            why,
            log: log.to_string(),
        };
        if now.duration_since(self.last_change.0) >= cfg.stall_timeout {
            return Err(unfinished(format!(
                "none finished in the last {:?} (--stall-timeout)",
                cfg.stall_timeout
            )));
        }
        if now.duration_since(self.started) >= cfg.timeout {
            return Err(unfinished(format!(
                "timed out after {:?} (--timeout)",
                cfg.timeout
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The broker limit.

/// What the echo replies with and the requester sends: bodies the size of a real task
/// request and reply (signed when auth is on), built once; the loop itself neither signs
/// nor parses.
fn sample_bodies(auth: bool) -> Result<(Vec<u8>, Vec<u8>), BenchError> {
    let now = Utc::now();
    let client = "bench-000001";
    let request = Envelope::new(
        AgentRef::orchestrator(),
        AgentRef::new("infrastructure-provisioning-agent", "journeyman"),
        MessageType::Request,
        "provision_sandbox_environment",
        json!({"client_id": client, "environment_name": format!("sandbox-{client}"),
            "data_sources": ["drive", "confluence", "jira"]}),
        now,
    )
    .with_correlation(uuid::Uuid::new_v4().to_string());
    let reply = Envelope::new(
        AgentRef::new("bench-agent", "journeyman"),
        AgentRef::orchestrator(),
        MessageType::Response,
        "provision_sandbox_environment",
        json!({"status": "completed", "output": crate::sim::simulated_output(
            "provision_sandbox_environment", client, &json!({}))}),
        now,
    )
    .with_correlation(uuid::Uuid::new_v4().to_string());
    if auth {
        let key = Key::generate("bench")?;
        let orch = Signer::new(key.clone(), AgentRef::orchestrator().agent_id);
        let agent = Signer::new(key, "bench-agent");
        return Ok((
            orch.sign(request, now).to_bytes(),
            agent.sign(reply, now).to_bytes(),
        ));
    }
    Ok((request.to_bytes(), reply.to_bytes()))
}

fn step_key(step: usize) -> String {
    format!("bench.step.{step}")
}

fn amqp(op: &str) -> impl FnOnce(lapin::Error) -> BenchError {
    let op = op.to_string();
    move |source| BenchError::Broker(BrokerError::Amqp { op, source })
}

async fn broker_limit(
    cfg: &BenchConfig,
    journeys: usize,
    concurrency: usize,
) -> Result<Row, BenchError> {
    let names = fresh_names(cfg);
    say(
        cfg,
        format!(
            "broker limit: {journeys} chains of {TASKS_PER_JOURNEY} round trips, {concurrency} in flight, namespace {}",
            names.namespace
        ),
    );
    let admin = broker::connect(&cfg.amqp_url, "journeyman-bench-admin").await?;
    let mut queues = vec![names.dead_letter(), names.replies("bench")];
    queues.extend((0..TASKS_PER_JOURNEY).map(|i| names.intent_queue(&step_key(i))));
    let result = broker_limit_on(cfg, &admin, &names, journeys, concurrency).await;
    if !cfg.keep {
        broker::delete_namespace(&admin, &names, &queues).await;
    }
    let _ = admin.close(200, "bench done".into()).await;
    result
}

async fn broker_limit_on(
    cfg: &BenchConfig,
    admin: &lapin::Connection,
    names: &Names,
    journeys: usize,
    concurrency: usize,
) -> Result<Row, BenchError> {
    const PART: &str = "broker limit";
    let ch = admin
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    broker::declare_exchanges(&ch, names).await?;
    let reply_queue = names.replies("bench");
    broker::declare_queue(&ch, names, &reply_queue, None).await?;
    for i in 0..TASKS_PER_JOURNEY {
        let key = step_key(i);
        broker::declare_queue(&ch, names, &names.intent_queue(&key), Some(&key)).await?;
    }
    let (request_body, reply_body) = sample_bodies(cfg.auth)?;

    // The echo: its own consuming and publishing connections, like an agent.
    let echo_consume = broker::connect(&cfg.amqp_url, "journeyman-bench-echo-consume").await?;
    let echo_publish = broker::connect(&cfg.amqp_url, "journeyman-bench-echo-publish").await?;
    let echo_publisher = Publisher::start(&echo_publish).await?;
    let (echo_err_tx, mut echo_err) = tokio::sync::mpsc::channel::<String>(8);
    let mut echo_tasks = Vec::new();
    for i in 0..TASKS_PER_JOURNEY {
        let q = names.intent_queue(&step_key(i));
        let (chan, consumer) = broker::consume(&echo_consume, &q, "bench-echo", PREFETCH).await?;
        let task = echo(
            chan,
            consumer,
            echo_publisher.clone(),
            reply_body.clone(),
            echo_err_tx.clone(),
        );
        echo_tasks.push(AbortOnDrop(tokio::spawn(task)));
    }
    drop(echo_publisher);

    // The requester: its own connections too, like the orchestrator.
    let req_consume = broker::connect(&cfg.amqp_url, "journeyman-bench-requester-consume").await?;
    let req_publish = broker::connect(&cfg.amqp_url, "journeyman-bench-requester-publish").await?;
    let publisher = Publisher::start(&req_publish).await?;
    let (_reply_chan, mut replies) =
        broker::consume(&req_consume, &reply_queue, "bench-requester", PREFETCH).await?;

    let mut hist = new_histogram();
    let mut slots: Vec<(usize, usize, Instant)> = Vec::with_capacity(concurrency);
    let mut confirms = FuturesUnordered::new();
    let send = |slot: usize, step: usize| Outgoing {
        exchange: names.intents(),
        routing_key: step_key(step),
        mandatory: true,
        message_id: uuid::Uuid::new_v4().to_string(),
        correlation_id: Some(format!("{slot}.{step}")),
        reply_to: Some(reply_queue.clone()),
        message_type: "request".into(),
        headers: Vec::new(),
        body: request_body.clone(),
    };
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    let mut started = 0;
    for slot in 0..concurrency.min(journeys) {
        slots.push((slot, 0, Instant::now()));
        confirms.push(publisher.enqueue(send(slot, 0)).await?);
        started += 1;
    }
    let mut finished = 0;
    let mut round_trips = 0u64;
    let mut progress = Progress::new(PART, journeys);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while finished < journeys {
        tokio::select! {
            next = replies.next() => {
                let mut batch = vec![next];
                while batch.len() < 512 {
                    match replies.next().now_or_never() {
                        Some(n) => batch.push(n),
                        None => break,
                    }
                }
                let mut last = None;
                let mut next_sends = Vec::new();
                for d in batch {
                    let d = match d {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(amqp("consume replies")(e)),
                        None => return Err(failed(PART, "the reply consumer ended (queue deleted?)")),
                    };
                    let corr = d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string());
                    let parsed = corr.as_deref().and_then(|c| c.split_once('.')).and_then(|(s, t)| Some((s.parse::<usize>().ok()?, t.parse::<usize>().ok()?)));
                    if let Some((slot, step)) = parsed
                        && let Some(state) = slots.get_mut(slot)
                        && state.1 == step
                    {
                        record(&mut hist, state.2.elapsed());
                        round_trips += 1;
                        if step + 1 < TASKS_PER_JOURNEY {
                            *state = (slot, step + 1, Instant::now());
                            next_sends.push((slot, step + 1));
                        } else {
                            finished += 1;
                            if started < journeys {
                                started += 1;
                                *state = (slot, 0, Instant::now());
                                next_sends.push((slot, 0));
                            } else {
                                *state = (slot, usize::MAX, Instant::now());
                            }
                        }
                    }
                    last = Some(d);
                }
                // One multiple-ack for the batch, then the next requests, as the
                // orchestrator does after its flush.
                if let Some(d) = last {
                    d.acker.ack(BasicAckOptions { multiple: true }).await.map_err(amqp("ack replies"))?;
                }
                for (slot, step) in next_sends {
                    slots[slot].2 = Instant::now();
                    confirms.push(publisher.enqueue(send(slot, step)).await?);
                }
            }
            Some(c) = confirms.next(), if !confirms.is_empty() => check_confirm(PART, c)?,
            Some(e) = echo_err.recv() => return Err(failed(PART, format!("the echo consumer failed: {e}"))),
            _ = tick.tick() => progress.tick(cfg, finished, "(none: the broker limit runs in this process)")?,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self")
        .zip(cpu0)
        .map(|(b, a)| b - a)
        .unwrap_or(0.0);
    drop(echo_tasks);
    for c in [&echo_consume, &echo_publish, &req_consume, &req_publish] {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), c.close(200, "bench done".into())).await;
    }
    let tasks = round_trips;
    Ok(Row {
        part: PART.into(),
        namespace: names.namespace.clone(),
        journeys,
        concurrency,
        tasks,
        elapsed_s: elapsed,
        tasks_per_s: tasks as f64 / elapsed,
        journeys_per_s: finished as f64 / elapsed,
        round_trip: RoundTripSummary::of_micros(&hist),
        cpu_s: cpu,
        cpu_s_per_1k_tasks: per_1k(cpu, tasks),
        cpu_of: "bench process (requester and echo)".into(),
        bench_process_cpu_s: cpu,
        peak_rss_mib: peak_rss_kib("self").unwrap_or(0) as f64 / 1024.0,
        store_bytes: None,
        store_bytes_per_journey: None,
        store_flushed: None,
        kept_dir: None,
    })
}

/// Replies to every request with confirms and acks it once the reply is confirmed, as
/// the agent runtime does.
async fn echo(
    _chan: lapin::Channel,
    mut consumer: lapin::Consumer,
    publisher: Publisher,
    body: Vec<u8>,
    err: tokio::sync::mpsc::Sender<String>,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = consumer.next() => {
                let d = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => { let _ = err.send(e.to_string()).await; return; }
                    None => return,
                };
                let Some(reply_to) = d.properties.reply_to().as_ref().map(|r| r.as_str().to_string()) else {
                    let _ = err.send("a request without reply_to".into()).await;
                    return;
                };
                let out = Outgoing {
                    exchange: String::new(),
                    routing_key: reply_to,
                    mandatory: false,
                    message_id: uuid::Uuid::new_v4().to_string(),
                    correlation_id: d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string()),
                    reply_to: None,
                    message_type: "response".into(),
                    headers: Vec::new(),
                    body: body.clone(),
                };
                match publisher.enqueue(out).await {
                    Ok(rx) => pending.push(async move { (d, rx.await) }),
                    Err(e) => { let _ = err.send(e.to_string()).await; return; }
                }
            }
            Some((d, res)) = pending.next(), if !pending.is_empty() => {
                match res {
                    Ok(Ok(_)) => {
                        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                            let _ = err.send(e.to_string()).await;
                            return;
                        }
                    }
                    Ok(Err(e)) => { let _ = err.send(e.to_string()).await; return; }
                    Err(_) => { let _ = err.send("the publisher stopped".into()).await; return; }
                }
            }
        }
    }
}

type Confirm = Result<Result<Published, BrokerError>, oneshot::error::RecvError>;

fn check_confirm(part: &str, c: Confirm) -> Result<(), BenchError> {
    match c {
        Ok(Ok(Published::Confirmed)) => Ok(()),
        Ok(Ok(Published::Unroutable)) => Err(failed(
            part,
            "a message was unroutable: the bench's topology is missing",
        )),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(BrokerError::PublisherGone.into()),
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn new_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .expect("constant, valid histogram bounds")
}

fn record(h: &mut hdrhistogram::Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

fn per_1k(cpu_s: f64, tasks: u64) -> f64 {
    if tasks == 0 {
        0.0
    } else {
        cpu_s * 1000.0 / tasks as f64
    }
}

// ---------------------------------------------------------------------------------------
// The orchestrator.

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

async fn orchestrator_part(
    cfg: &BenchConfig,
    shape: Shape,
    journeys: usize,
    concurrency: usize,
) -> Result<Row, BenchError> {
    let names = fresh_names(cfg);
    let part = format!("orchestrator {}", shape.as_str());
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
    let intents: Vec<String> = JOURNEY_INTENTS
        .iter()
        .map(|s| s.to_string())
        .chain(playbook.intents())
        .collect();
    let mut queues: Vec<String> = intents.iter().map(|i| names.intent_queue(i)).collect();
    queues.push(names.dead_letter());
    queues.push(names.replies("0"));
    let result = orchestrator_on(
        cfg,
        &admin,
        &names,
        &part,
        &playbook,
        shape,
        tmp.path(),
        journeys,
        concurrency,
    )
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
        Err(e) => {
            // Kept for its log, which the error names.
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
) -> Result<Row, BenchError> {
    let ch = admin
        .create_channel()
        .await
        .map_err(amqp("create channel"))?;
    let intents = JOURNEY_INTENTS
        .iter()
        .map(|s| s.to_string())
        .chain(playbook.intents());
    // Declared here too, so the first commands are routable before the orchestrator runs.
    broker::declare_topology(&ch, names, intents).await?;
    broker::declare_queue(&ch, names, &names.replies("0"), None).await?;

    let playbook_file = dir.join("playbook.yaml");
    std::fs::write(&playbook_file, shape.yaml()).map_err(io("cannot write the playbook"))?;
    let store_dir = dir.join("store");
    let log = dir.join("orchestrator.log");
    let key = if cfg.auth {
        Some(Key::generate("bench")?)
    } else {
        None
    };
    let port = free_port().map_err(io("cannot find a free loopback port"))?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut orch = spawn_orchestrator(
        cfg,
        names,
        &store_dir,
        &playbook_file,
        &log,
        addr,
        key.as_ref(),
    )?;
    let log_name = log.display().to_string();

    // Simulated agents: no latency, no failures, in this process.
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent_stats = Arc::new(AgentStats::default());
    let ring = match &key {
        Some(k) => Some(Arc::new(Keyring::new(vec![k.clone()])?)),
        None => None,
    };
    let config = AgentConfig {
        amqp_url: cfg.amqp_url.clone(),
        names: names.clone(),
        agent_id: "bench-agent".into(),
        intents: playbook.intents().into_iter().collect(),
        prefetch: PREFETCH,
        max_message_bytes: crate::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        keyring: ring,
        signing_key: key.clone(),
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
    let http = crate::http::client::Client::new(addr, Duration::from_secs(10));
    wait_ready(part, &mut orch, &http, READY_TIMEOUT).await?;

    let watch_conn = broker::connect(&cfg.amqp_url, "journeyman-bench-watch").await?;
    let (_watch, mut events) = broker::watch_events_on(
        &watch_conn,
        names,
        &["work.completed", "work.failed", "journey.paused"],
    )
    .await?;
    let publish_conn = broker::connect(&cfg.amqp_url, "journeyman-bench-publish").await?;
    let publisher = Publisher::start(&publish_conn).await?;
    let upstream = key.as_ref().map(|k| {
        Signer::new(k.clone(), "journeyman-bench").with_ttl(Duration::from_secs(24 * 3600))
    });
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
        Outgoing {
            exchange: names.intents(),
            routing_key: "journey.start".into(),
            mandatory: true,
            message_id: env.message_id.to_string(),
            correlation_id: None,
            reply_to: None,
            message_type: "request".into(),
            headers: Vec::new(),
            body: env.to_bytes(),
        }
    };

    let cpu0 = cpu_seconds(&orch.pid.to_string());
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
            status = orch.child.wait() => {
                return Err(failed(part, format!(
                    "the orchestrator exited ({}) with {} of {journeys} journeys finished; last lines of {log_name}:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    finished,
                    orch.log_tail()
                )));
            }
            _ = tick.tick() => progress.tick(cfg, finished, &log_name)?,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&orch.pid.to_string())
        .zip(cpu0)
        .map(|(b, a)| b - a)
        .unwrap_or(0.0);
    let self_cpu = cpu_seconds("self")
        .zip(self0)
        .map(|(b, a)| b - a)
        .unwrap_or(0.0);
    let peak_rss = peak_rss_kib(&orch.pid.to_string()).unwrap_or(0) as f64 / 1024.0;
    let stats: StatsView = http.get("/api/stats").await?;
    let tasks = stats.counters.get("tasks_completed").copied().unwrap_or(0);

    // Stop the orchestrator (it flushes its store on the way out), then the agents.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(orch.pid as libc::pid_t, libc::SIGTERM);
    }
    let flushed = match tokio::time::timeout(Duration::from_secs(60), orch.child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = orch.child.kill().await;
            false
        }
    };
    let _ = stop_tx.send(true);
    let mut agents = agents;
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut agents.0).await;
    drop(agents);
    for c in [&watch_conn, &publish_conn] {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), c.close(200, "bench done".into())).await;
    }
    let store_bytes = dir_size(&store_dir).map_err(io("cannot measure the data directory"))?;
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
        kept_dir: None,
    })
}

fn spawn_orchestrator(
    cfg: &BenchConfig,
    names: &Names,
    store_dir: &Path,
    playbook: &Path,
    log: &Path,
    addr: std::net::SocketAddr,
    key: Option<&Key>,
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
        .arg("--orchestrator-id")
        .arg("0")
        .arg("--prefetch")
        .arg(PREFETCH.to_string())
        .arg("--no-auto-promote")
        .env("JOURNEYMAN_AMQP_URL", &cfg.amqp_url)
        .env("RUST_LOG", "warn")
        // Nothing of the caller's own deployment leaks into the measured process.
        .env_remove(crate::auth::KEYS_FILE_ENV)
        .env_remove("JOURNEYMAN_WEBHOOK_URL")
        .env_remove("JOURNEYMAN_WEBHOOK_TOKEN")
        .env_remove("JOURNEYMAN_ALLOW_LIST")
        .env_remove("JOURNEYMAN_FAILPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    match key {
        Some(k) => {
            cmd.env(crate::auth::KEYS_ENV, k.expose_line());
        }
        None => {
            cmd.env_remove(crate::auth::KEYS_ENV)
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
    http: &crate::http::client::Client,
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

/// The sum of the sizes of the files under `path`.
pub fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------
// /proc readers.

/// User + system CPU seconds of `pid` ("self" for this process) from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(ticks as f64 / hz)
}

/// utime + stime (clock ticks) from a /proc/<pid>/stat line: fields 14 and 15, counted
/// after the command name, which may itself hold spaces and parentheses.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set in KiB (VmHWM) of `pid` ("self" for this process).
fn peak_rss_kib(pid: &str) -> Option<u64> {
    parse_vm_hwm_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// The broker's version, from its greeting.

/// The broker's product and version from the server properties of its `connection.start`
/// (lapin does not keep them): a bare handshake that reads the greeting and hangs up.
/// "unknown" over TLS or when anything goes wrong; the bench does not depend on it.
async fn broker_version(url: &str) -> String {
    let Ok(uri) = url.parse::<lapin::uri::AMQPUri>() else {
        return "unknown".into();
    };
    if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
        return "unknown (TLS)".into();
    }
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut header = [0u8; 7];
        s.read_exact(&mut header)?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if size > 1 << 20 {
            return Err(std::io::Error::other("frame too large"));
        }
        let mut payload = vec![0u8; size];
        s.read_exact(&mut payload)?;
        Ok(payload)
    });
    match read.await {
        Ok(Ok(payload)) => match parse_connection_start(&payload) {
            Some((product, version)) => format!("{product} {version}"),
            None => "unknown".into(),
        },
        _ => "unknown".into(),
    }
}

/// (product, version) from a `connection.start` method frame's payload (class 10,
/// method 10, two version octets, then the server properties table).
pub fn parse_connection_start(payload: &[u8]) -> Option<(String, String)> {
    if !payload.starts_with(&[0, 10, 0, 10]) {
        return None;
    }
    let mut r = Reader(payload.get(6..)?);
    let len = r.u32()? as usize;
    let mut t = Reader(r.take(len)?);
    let (mut product, mut version) = (None, None);
    while !t.0.is_empty() {
        let klen = t.u8()? as usize;
        let key = String::from_utf8_lossy(t.take(klen)?).into_owned();
        let kind = t.u8()?;
        let value = t.value(kind)?;
        match key.as_str() {
            "product" => product = value,
            "version" => version = value,
            _ => {}
        }
    }
    Some((product?, version?))
}

/// A cursor over AMQP field-table bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn skip(&mut self, n: usize) -> Option<Option<String>> {
        self.take(n).map(|_| None)
    }
    /// Reads a field value of type `kind`; long strings are returned, the rest skipped.
    fn value(&mut self, kind: u8) -> Option<Option<String>> {
        let skip = Self::skip;
        match kind {
            b'S' => {
                let n = self.u32()? as usize;
                Some(Some(String::from_utf8_lossy(self.take(n)?).into_owned()))
            }
            b'F' | b'A' | b'x' => {
                let n = self.u32()? as usize;
                skip(self, n)
            }
            b't' | b'b' | b'B' => skip(self, 1),
            b's' | b'u' => skip(self, 2),
            b'I' | b'i' | b'f' => skip(self, 4),
            b'l' | b'L' | b'd' | b'T' => skip(self, 8),
            b'D' => skip(self, 5),
            b'V' => Some(None),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journeys_lists_parse() {
        assert_eq!(parse_journeys("2000"), Ok(vec![2000]));
        assert_eq!(
            parse_journeys("1000,10000,100000"),
            Ok(vec![1000, 10_000, 100_000])
        );
        assert_eq!(
            parse_journeys("1k, 10_000,100K"),
            Ok(vec![1000, 10_000, 100_000])
        );
        assert!(parse_journeys("0").is_err());
        assert!(parse_journeys("10,x").unwrap_err().contains("'x'"));
        assert!(parse_journeys("").is_err());
        assert!(parse_journeys("1000,").is_err());
    }

    #[test]
    fn bench_playbooks_are_the_four_tasks_as_a_chain_and_with_two_branches() {
        let chain = Playbook::from_yaml(CHAIN_PLAYBOOK).unwrap();
        let parallel = Playbook::from_yaml(PARALLEL_PLAYBOOK).unwrap();
        for p in [&chain, &parallel] {
            assert_eq!(p.stages.len(), 1);
            assert_eq!(p.stages["sandbox"].tasks.len(), TASKS_PER_JOURNEY);
            assert_eq!(p.intents().len(), TASKS_PER_JOURNEY);
        }
        let deps = |p: &Playbook, t: &str| p.stages["sandbox"].task(t).unwrap().depends_on.clone();
        assert_eq!(
            deps(&chain, "provision-test-data"),
            vec!["install-connectors"]
        );
        assert_eq!(
            deps(&parallel, "provision-test-data"),
            vec!["provision-infra"]
        );
        assert_eq!(
            deps(&parallel, "run-security-scan"),
            vec!["install-connectors", "provision-test-data"]
        );
    }

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (journey man (x)) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 5000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let status =
            "Name:\tjourneyman\nVmPeak:\t  300000 kB\nVmHWM:\t   65536 kB\nVmRSS:\t   60000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(65536));
        assert_eq!(parse_vm_hwm_kib("Name: x\n"), None);
        // This process has both.
        assert!(cpu_seconds("self").is_some());
        assert!(peak_rss_kib("self").unwrap() > 0);
    }

    #[test]
    fn the_brokers_greeting_gives_its_version() {
        let mut table = Vec::new();
        let mut field = |key: &str, kind: u8, value: &[u8]| {
            table.push(key.len() as u8);
            table.extend_from_slice(key.as_bytes());
            table.push(kind);
            table.extend_from_slice(value);
        };
        let long = |s: &str| {
            let mut v = (s.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(s.as_bytes());
            v
        };
        let mut caps = Vec::new();
        caps.push(9u8);
        caps.extend_from_slice(b"basic.ack");
        caps.push(b't');
        caps.push(1);
        let mut nested = (caps.len() as u32).to_be_bytes().to_vec();
        nested.extend_from_slice(&caps);
        field("capabilities", b'F', &nested);
        field("cluster_name", b'S', &long("rabbit@host"));
        field("product", b'S', &long("RabbitMQ"));
        field("version", b'S', &long("3.10.8"));
        let mut payload = vec![0, 10, 0, 10, 0, 9];
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        payload.extend_from_slice(&long("PLAIN AMQPLAIN"));
        assert_eq!(
            parse_connection_start(&payload),
            Some(("RabbitMQ".into(), "3.10.8".into()))
        );
        assert_eq!(parse_connection_start(&payload[..20]), None);
        assert_eq!(parse_connection_start(&[0, 10, 0, 11, 0, 9]), None);
    }

    fn row(part: &str, journeys: usize, tasks_per_s: f64, p99: f64, rss: f64) -> Row {
        Row {
            part: part.into(),
            namespace: format!("bench-{part}"),
            journeys,
            concurrency: journeys.min(1000),
            tasks: (journeys * 4) as u64,
            elapsed_s: (journeys * 4) as f64 / tasks_per_s,
            tasks_per_s,
            journeys_per_s: tasks_per_s / 4.0,
            round_trip: RoundTripSummary {
                count: (journeys * 4) as u64,
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                p999_ms: p99 * 1.5,
                max_ms: p99 * 2.0,
                mean_ms: p99 / 2.0,
            },
            cpu_s: 2.0,
            cpu_s_per_1k_tasks: 0.25,
            cpu_of: "x".into(),
            bench_process_cpu_s: 1.0,
            peak_rss_mib: rss,
            store_bytes: (part != "broker limit").then_some(journeys as u64 * 10_000),
            store_bytes_per_journey: (part != "broker limit").then_some(10_000.0),
            store_flushed: (part != "broker limit").then_some(true),
            kept_dir: None,
        }
    }

    fn config(journeys: Vec<usize>) -> BenchConfig {
        BenchConfig {
            amqp_url: String::new(),
            binary: PathBuf::new(),
            journeys,
            concurrency: 1000,
            queue_type: QueueType::Quorum,
            part: Part::All,
            variant: Variant::Both,
            auth: true,
            keep: false,
            timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            progress: false,
        }
    }

    #[test]
    fn the_default_report_has_the_ratio_and_the_targets() {
        let rows = vec![
            row("broker limit", 2000, 3200.0, 400.0, 30.0),
            row("orchestrator chain", 2000, 2400.0, 700.0, 60.0),
            row("orchestrator parallel", 2000, 2000.0, 900.0, 61.0),
        ];
        let r = assemble(
            2,
            "RabbitMQ 3.10.8".into(),
            &config(vec![2000]),
            rows,
            vec![],
            true,
        );
        assert_eq!(r.ratios["chain"], 0.75);
        assert_eq!(r.ratios["parallel"], 0.625);
        let text = render_text(&r);
        assert!(text.contains("\nratio: 0.75\n"), "{text}");
        assert!(
            text.contains("\nratio (parallel): 0.62\n")
                || text.contains("\nratio (parallel): 0.63\n"),
            "{text}"
        );
        assert!(text.contains("sled bytes per journey: 10000 ("), "{text}");
        assert!(
            text.contains(
                "target tasks/s ≥ 0.7 × limit: met (chain 0.75 met, parallel 0.62 not met)"
            ) || text.contains(
                "target tasks/s ≥ 0.7 × limit: met (chain 0.75 met, parallel 0.63 not met)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "target p99 within 2 × limit p99: met (chain 1.75× met, parallel 2.25× not met)"
            ),
            "{text}"
        );
        assert!(text.contains("nproc 2, broker RabbitMQ 3.10.8"), "{text}");
        assert!(r.scale.is_empty());
        // The JSON has every part.
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), 3);
        assert_eq!(v["queue_type"], "quorum");
    }

    #[test]
    fn the_scale_report_compares_each_size_with_the_first() {
        let rows = vec![
            row("orchestrator chain", 1000, 2000.0, 100.0, 50.0),
            row("orchestrator chain", 10_000, 1900.0, 100.0, 80.0),
            row("orchestrator chain", 100_000, 1500.0, 100.0, 300.0),
        ];
        let mut cfg = config(vec![1000, 10_000, 100_000]);
        cfg.part = Part::Orchestrator;
        cfg.variant = Variant::Chain;
        let r = assemble(2, "RabbitMQ 3.10.8".into(), &cfg, rows, vec![], true);
        assert_eq!(r.scale.len(), 3);
        assert_eq!(r.scale[1].relative_throughput, 0.95);
        assert!(r.ratios.is_empty(), "no broker limit, no ratio");
        let text = render_text(&r);
        assert!(
            text.contains("target chain peak RSS at 100000 journeys ≤ 256 MiB: not met"),
            "{text}"
        );
        assert!(
            text.contains(
                "target chain throughput at 100000 journeys within 20 % of 1000: not met (0.75)"
            ),
            "{text}"
        );
        assert!(!text.contains("ratio:"), "{text}");
    }
}
