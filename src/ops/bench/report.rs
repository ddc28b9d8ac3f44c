//! The bench's results: one row per measured part, the ratios to the broker limit, the
//! targets of the issue, the scale run's rows, and the text for people. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    BenchConfig, Shape, TARGET_P99_FACTOR, TARGET_RATIO, TARGET_RSS_MIB, TARGET_SCALE_THROUGHPUT,
};
use crate::broker::QueueType;
use crate::orchestrator::stats::RoundTripSummary;

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
    /// Key and value bytes of the records per journey (the store's census).
    #[serde(default)]
    pub live_bytes_per_journey: Option<f64>,
    /// Where the data directory was kept (--keep).
    pub kept_dir: Option<String>,
    /// The soak after the run (`--soak`): the data directory sampled while evidence
    /// updates stream at the finished journeys.
    #[serde(default)]
    pub soak: Vec<SoakSample>,
    /// Live record bytes after the soak (the census), when there was one.
    #[serde(default)]
    pub soak_live_bytes: Option<u64>,
}

/// One sample of the soak.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SoakSample {
    pub at_s: f64,
    /// Evidence updates confirmed by the broker so far.
    pub updates: u64,
    pub store_bytes: u64,
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

/// The ratios, targets and scale rows from the measured rows (pure).
pub(super) fn assemble(
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

pub(super) const MIB: f64 = 1024.0 * 1024.0;

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
        if let Some(live) = first.live_bytes_per_journey {
            let _ = writeln!(
                o,
                "live record bytes per journey: {} (journey, history, dedup marks, correlations; the rest of the directory is superseded versions in sled's append-only log)",
                live.round() as u64
            );
        }
    }
    for row in r.rows.iter().filter(|x| !x.soak.is_empty()) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let samples: Vec<String> = row
            .soak
            .iter()
            .map(|s| {
                format!(
                    "{:.0}s {} upd {:.1} MiB",
                    s.at_s,
                    s.updates,
                    mib(s.store_bytes)
                )
            })
            .collect();
        let _ = writeln!(o, "soak ({}): {}", row.part, samples.join(" | "));
        if let (Some(first), Some(last)) = (row.soak.first(), row.soak.last()) {
            let half = &row.soak[row.soak.len() / 2];
            let per_update = |a: &SoakSample, b: &SoakSample| {
                (b.store_bytes as f64 - a.store_bytes as f64)
                    / (b.updates - a.updates).max(1) as f64
            };
            let _ = writeln!(
                o,
                "soak disk growth per update: {:.0} bytes over the whole soak, {:.0} over its second half{}",
                per_update(first, last),
                per_update(half, last),
                match row.soak_live_bytes {
                    Some(live) => format!(
                        "; live records after it {:.1} MiB, on disk {:.1} MiB ({:.1}x)",
                        mib(live),
                        mib(last.store_bytes),
                        last.store_bytes as f64 / live.max(1) as f64
                    ),
                    None => String::new(),
                }
            );
        }
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::ops::bench::{Part, Variant};

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
            live_bytes_per_journey: (part != "broker limit").then_some(4_000.0),
            kept_dir: None,
            soak: Vec::new(),
            soak_live_bytes: None,
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
            soak: None,
            orchestrators: vec![1],
            progress: false,
            interrupt: super::super::never_interrupted(),
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
