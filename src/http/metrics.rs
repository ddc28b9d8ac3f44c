//! `/metrics` in the Prometheus text format (version 0.0.4), encoded by `prometheus-client`.
//!
//! Three sources, one exposition: the orchestrator's [`Stats`] counters (read on scrape),
//! gauges computed from the store on scrape (journeys by stage and status, outbox depth),
//! and [`Metrics`], labelled counters and a histogram that the core increments where it
//! knows the intent or the reason. The core keeps counting into its own atomics (no
//! registry on the hot path); each scrape copies them into a [`Snapshot`], a
//! `prometheus-client` collector, so names, escaping and the format are the library's.
//!
//! A fleet scrapes several replicas: every orchestrator metric carries `replica` (the
//! orchestrator id), and `journeyman_replica_info` says which replica of how many it is
//! and which partitions it owns.
//!
//! This module renders; it makes no decisions and never writes the store.

use std::collections::BTreeMap;
use std::fmt::Write;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use crate::orchestrator::stats::RoundTripSummary;
use crate::orchestrator::stats::{Metrics, ROUND_TRIP_BUCKETS, Stats};

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What the store says at scrape time.
#[derive(Debug, Default, Clone)]
pub struct StoreGauges {
    /// (stage, status) → journeys.
    pub journeys: BTreeMap<(String, String), u64>,
    pub outbox_depth: u64,
}

/// Writes every metric in the Prometheus text format.
pub fn render(stats: &Stats, metrics: &Metrics, gauges: &StoreGauges, ready: bool) -> String {
    let identity = stats.identity();
    let partitions = stats
        .partitions
        .get()
        .map(|p| p.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let mut registry = Registry::default();
    registry.register(
        "journeyman_replica",
        "Which replica of the orchestrator fleet this is, and the partitions it owns (empty until connected)",
        Info::new(vec![
            ("replica", identity.id.clone()),
            ("index", identity.replica.index.to_string()),
            ("replicas", identity.replica.count.to_string()),
            ("partitions", partitions),
        ]),
    );
    let snapshot = Snapshot::take(stats, metrics, gauges, ready);
    let summary = snapshot.summary.clone();
    registry
        .sub_registry_with_label(("replica".into(), identity.id.clone().into()))
        .register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    summary.write(&mut out, &identity.id);
    out
}

/// A labelled counter: name without `_total`, help, label names, label values → count.
type Family = (
    &'static str,
    &'static str,
    &'static [&'static str],
    BTreeMap<Vec<String>, u64>,
);

/// A histogram's per-bucket counts (upper bound, count), its count and its sum.
type RoundTrips = (Vec<(f64, u64)>, u64, f64);

/// Every orchestrator metric's value at one scrape: a collector over copies, so the
/// encoder holds no lock of the core's.
#[derive(Debug)]
struct Snapshot {
    up: u64,
    journeys: BTreeMap<(String, String), u64>,
    outbox_depth: u64,
    /// (name without `_total`, help, value).
    totals: Vec<(&'static str, &'static str, u64)>,
    families: Vec<Family>,
    /// Intent → its histogram.
    round_trip: BTreeMap<String, RoundTrips>,
    summary: Summary,
}

impl Snapshot {
    fn take(stats: &Stats, metrics: &Metrics, gauges: &StoreGauges, ready: bool) -> Self {
        let c = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
        let rollbacks = c(&stats.rollbacks_started);
        let totals = vec![
            (
                "journeyman_journeys_started",
                "Journeys started.",
                c(&stats.journeys_started),
            ),
            (
                "journeyman_promotions",
                "Stage promotions (Sandbox to Pilot, Pilot to Production).",
                c(&stats.promotions),
            ),
            (
                "journeyman_works_failed",
                "Units of work failed after retries.",
                c(&stats.works_failed),
            ),
            (
                "journeyman_pauses",
                "Journeys paused by failed work.",
                c(&stats.pauses),
            ),
            (
                "journeyman_resumes",
                "Paused journeys or failed rollbacks resumed.",
                c(&stats.resumes),
            ),
            (
                "journeyman_dead_letters",
                "Messages dead-lettered by the orchestrator (refused input, failed work).",
                c(&stats.dead_letters),
            ),
            (
                "journeyman_duplicates",
                "Redelivered messages absorbed by the dedup marks.",
                c(&stats.duplicates),
            ),
            (
                "journeyman_stale_replies",
                "Replies ignored: late, for a superseded attempt, or unknown.",
                c(&stats.stale_replies),
            ),
            (
                "journeyman_conflicts",
                "Messages reusing a handled message id with other content (dead-lettered).",
                c(&stats.conflicts),
            ),
            (
                "journeyman_refusals",
                "Journey commands refused (invalid transition, unknown client, ...).",
                c(&stats.refusals),
            ),
            ("journeyman_inputs", "Deliveries handled.", c(&stats.inputs)),
            (
                "journeyman_flushes",
                "Store flushes (one per group of inputs: group commit).",
                c(&stats.flushes),
            ),
            (
                "journeyman_tasks_completed",
                "Task attempts that completed.",
                c(&stats.tasks_completed),
            ),
            (
                "journeyman_tasks_dispatched",
                "Task requests dispatched (first attempts and retries).",
                c(&stats.tasks_dispatched),
            ),
            (
                "journeyman_tasks_retried",
                "Task attempts after the first.",
                c(&stats.retries),
            ),
        ];
        let fixed = |pairs: &[(&str, u64)]| -> BTreeMap<Vec<String>, u64> {
            pairs
                .iter()
                .map(|(k, v)| (vec![k.to_string()], *v))
                .collect()
        };
        let families = vec![
            (
                "journeyman_transitions",
                "Journey state transitions by kind.",
                &["kind"][..],
                fixed(&[
                    ("promote", c(&stats.promotions)),
                    ("rollback_started", rollbacks),
                    ("rollback_completed", c(&stats.rollbacks_completed)),
                ]),
            ),
            (
                "journeyman_gate_evaluations",
                "Exit-gate evaluations by result.",
                &["result"][..],
                fixed(&[
                    ("passed", c(&stats.gate_passed)),
                    ("failed", c(&stats.gate_failed)),
                ]),
            ),
            (
                "journeyman_rollbacks",
                "Rollbacks by outcome: started (any), automatic (fired by a trigger), completed, failed.",
                &["outcome"][..],
                fixed(&[
                    ("started", rollbacks),
                    ("automatic", c(&stats.rollbacks_automatic)),
                    ("completed", c(&stats.rollbacks_completed)),
                    ("failed", c(&stats.rollbacks_failed)),
                ]),
            ),
            (
                "journeyman_rollbacks_by_reason",
                "Rollbacks started, by reason and whether a trigger fired them.",
                &["reason", "automatic"][..],
                metrics.rollbacks.snapshot(),
            ),
            (
                "journeyman_task_outcomes",
                "Tasks by intent and outcome (dispatched, completed, failed, retried).",
                &["intent", "outcome"][..],
                metrics.tasks.snapshot(),
            ),
            (
                "journeyman_dead_letters_by_reason",
                "Dead letters by reason code.",
                &["reason"][..],
                metrics.dead_letters.snapshot(),
            ),
        ];
        let round_trip = metrics
            .round_trip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(intent, h)| {
                let buckets = ROUND_TRIP_BUCKETS.iter().copied().zip(h.buckets).collect();
                (intent.clone(), (buckets, h.count, h.sum))
            })
            .collect();
        let summary = {
            let q = metrics
                .round_trip_quantiles
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            Summary {
                quantiles: RoundTripSummary::of_micros(&q.micros),
                sum: q.sum_secs,
            }
        };
        Self {
            up: u64::from(ready),
            journeys: gauges.journeys.clone(),
            outbox_depth: gauges.outbox_depth,
            totals,
            families,
            round_trip,
            summary,
        }
    }
}

/// `prometheus-client` ends every help text with a full stop; ours already have one.
fn help(h: &str) -> &str {
    h.strip_suffix('.').unwrap_or(h)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        e.encode_descriptor(
            "journeyman_up",
            help("1 while the orchestrator is connected, consuming and its store is open."),
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.up as i64))?;
        let mut m = e.encode_descriptor(
            "journeyman_journeys",
            help("Journeys in the store by stage and status (computed on scrape)."),
            None,
            MetricType::Gauge,
        )?;
        for ((stage, status), n) in &self.journeys {
            m.encode_family(&[("stage", stage.as_str()), ("status", status.as_str())])?
                .encode_gauge(&(*n as i64))?;
        }
        e.encode_descriptor(
            "journeyman_outbox_depth",
            help("Messages recorded but not yet confirmed by the broker."),
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.outbox_depth as i64))?;
        for (name, h, v) in &self.totals {
            e.encode_descriptor(name, help(h), None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
        for (name, h, label_names, values) in &self.families {
            let mut m = e.encode_descriptor(name, help(h), None, MetricType::Counter)?;
            for (labels, v) in values {
                let pairs: Vec<(&str, &str)> = label_names
                    .iter()
                    .copied()
                    .zip(labels.iter().map(String::as_str))
                    .collect();
                m.encode_family(&pairs)?
                    .encode_counter::<NoLabelSet, _, u64>(v, None)?;
            }
        }
        let mut m = e.encode_descriptor(
            "journeyman_task_round_trip_seconds",
            help("Task round trip by intent: an attempt's dispatch to its reply."),
            None,
            MetricType::Histogram,
        )?;
        for (intent, (buckets, count, sum)) in &self.round_trip {
            m.encode_family(&[("intent", intent.as_str())])?
                .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
        }
        Ok(())
    }
}

/// The round trips over all intents as a Prometheus summary: quantiles a scraper cannot
/// interpolate from the histogram's buckets (p99.9 at millisecond resolution).
/// `prometheus-client` has no summary type, so these few lines are written here, in the
/// same format and with the same `replica` label.
#[derive(Debug, Clone)]
struct Summary {
    quantiles: RoundTripSummary,
    sum: f64,
}

impl Summary {
    fn write(&self, o: &mut String, replica: &str) {
        let name = "journeyman_task_round_trip_quantiles_seconds";
        let r = escape(replica);
        let _ = writeln!(
            o,
            "# HELP {name} Task round trip over all intents (dispatch to reply applied), quantiles since start."
        );
        let _ = writeln!(o, "# TYPE {name} summary");
        let s = &self.quantiles;
        if s.count > 0 {
            for (quantile, ms) in [("0.5", s.p50_ms), ("0.99", s.p99_ms), ("0.999", s.p999_ms)] {
                let _ = writeln!(
                    o,
                    "{name}{{replica=\"{r}\",quantile=\"{quantile}\"}} {}",
                    ms / 1000.0
                );
            }
        }
        let _ = writeln!(o, "{name}_sum{{replica=\"{r}\"}} {}", self.sum);
        let _ = writeln!(o, "{name}_count{{replica=\"{r}\"}} {}", s.count);
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `series` written without the `replica` label every series carries.
    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines().find_map(|l| {
            let l = l
                .replace("{replica=\"0\"}", "")
                .replace("replica=\"0\",", "");
            l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()
        })
    }

    #[test]
    fn renders_totals_families_and_histograms() {
        use std::time::Duration;
        let stats = Stats::default();
        Stats::get(&stats.promotions);
        stats
            .promotions
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let m = Metrics::default();
        m.task_dispatched("connector.configure");
        m.task_dispatched("connector.configure");
        m.task_completed("connector.configure");
        m.observe_round_trip("connector.configure", Duration::from_millis(30));
        m.dead_letter("schema_violation");
        m.rollback_started("precision \"dropped\"", true);
        let mut g = StoreGauges::default();
        g.journeys.insert(("pilot".into(), "running".into()), 3);
        g.outbox_depth = 4;
        let text = render(&stats, &m, &g, true);
        assert_eq!(value(&text, "journeyman_up"), Some(1));
        assert_eq!(
            value(
                &text,
                "journeyman_journeys{stage=\"pilot\",status=\"running\"}"
            ),
            Some(3)
        );
        assert_eq!(value(&text, "journeyman_outbox_depth"), Some(4));
        assert_eq!(
            value(&text, "journeyman_transitions_total{kind=\"promote\"}"),
            Some(2)
        );
        assert_eq!(
            value(
                &text,
                "journeyman_task_outcomes_total{intent=\"connector.configure\",outcome=\"dispatched\"}"
            ),
            Some(2)
        );
        assert_eq!(
            value(
                &text,
                "journeyman_task_round_trip_seconds_bucket{intent=\"connector.configure\",le=\"0.025\"}"
            ),
            Some(0)
        );
        assert_eq!(
            value(
                &text,
                "journeyman_task_round_trip_seconds_bucket{intent=\"connector.configure\",le=\"0.05\"}"
            ),
            Some(1)
        );
        assert!(text.contains(r#"reason="precision \"dropped\"",automatic="true""#));
        assert_eq!(
            value(&text, "journeyman_task_round_trip_quantiles_seconds_count"),
            Some(1)
        );
        assert!(text.contains(
            "journeyman_task_round_trip_quantiles_seconds{replica=\"0\",quantile=\"0.99\"} 0.03"
        ));
        assert_eq!(m.dead_letters_by_reason().get("schema_violation"), Some(&1));
        // Every sample line belongs to a declared metric.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} ")),
                "{l}"
            );
        }
    }

    #[test]
    fn every_series_names_the_replica_and_the_info_its_partitions() {
        use crate::domain::partition::Replica;
        let stats = Stats::default();
        let m = Metrics::default();
        let g = StoreGauges::default();
        let _ = stats.replica.set(crate::orchestrator::stats::Identity {
            id: "orch-1".into(),
            replica: Replica::new(1, 3).unwrap(),
        });
        let text = render(&stats, &m, &g, false);
        assert!(
            text.contains(
                "journeyman_replica_info{replica=\"orch-1\",index=\"1\",replicas=\"3\",partitions=\"\"} 1\n"
            ),
            "no partitions until the runtime knows the count: {text}"
        );
        assert!(text.contains("\njourneyman_up{replica=\"orch-1\"} 0\n"));
        stats.set_partitions(Replica::new(1, 3).unwrap().partitions(8));
        stats.set_partitions(vec![0]);
        let text = render(&stats, &m, &g, true);
        assert!(text.contains(r#"partitions="1,4,7"}"#), "{text}");
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.contains("replica=\"orch-1\""), "{l}");
        }
    }
}
