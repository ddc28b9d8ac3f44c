//! DES-002 §7.1's journey metrics, computed from journeys and their histories (pure).
//!
//! The orchestrator's HTTP API builds the input from its store (`GET /api/report`);
//! `journeyman report` prints the result. Nothing here reads a clock, the store or the
//! network: the histories and `now` come in, a [`Report`] comes out.
//!
//! What each number means, from history entries (see `orchestrator::record`):
//! - **stage durations**: each finished stay in a stage, from entering it (`started` for
//!   sandbox, a `transition` to it otherwise) to the `transition` out of it;
//! - **time to production**: `started` to the first `transition` into production;
//! - **rollback rate**: journeys that rolled back at least once, over journeys;
//! - **exit-criteria pass rate**: passed `gate_evaluation`s over all of them;
//! - **task failure rate**: tasks that failed for good (`work_failed`) over tasks that
//!   finished (`task_completed` + `work_failed`); the attempt failure rate also counts
//!   the attempts that were retried (`task_retry`);
//! - **tasks per unit of work**: completed tasks over completed units of work;
//! - **active journeys by stage**: journeys not completed or cancelled, from the records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::record::HistoryEntry;

/// One journey as the report needs it.
#[derive(Debug, Clone)]
pub struct JourneyInput {
    pub client_id: String,
    /// Current stage (wire name).
    pub stage: String,
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub generated_at: Option<DateTime<Utc>>,
    pub journeys: u64,
    /// Non-terminal journeys by current stage.
    pub active_by_stage: BTreeMap<String, u64>,
    /// Finished stays per stage, in seconds.
    pub stage_durations: BTreeMap<String, Durations>,
    pub time_to_production: Durations,
    pub rollbacks: u64,
    pub rollbacks_automatic: u64,
    pub journeys_rolled_back: u64,
    /// `journeys_rolled_back / journeys`; `None` without journeys.
    pub rollback_rate: Option<f64>,
    pub gate_evaluations: u64,
    pub gate_passed: u64,
    pub exit_criteria_pass_rate: Option<f64>,
    /// Per stage: (evaluations, passed).
    pub gate_by_stage: BTreeMap<String, GateCount>,
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    pub task_attempts_retried: u64,
    pub task_failure_rate: Option<f64>,
    pub task_attempt_failure_rate: Option<f64>,
    pub units_of_work_completed: u64,
    pub tasks_per_unit_of_work: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateCount {
    pub evaluations: u64,
    pub passed: u64,
}

/// A sample of durations in seconds, summarised.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    pub count: u64,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

impl Durations {
    fn of(mut secs: Vec<f64>) -> Self {
        secs.sort_by(|a, b| a.total_cmp(b));
        Self {
            count: secs.len() as u64,
            p50_seconds: percentile(&secs, 50.0),
            p95_seconds: percentile(&secs, 95.0),
            max_seconds: secs.last().copied(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

fn secs(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

const TERMINAL: [&str; 2] = ["completed", "cancelled"];

pub fn compute(journeys: &[JourneyInput], now: DateTime<Utc>) -> Report {
    let mut r = Report {
        generated_at: Some(now),
        journeys: journeys.len() as u64,
        ..Default::default()
    };
    let mut stays: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut to_production = Vec::new();
    for j in journeys {
        if !TERMINAL.contains(&j.stage.as_str()) {
            *r.active_by_stage.entry(j.stage.clone()).or_default() += 1;
        }
        let mut history: Vec<&HistoryEntry> = j.history.iter().collect();
        // Entries are stored in order; sorting by time is stable for equal times.
        history.sort_by_key(|e| e.at);
        let mut current: Option<(String, DateTime<Utc>)> = None;
        let mut started_at = None;
        let mut reached_production = false;
        let mut rolled_back = false;
        for e in history {
            let d = &e.detail;
            match e.kind.as_str() {
                "started" => {
                    started_at = Some(e.at);
                    let stage = d["stage"].as_str().unwrap_or("sandbox").to_string();
                    current = Some((stage, e.at));
                }
                "transition" => {
                    let (from, to) = (str_of(&d["from"]), str_of(&d["to"]));
                    if let Some((stage, since)) = current.take()
                        && stage == from
                    {
                        stays.entry(stage).or_default().push(secs(since, e.at));
                    }
                    if to == "rollback" {
                        r.rollbacks += 1;
                        rolled_back = true;
                        if d["automatic"] == true {
                            r.rollbacks_automatic += 1;
                        }
                    }
                    if to == "production"
                        && !reached_production
                        && let Some(s) = started_at
                    {
                        reached_production = true;
                        to_production.push(secs(s, e.at));
                    }
                    current = Some((to, e.at));
                }
                "gate_evaluation" => {
                    let passed = d["passed"] == true;
                    r.gate_evaluations += 1;
                    r.gate_passed += u64::from(passed);
                    let g = r.gate_by_stage.entry(str_of(&d["stage"])).or_default();
                    g.evaluations += 1;
                    g.passed += u64::from(passed);
                }
                "task_completed" => r.tasks_completed += 1,
                "task_retry" => r.task_attempts_retried += 1,
                "work_failed" => r.tasks_failed += 1,
                "work_completed" | "rollback_work_completed" => r.units_of_work_completed += 1,
                _ => {}
            }
        }
        r.journeys_rolled_back += u64::from(rolled_back);
    }
    r.stage_durations = stays
        .into_iter()
        .map(|(k, v)| (k, Durations::of(v)))
        .collect();
    r.time_to_production = Durations::of(to_production);
    r.rollback_rate = ratio(r.journeys_rolled_back, r.journeys);
    r.exit_criteria_pass_rate = ratio(r.gate_passed, r.gate_evaluations);
    r.task_failure_rate = ratio(r.tasks_failed, r.tasks_completed + r.tasks_failed);
    r.task_attempt_failure_rate = ratio(
        r.tasks_failed + r.task_attempts_retried,
        r.tasks_completed + r.tasks_failed + r.task_attempts_retried,
    );
    r.tasks_per_unit_of_work = ratio(r.tasks_completed, r.units_of_work_completed);
    r
}

/// The fleet's report from its replicas' reports (each replica holds its own journeys, so
/// the counts add up). Ratios are recomputed from the sums. Percentiles cannot be combined
/// from percentiles: a duration's p50/p95 are kept only when a single replica has samples,
/// and are `None` otherwise (the max and the count stay exact).
pub fn merge(parts: &[Report]) -> Report {
    fn add(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
        for (k, v) in from {
            *into.entry(k.clone()).or_default() += v;
        }
    }
    fn durations<'a>(all: impl Iterator<Item = &'a Durations>) -> Durations {
        let with: Vec<&Durations> = all.filter(|d| d.count > 0).collect();
        match with.as_slice() {
            [] => Durations::default(),
            [one] => (*one).clone(),
            many => Durations {
                count: many.iter().map(|d| d.count).sum(),
                p50_seconds: None,
                p95_seconds: None,
                max_seconds: many
                    .iter()
                    .filter_map(|d| d.max_seconds)
                    .max_by(|a, b| a.total_cmp(b)),
            },
        }
    }
    let mut r = Report {
        generated_at: parts.iter().filter_map(|p| p.generated_at).max(),
        ..Default::default()
    };
    for p in parts {
        r.journeys += p.journeys;
        add(&mut r.active_by_stage, &p.active_by_stage);
        r.rollbacks += p.rollbacks;
        r.rollbacks_automatic += p.rollbacks_automatic;
        r.journeys_rolled_back += p.journeys_rolled_back;
        r.gate_evaluations += p.gate_evaluations;
        r.gate_passed += p.gate_passed;
        for (stage, g) in &p.gate_by_stage {
            let e = r.gate_by_stage.entry(stage.clone()).or_default();
            e.evaluations += g.evaluations;
            e.passed += g.passed;
        }
        r.tasks_completed += p.tasks_completed;
        r.tasks_failed += p.tasks_failed;
        r.task_attempts_retried += p.task_attempts_retried;
        r.units_of_work_completed += p.units_of_work_completed;
    }
    let stages: std::collections::BTreeSet<&String> = parts
        .iter()
        .flat_map(|p| p.stage_durations.keys())
        .collect();
    r.stage_durations = stages
        .into_iter()
        .map(|s| {
            let d = durations(parts.iter().filter_map(|p| p.stage_durations.get(s)));
            (s.clone(), d)
        })
        .collect();
    r.time_to_production = durations(parts.iter().map(|p| &p.time_to_production));
    r.rollback_rate = ratio(r.journeys_rolled_back, r.journeys);
    r.exit_criteria_pass_rate = ratio(r.gate_passed, r.gate_evaluations);
    r.task_failure_rate = ratio(r.tasks_failed, r.tasks_completed + r.tasks_failed);
    r.task_attempt_failure_rate = ratio(
        r.tasks_failed + r.task_attempts_retried,
        r.tasks_completed + r.tasks_failed + r.task_attempts_retried,
    );
    r.tasks_per_unit_of_work = ratio(r.tasks_completed, r.units_of_work_completed);
    r
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

/// The report for people.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    let dur = |v: Option<f64>| v.map_or("-".to_string(), human);
    let _ = writeln!(o, "journeys:                 {}", r.journeys);
    let active: Vec<String> = r
        .active_by_stage
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        o,
        "active by stage:          {}",
        if active.is_empty() {
            "-".into()
        } else {
            active.join(", ")
        }
    );
    let _ = writeln!(o, "stage durations (finished stays):");
    let _ = writeln!(
        o,
        "  {:<12} {:>6} {:>10} {:>10} {:>10}",
        "stage", "count", "p50", "p95", "max"
    );
    for (stage, d) in &r.stage_durations {
        let _ = writeln!(
            o,
            "  {:<12} {:>6} {:>10} {:>10} {:>10}",
            stage,
            d.count,
            dur(d.p50_seconds),
            dur(d.p95_seconds),
            dur(d.max_seconds)
        );
    }
    let t = &r.time_to_production;
    let _ = writeln!(
        o,
        "time to production:       p50 {}, p95 {} ({} journeys)",
        dur(t.p50_seconds),
        dur(t.p95_seconds),
        t.count
    );
    let _ = writeln!(
        o,
        "rollback rate:            {} ({} of {} journeys; {} rollbacks, {} automatic)",
        pct(r.rollback_rate),
        r.journeys_rolled_back,
        r.journeys,
        r.rollbacks,
        r.rollbacks_automatic
    );
    let _ = writeln!(
        o,
        "exit-criteria pass rate:  {} ({} of {} evaluations)",
        pct(r.exit_criteria_pass_rate),
        r.gate_passed,
        r.gate_evaluations
    );
    let _ = writeln!(
        o,
        "task failure rate:        {} ({} failed, {} completed; attempts failed {})",
        pct(r.task_failure_rate),
        r.tasks_failed,
        r.tasks_completed,
        pct(r.task_attempt_failure_rate)
    );
    let _ = writeln!(
        o,
        "tasks per unit of work:   {} ({} units completed)",
        r.tasks_per_unit_of_work
            .map_or("-".to_string(), |v| format!("{v:.1}")),
        r.units_of_work_completed
    );
    o
}

/// 0.42 → "420ms", 75 → "1m15s", 90000 → "1d1h".
pub fn human(secs: f64) -> String {
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round() as u64);
    }
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    let (d, h, m, s) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    // The smaller unit only when it says something: "7d", not "7d0h".
    let two = |big: u64, a: &str, small: u64, b: &str| match small {
        0 => format!("{big}{a}"),
        _ => format!("{big}{a}{small}{b}"),
    };
    if d > 0 {
        two(d, "d", h, "h")
    } else if h > 0 {
        two(h, "h", m, "m")
    } else {
        two(m, "m", s, "s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn e(at: i64, kind: &str, detail: Value) -> HistoryEntry {
        HistoryEntry {
            at: t(at),
            kind: kind.into(),
            detail,
            cause: None,
        }
    }

    fn tr(at: i64, from: &str, to: &str) -> HistoryEntry {
        e(at, "transition", json!({"from": from, "to": to}))
    }

    fn gate(at: i64, stage: &str, passed: bool) -> HistoryEntry {
        e(
            at,
            "gate_evaluation",
            json!({"stage": stage, "passed": passed, "checks": []}),
        )
    }

    fn journey(client: &str, stage: &str, history: Vec<HistoryEntry>) -> JourneyInput {
        JourneyInput {
            client_id: client.into(),
            stage: stage.into(),
            history,
        }
    }

    /// Straight through: sandbox 100 s, pilot 200 s, then production.
    fn straight(client: &str, offset: i64) -> JourneyInput {
        let o = offset;
        journey(
            client,
            "production",
            vec![
                e(o, "started", json!({"stage": "sandbox"})),
                e(o + 10, "task_completed", json!({"task_id": "a"})),
                e(o + 20, "task_completed", json!({"task_id": "b"})),
                e(o + 30, "work_completed", json!({"stage": "sandbox"})),
                gate(o + 100, "sandbox", true),
                tr(o + 100, "sandbox", "pilot"),
                e(o + 150, "task_completed", json!({"task_id": "c"})),
                e(o + 160, "work_completed", json!({"stage": "pilot"})),
                gate(o + 160, "pilot", false),
                gate(o + 300, "pilot", true),
                tr(o + 300, "pilot", "production"),
            ],
        )
    }

    #[test]
    fn replicas_reports_merge_to_the_counts_of_one_report_over_all_journeys() {
        let (a, b, c) = (straight("a", 0), straight("b", 1000), straight("c", 2000));
        let whole = compute(&[a.clone(), b.clone(), c.clone()], t(5000));
        let merged = merge(&[compute(&[a, b], t(5000)), compute(&[c], t(4000))]);
        assert_eq!(merged.generated_at, Some(t(5000)));
        assert_eq!(merged.journeys, 3);
        assert_eq!(merged.active_by_stage, whole.active_by_stage);
        assert_eq!(merged.gate_by_stage, whole.gate_by_stage);
        assert_eq!(
            merged.exit_criteria_pass_rate,
            whole.exit_criteria_pass_rate
        );
        assert_eq!(merged.tasks_per_unit_of_work, whole.tasks_per_unit_of_work);
        assert_eq!(merged.rollback_rate, whole.rollback_rate);
        let d = &merged.stage_durations["sandbox"];
        assert_eq!((d.count, d.max_seconds), (3, Some(100.0)));
        assert_eq!(
            d.p50_seconds, None,
            "percentiles of two replicas do not combine"
        );
        // One replica with samples: its percentiles are the fleet's.
        let alone = merge(&[compute(&[straight("a", 0)], t(900)), compute(&[], t(900))]);
        assert_eq!(alone.time_to_production.p50_seconds, Some(300.0));
        assert_eq!(merge(&[]).journeys, 0);
    }

    #[test]
    fn an_empty_store_reports_no_rates() {
        let r = compute(&[], t(0));
        assert_eq!(r.journeys, 0);
        assert_eq!(r.rollback_rate, None);
        assert_eq!(r.exit_criteria_pass_rate, None);
        assert_eq!(r.time_to_production.count, 0);
        assert!(render_text(&r).contains("rollback rate:            -"));
    }

    #[test]
    fn stage_durations_time_to_production_and_gate_pass_rate() {
        let r = compute(&[straight("a", 0), straight("b", 1000)], t(5000));
        assert_eq!(r.journeys, 2);
        assert_eq!(r.active_by_stage.get("production"), Some(&2));
        let sandbox = &r.stage_durations["sandbox"];
        assert_eq!((sandbox.count, sandbox.p50_seconds), (2, Some(100.0)));
        assert_eq!(r.stage_durations["pilot"].p95_seconds, Some(200.0));
        assert!(!r.stage_durations.contains_key("production"), "still there");
        assert_eq!(r.time_to_production.count, 2);
        assert_eq!(r.time_to_production.p50_seconds, Some(300.0));
        assert_eq!((r.gate_evaluations, r.gate_passed), (6, 4));
        assert_eq!(r.exit_criteria_pass_rate, Some(4.0 / 6.0));
        assert_eq!(
            r.gate_by_stage["pilot"],
            GateCount {
                evaluations: 4,
                passed: 2
            }
        );
        assert_eq!(r.tasks_per_unit_of_work, Some(1.5));
        assert_eq!(r.rollback_rate, Some(0.0));
    }

    #[test]
    fn rollbacks_and_task_failures_are_rated_per_journey_and_per_task() {
        let rolled = journey(
            "c",
            "pilot",
            vec![
                e(0, "started", json!({"stage": "sandbox"})),
                tr(50, "sandbox", "pilot"),
                e(60, "task_retry", json!({"task_id": "x", "attempt": 1})),
                e(70, "task_retry", json!({"task_id": "x", "attempt": 2})),
                e(80, "work_failed", json!({"stage": "pilot", "task_id": "x"})),
                e(
                    90,
                    "transition",
                    json!({"from": "pilot", "to": "rollback", "automatic": true}),
                ),
                e(95, "task_completed", json!({"task_id": "undo"})),
                e(96, "rollback_work_completed", json!({})),
                tr(100, "rollback", "sandbox"),
                tr(130, "sandbox", "pilot"),
            ],
        );
        let cancelled = journey(
            "d",
            "cancelled",
            vec![
                e(0, "started", json!({"stage": "sandbox"})),
                tr(10, "sandbox", "cancelled"),
            ],
        );
        let r = compute(&[straight("a", 0), rolled, cancelled], t(1000));
        assert_eq!(r.active_by_stage.get("pilot"), Some(&1));
        assert!(!r.active_by_stage.contains_key("cancelled"));
        assert_eq!((r.rollbacks, r.rollbacks_automatic), (1, 1));
        assert_eq!(r.journeys_rolled_back, 1);
        assert_eq!(r.rollback_rate, Some(1.0 / 3.0));
        // Sandbox stays: a 100, c 50 then 30 (after the rollback), d 10.
        let sandbox = &r.stage_durations["sandbox"];
        assert_eq!(sandbox.count, 4);
        assert_eq!(sandbox.p50_seconds, Some(30.0));
        assert_eq!(sandbox.p95_seconds, Some(100.0));
        assert_eq!(r.stage_durations["rollback"].p50_seconds, Some(10.0));
        // Only a reached production.
        assert_eq!(r.time_to_production.count, 1);
        // Tasks: a 3 completed, c 1 completed (rollback) and 1 failed after 2 retries.
        assert_eq!((r.tasks_completed, r.tasks_failed), (4, 1));
        assert_eq!(r.task_failure_rate, Some(0.2));
        assert_eq!(r.task_attempt_failure_rate, Some(3.0 / 7.0));
        let text = render_text(&r);
        assert!(
            text.contains("33.3% (1 of 3 journeys; 1 rollbacks, 1 automatic)"),
            "{text}"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(10.0));
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        assert_eq!(human(0.25), "250ms");
        assert_eq!(human(75.0), "1m15s");
        assert_eq!(human(90000.0), "1d1h");
        assert_eq!(human(7.0 * 86400.0), "7d");
        assert_eq!(human(3600.0), "1h");
    }
}
