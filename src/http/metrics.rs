//! `/metrics` in the Prometheus text format (version 0.0.4).
//!
//! Three sources, one exposition: the orchestrator's [`Stats`] counters (read on scrape),
//! gauges computed from the store on scrape (journeys by stage and status, outbox depth),
//! and [`Metrics`], labelled counters and a histogram that the core increments where it
//! knows the intent or the reason. The text format is small enough to write by hand, which
//! keeps the labelled families readable by the dashboard too.
//!
//! This module renders and counts; it makes no decisions and never writes the store.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;

pub use crate::orchestrator::stats::RoundTripSummary;
use crate::orchestrator::stats::{Metrics, ROUND_TRIP_BUCKETS, Stats};

/// What the store says at scrape time.
#[derive(Debug, Default, Clone)]
pub struct StoreGauges {
    /// (stage, status) → journeys.
    pub journeys: BTreeMap<(String, String), u64>,
    pub outbox_depth: u64,
}

/// Writes every metric in the Prometheus text format.
pub fn render(stats: &Stats, metrics: &Metrics, gauges: &StoreGauges, ready: bool) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let o = &mut out;
    let c = |c: &AtomicU64| Stats::get(c);

    header(
        o,
        "journeyman_up",
        "gauge",
        "1 while the orchestrator is connected, consuming and its store is open.",
    );
    sample(o, "journeyman_up", &[], u64::from(ready));

    header(
        o,
        "journeyman_journeys",
        "gauge",
        "Journeys in the store by stage and status (computed on scrape).",
    );
    for ((stage, status), n) in &gauges.journeys {
        sample(
            o,
            "journeyman_journeys",
            &[("stage", stage), ("status", status)],
            *n,
        );
    }
    header(
        o,
        "journeyman_outbox_depth",
        "gauge",
        "Messages recorded but not yet confirmed by the broker.",
    );
    sample(o, "journeyman_outbox_depth", &[], gauges.outbox_depth);

    let totals: [(&str, &str, u64); 13] = [
        (
            "journeyman_journeys_started_total",
            "Journeys started.",
            c(&stats.journeys_started),
        ),
        (
            "journeyman_promotions_total",
            "Stage promotions (Sandbox to Pilot, Pilot to Production).",
            c(&stats.promotions),
        ),
        (
            "journeyman_works_failed_total",
            "Units of work failed after retries.",
            c(&stats.works_failed),
        ),
        (
            "journeyman_pauses_total",
            "Journeys paused by failed work.",
            c(&stats.pauses),
        ),
        (
            "journeyman_resumes_total",
            "Paused journeys or failed rollbacks resumed.",
            c(&stats.resumes),
        ),
        (
            "journeyman_dead_letters_total",
            "Messages dead-lettered by the orchestrator (refused input, failed work).",
            c(&stats.dead_letters),
        ),
        (
            "journeyman_duplicates_total",
            "Redelivered messages absorbed by the dedup marks.",
            c(&stats.duplicates),
        ),
        (
            "journeyman_stale_replies_total",
            "Replies ignored: late, for a superseded attempt, or unknown.",
            c(&stats.stale_replies),
        ),
        (
            "journeyman_conflicts_total",
            "Messages reusing a handled message id with other content (dead-lettered).",
            c(&stats.conflicts),
        ),
        (
            "journeyman_refusals_total",
            "Journey commands refused (invalid transition, unknown client, ...).",
            c(&stats.refusals),
        ),
        (
            "journeyman_inputs_total",
            "Deliveries handled.",
            c(&stats.inputs),
        ),
        (
            "journeyman_flushes_total",
            "Store flushes (one per group of inputs: group commit).",
            c(&stats.flushes),
        ),
        (
            "journeyman_tasks_completed_total",
            "Task attempts that completed.",
            c(&stats.tasks_completed),
        ),
    ];
    for (name, help, v) in totals {
        header(o, name, "counter", help);
        sample(o, name, &[], v);
    }

    header(
        o,
        "journeyman_tasks_dispatched_total",
        "counter",
        "Task requests dispatched (first attempts and retries).",
    );
    sample(
        o,
        "journeyman_tasks_dispatched_total",
        &[],
        c(&stats.tasks_dispatched),
    );
    header(
        o,
        "journeyman_tasks_retried_total",
        "counter",
        "Task attempts after the first.",
    );
    sample(o, "journeyman_tasks_retried_total", &[], c(&stats.retries));

    header(
        o,
        "journeyman_transitions_total",
        "counter",
        "Journey state transitions by kind.",
    );
    let rollbacks = c(&stats.rollbacks_started);
    for (kind, v) in [
        ("promote", c(&stats.promotions)),
        ("rollback_started", rollbacks),
        ("rollback_completed", c(&stats.rollbacks_completed)),
    ] {
        sample(o, "journeyman_transitions_total", &[("kind", kind)], v);
    }

    header(
        o,
        "journeyman_gate_evaluations_total",
        "counter",
        "Exit-gate evaluations by result.",
    );
    for (result, v) in [
        ("passed", c(&stats.gate_passed)),
        ("failed", c(&stats.gate_failed)),
    ] {
        sample(
            o,
            "journeyman_gate_evaluations_total",
            &[("result", result)],
            v,
        );
    }

    header(
        o,
        "journeyman_rollbacks_total",
        "counter",
        "Rollbacks by outcome: started (any), automatic (fired by a trigger), completed, failed.",
    );
    for (outcome, v) in [
        ("started", rollbacks),
        ("automatic", c(&stats.rollbacks_automatic)),
        ("completed", c(&stats.rollbacks_completed)),
        ("failed", c(&stats.rollbacks_failed)),
    ] {
        sample(o, "journeyman_rollbacks_total", &[("outcome", outcome)], v);
    }

    family(
        o,
        "journeyman_rollbacks_by_reason_total",
        "Rollbacks started, by reason and whether a trigger fired them.",
        &["reason", "automatic"],
        &metrics.rollbacks.snapshot(),
    );
    family(
        o,
        "journeyman_task_outcomes_total",
        "Tasks by intent and outcome (dispatched, completed, failed, retried).",
        &["intent", "outcome"],
        &metrics.tasks.snapshot(),
    );
    family(
        o,
        "journeyman_dead_letters_by_reason_total",
        "Dead letters by reason code.",
        &["reason"],
        &metrics.dead_letters.snapshot(),
    );

    let name = "journeyman_task_round_trip_seconds";
    header(
        o,
        name,
        "histogram",
        "Task round trip by intent: an attempt's dispatch to its reply.",
    );
    let hs = metrics
        .round_trip
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (intent, h) in hs {
        let mut cumulative = 0;
        for (le, n) in ROUND_TRIP_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let le = le.to_string();
            sample(
                o,
                &format!("{name}_bucket"),
                &[("intent", &intent), ("le", &le)],
                cumulative,
            );
        }
        sample(
            o,
            &format!("{name}_bucket"),
            &[("intent", &intent), ("le", "+Inf")],
            h.count,
        );
        let _ = writeln!(o, "{name}_sum{{intent=\"{}\"}} {}", escape(&intent), h.sum);
        sample(o, &format!("{name}_count"), &[("intent", &intent)], h.count);
    }

    // The same round trips over all intents as a summary: quantiles a scraper cannot
    // interpolate from the buckets above (p99.9 at millisecond resolution).
    let name = "journeyman_task_round_trip_quantiles_seconds";
    header(
        o,
        name,
        "summary",
        "Task round trip over all intents (dispatch to reply applied), quantiles since start.",
    );
    let (summary, sum) = {
        let q = metrics
            .round_trip_quantiles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (RoundTripSummary::of_micros(&q.micros), q.sum_secs)
    };
    if summary.count > 0 {
        for (quantile, ms) in [
            ("0.5", summary.p50_ms),
            ("0.99", summary.p99_ms),
            ("0.999", summary.p999_ms),
        ] {
            let _ = writeln!(o, "{name}{{quantile=\"{quantile}\"}} {}", ms / 1000.0);
        }
    }
    let _ = writeln!(o, "{name}_sum {sum}");
    sample(o, &format!("{name}_count"), &[], summary.count);
    out
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

fn sample(o: &mut String, name: &str, labels: &[(&str, &str)], v: u64) {
    o.push_str(name);
    if !labels.is_empty() {
        o.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(o, "{k}=\"{}\"", escape(val));
        }
        o.push('}');
    }
    let _ = writeln!(o, " {v}");
}

fn family(
    o: &mut String,
    name: &str,
    help: &str,
    label_names: &[&str],
    values: &BTreeMap<Vec<String>, u64>,
) {
    header(o, name, "counter", help);
    for (labels, v) in values {
        let pairs: Vec<(&str, &str)> = label_names
            .iter()
            .copied()
            .zip(labels.iter().map(String::as_str))
            .collect();
        sample(o, name, &pairs, *v);
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

    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
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
        assert!(
            text.contains("journeyman_task_round_trip_quantiles_seconds{quantile=\"0.99\"} 0.03")
        );
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
}
