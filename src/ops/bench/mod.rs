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
//! (parsing, /proc readers, the AMQP greeting, the text report) are tested in their modules.
//!
//! Files: `limit` (the broker limit), `orchestrated` (the orchestrator as a child process),
//! `report` (rows, ratios, targets, the text), `probe` (/proc, data directory size, the
//! broker's version).

mod limit;
mod orchestrated;
mod probe;
mod report;

pub use probe::{dir_size, parse_connection_start, parse_stat_cpu_ticks, parse_vm_hwm_kib};
pub use report::{BenchReport, Row, ScaleRow, Target, render_text};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::broker::{self, BrokerError, Names, Published, QueueType};
use crate::domain::playbook::PlaybookError;

/// The chain variant's playbook: DES-002 §3.2's four tasks, A → B → C → D.
pub const CHAIN_PLAYBOOK: &str = include_str!("../../../playbooks/bench-chain.yaml");
/// The parallel variant's playbook: A → {B, C} → D.
pub const PARALLEL_PLAYBOOK: &str = include_str!("../../../playbooks/bench-parallel.yaml");
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
    Key(#[from] crate::wire::auth::KeyError),
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
    Api(#[from] crate::http::client::ClientError),
    #[error(
        "interrupted (SIGINT or SIGTERM); the run's queues and exchanges were deleted and its orchestrator stopped"
    )]
    Interrupted,
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
    #[arg(long, default_value = "10m", value_parser = crate::ops::settings::duration)]
    pub timeout: Duration,
    /// Give up on a part when no journey finished for this long.
    #[arg(long, default_value = "60s", value_parser = crate::ops::settings::duration)]
    pub stall_timeout: Duration,
    /// After the chain part, keep its journeys and stream evidence updates at them for this
    /// long, sampling the data directory: shows whether the disk levels off (e.g. 60s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub soak: Option<Duration>,
    /// Orchestrator replicas to measure the orchestrator parts with, comma-separated: each
    /// count is one row (e.g. 1,2,3). More than one needs the consistent-hash exchange;
    /// on a broker without it the bench runs on a private RabbitMQ node of its own.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub orchestrators: Vec<u16>,
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
    /// Evidence updates after the chain part, for this long (`--soak`).
    pub soak: Option<Duration>,
    /// Orchestrator replica counts, one row each.
    pub orchestrators: Vec<u16>,
    /// A progress line on stderr every few seconds.
    pub progress: bool,
    /// Turns true on SIGINT/SIGTERM: the part in progress stops and cleans up.
    pub interrupt: tokio::sync::watch::Receiver<bool>,
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
            soak: a.soak,
            orchestrators: if a.orchestrators.is_empty() {
                vec![1]
            } else {
                a.orchestrators.clone()
            },
            progress: true,
            interrupt: never_interrupted(),
        }
    }

    /// Runs `part` unless interrupted first; dropping it stops what it started (the
    /// orchestrator child is killed on drop), and the caller then deletes the namespace.
    pub(super) async fn interruptible<T>(
        &self,
        part: impl std::future::Future<Output = Result<T, BenchError>>,
    ) -> Result<T, BenchError> {
        let mut interrupt = self.interrupt.clone();
        tokio::select! {
            r = part => r,
            Ok(_) = interrupt.wait_for(|v| *v) => Err(BenchError::Interrupted),
        }
    }

    pub(super) fn scale(&self) -> bool {
        self.journeys.len() > 1
    }
}

/// An interrupt that never comes: its sender is gone, which disables the interrupt
/// branch in [`BenchConfig::interruptible`].
pub fn never_interrupted() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(false).1
}

/// Runs what the configuration asks and reports it.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let broker_version = probe::broker_version(&cfg.amqp_url).await;
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
        rows.push(limit::broker_limit(cfg, first, cfg.concurrency.min(first)).await?);
    }
    if cfg.part.orchestrator() {
        for shape in cfg.variant.shapes() {
            for &n in &cfg.journeys {
                let concurrency = if cfg.scale() {
                    n
                } else {
                    cfg.concurrency.min(n)
                };
                for &replicas in &cfg.orchestrators {
                    rows.push(
                        orchestrated::orchestrator_part(cfg, shape, n, concurrency, replicas)
                            .await?,
                    );
                }
            }
        }
    }
    let namespaces = rows.iter().map(|r| r.namespace.clone()).collect();
    Ok(report::assemble(
        nproc,
        broker_version,
        cfg,
        rows,
        namespaces,
        !cfg.keep,
    ))
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

fn amqp(op: &str) -> impl FnOnce(lapin::Error) -> BenchError {
    let op = op.to_string();
    move |source| BenchError::Broker(BrokerError::Amqp { op, source })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::playbook::Playbook;

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
}
