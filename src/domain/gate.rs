//! Gates: the exit criteria and rollback triggers a playbook declares per stage (DES-002 §1,
//! §5), and the pure functions that judge them against a journey's [`Evidence`].
//!
//! [`evaluate`] answers "may this journey leave the stage?" with one named check per
//! criterion (DES-002 §4's `ValidationResult`); [`triggered`] answers "must it roll back?"
//! with the triggers that fire. Both are functions of (criteria, evidence, stage start,
//! now) and nothing else, so the orchestrator can record exactly what was judged.
//!
//! This module must not read the clock, do I/O or decide what happens next: promotion,
//! refusal and rollback are the orchestrator's effects.
//!
//! Which evidence a criterion reads (its `since`, default `stage`):
//! - **Metrics and flags** (`metric`, `flag`, `all_flags`) count only when observed after
//!   `stage_started_at`, the moment the stage was (re)entered. A gate judges what was
//!   seen in this stage: a journey rolled back to sandbox must earn sandbox's gate again
//!   with fresh evidence instead of passing at once on the values it had before (the
//!   "bounce straight back" of issue 14). A trigger likewise reacts to what happened in
//!   this stage; otherwise the very value that rolled a journey back from production
//!   (satisfaction 3.4) would fire pilot's trigger (< 3.5) the moment the journey
//!   re-entered pilot, cascading rollbacks on stale evidence. `since: journey` on a
//!   criterion lets it read every value recorded on the journey instead.
//! - **Event windows as exit criteria** look back their whole window, even past the stage
//!   start: "no critical bug in 7 days" means 7 days, and an older bug can only make the
//!   gate stricter, never let it pass early. As triggers they count events since the stage
//!   started (unless `since: journey`).
//!
//! Time-based verdicts (`min_time_in_stage`, event windows) change with time alone:
//! [`next_change`] says when, so the orchestrator can arm a durable timer for it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::evidence::{Evidence, is_valid_name};

/// One named condition on evidence, declared in a playbook's `exit_criteria` or
/// `rollback_triggers`. In YAML it is a flat mapping: `name` plus the keys of one [`Check`]
/// kind, e.g. `{name: search_quality, metric: search.precision, op: ">", value: 0.80}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawCriterion", into = "RawCriterion")]
pub struct Criterion {
    /// Names the check in results and history; unique within its list.
    pub name: String,
    /// What is tested.
    pub check: Check,
    /// Which evidence it reads (see the module documentation).
    pub since: Since,
}

/// How far back a criterion reads metrics and flags (and a trigger's events).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Since {
    /// Only evidence observed since the stage was (re)entered: the default.
    #[default]
    Stage,
    /// Everything recorded on the journey (this generation).
    Journey,
}

/// What a criterion tests. Each kind is recognised in YAML by its leading key.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// `{metric: search.precision, op: ">", value: 0.80}`: the metric's latest value
    /// compared with a threshold. Missing metric: the check fails, the trigger does not fire.
    Metric { metric: String, op: Op, value: f64 },
    /// `{flag: demo.approved, equals: true}` (`equals` defaults to true).
    Flag { flag: String, equals: bool },
    /// `{event: bug.critical, within: 7d, max: 0, severity: critical}` (`max` defaults to 0,
    /// `severity` is optional and compared ignoring ASCII case): counts events in the window
    /// `[now - within, now]`, both ends included. As an exit criterion it passes when the
    /// count is at most `max` ("no critical bug in 7 days"); as a trigger it fires when the
    /// count exceeds `max`. No events reported means a count of zero.
    Events {
        event: String,
        within: Duration,
        max: u32,
        severity: Option<String>,
    },
    /// `{all_flags: "connector."}`: every flag whose name starts with the prefix is true, and
    /// there is at least one ("every connector syncing" with nothing reported is not true).
    AllFlags { prefix: String },
    /// `{min_time_in_stage: 3d}`: the journey has been in the stage at least this long. As a
    /// trigger it fires once the stage has lasted this long (a stage timeout).
    MinTimeInStage { min_time_in_stage: Duration },
}

/// A comparison. Exact: `0.8 > 0.8` is false, `0.8 >= 0.8` true. In YAML write the symbol,
/// quoted (`">"`, because `>` and `!` mean something to YAML), or its name (`gt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">", alias = "gt")]
    Gt,
    #[serde(rename = ">=", alias = "ge")]
    Ge,
    #[serde(rename = "<", alias = "lt")]
    Lt,
    #[serde(rename = "<=", alias = "le")]
    Le,
    #[serde(rename = "==", alias = "eq")]
    Eq,
    #[serde(rename = "!=", alias = "ne")]
    Ne,
}

impl Op {
    /// `observed <op> threshold`. NaN compares false except under `!=`.
    pub fn holds(self, observed: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => observed > threshold,
            Op::Ge => observed >= threshold,
            Op::Lt => observed < threshold,
            Op::Le => observed <= threshold,
            Op::Eq => observed == threshold,
            Op::Ne => observed != threshold,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

impl Criterion {
    /// Checks names and durations; the reason is phrased to follow "criterion `name`: ".
    /// Name uniqueness is the list's business (see `Playbook::validate`).
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |kind: &str, name: &str| {
            if is_valid_name(name) {
                Ok(())
            } else {
                Err(format!(
                    "invalid {kind} `{name}` (allowed: lowercase letters, digits, `_`, `.`, `-`)"
                ))
            }
        };
        match &self.check {
            Check::Metric { metric, value, .. } => {
                name_ok("metric name", metric)?;
                if !value.is_finite() {
                    return Err(format!("value must be a finite number, got {value}"));
                }
            }
            Check::Flag { flag, .. } => name_ok("flag name", flag)?,
            Check::Events {
                event,
                within,
                severity,
                ..
            } => {
                name_ok("event name", event)?;
                if within.is_zero() {
                    return Err("`within` must be greater than zero".to_owned());
                }
                if severity.as_deref().is_some_and(|s| s.trim().is_empty()) {
                    return Err("`severity` must not be empty".to_owned());
                }
            }
            Check::AllFlags { prefix } => name_ok("flag prefix", prefix)?,
            Check::MinTimeInStage { min_time_in_stage } => {
                if min_time_in_stage.is_zero() {
                    return Err("`min_time_in_stage` must be greater than zero".to_owned());
                }
            }
        }
        Ok(())
    }
}

/// One criterion's verdict (DES-002 §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationCheck {
    /// The criterion's name.
    pub name: String,
    pub passed: bool,
    /// The value and the threshold, or why there is no value.
    pub message: String,
}

/// A stage's exit gate, evaluated once (DES-002 §4). Recorded in the journey's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationResult {
    /// The stage key whose exit was judged.
    pub stage: String,
    /// Every check passed (true for no criteria).
    pub passed: bool,
    /// One per criterion, in declaration order.
    pub checks: Vec<ValidationCheck>,
    /// The `now` it was evaluated at.
    pub evaluated_at: DateTime<Utc>,
}

impl ValidationResult {
    pub fn failed_checks(&self) -> impl Iterator<Item = &ValidationCheck> {
        self.checks.iter().filter(|check| !check.passed)
    }

    /// One line for people and refusal messages: "2 of 4 checks failed: search_quality:
    /// no value reported for search.precision; demo_approved: demo.approved = false, needs
    /// true", or "all 4 checks passed".
    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .failed_checks()
            .map(|check| format!("{}: {}", check.name, check.message))
            .collect();
        if failed.is_empty() {
            format!("all {} checks passed", self.checks.len())
        } else {
            format!(
                "{} of {} checks failed: {}",
                failed.len(),
                self.checks.len(),
                failed.join("; ")
            )
        }
    }
}

/// A rollback trigger that fired, with what made it fire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerHit {
    /// The trigger's name.
    pub name: String,
    pub message: String,
}

/// Judges a stage's exit criteria. Pure: the same inputs give the same result.
pub fn evaluate(
    stage: &str,
    criteria: &[Criterion],
    evidence: &Evidence,
    stage_started_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> ValidationResult {
    let checks: Vec<ValidationCheck> = criteria
        .iter()
        .map(|criterion| {
            let (passed, message) =
                judge(criterion, evidence, stage_started_at, now, Reading::Exit);
            ValidationCheck {
                name: criterion.name.clone(),
                passed,
                message,
            }
        })
        .collect();
    ValidationResult {
        stage: stage.to_owned(),
        passed: checks.iter().all(|check| check.passed),
        checks,
        evaluated_at: now,
    }
}

/// The rollback triggers that fire, in declaration order; empty when none does. Reads only
/// evidence observed since `stage_started_at` (see the module documentation).
pub fn triggered(
    triggers: &[Criterion],
    evidence: &Evidence,
    stage_started_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<TriggerHit> {
    triggers
        .iter()
        .filter_map(|trigger| {
            let (fired, message) =
                judge(trigger, evidence, stage_started_at, now, Reading::Trigger);
            fired.then(|| TriggerHit {
                name: trigger.name.clone(),
                message,
            })
        })
        .collect()
}

/// The earliest moment after `now` at which one of `criteria` could change its verdict
/// with no new evidence: a `min_time_in_stage` coming of age, a dated event entering its
/// window (it was reported with a future time) or leaving it. `None` when nothing
/// time-based is pending. Conservative: a wake-up may find nothing changed, never the
/// reverse, so the caller arms a timer here and re-judges when it fires.
pub fn next_change<'a>(
    criteria: impl IntoIterator<Item = &'a Criterion>,
    evidence: &Evidence,
    stage_started_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    // An event counted while `at >= now - within` stops counting just after `at + within`.
    let tick = TimeDelta::milliseconds(1);
    let mut times: Vec<DateTime<Utc>> = Vec::new();
    for criterion in criteria {
        match &criterion.check {
            Check::MinTimeInStage { min_time_in_stage } => {
                if let Some(at) = chrono_duration(*min_time_in_stage)
                    .and_then(|d| stage_started_at.checked_add_signed(d))
                {
                    times.push(at);
                }
            }
            Check::Events {
                event,
                within,
                severity,
                ..
            } => {
                let within = chrono_duration(*within);
                for e in evidence.events.iter().filter(|e| {
                    e.name == *event
                        && severity.as_ref().is_none_or(|wanted| {
                            e.severity
                                .as_ref()
                                .is_some_and(|got| got.eq_ignore_ascii_case(wanted))
                        })
                }) {
                    times.push(e.at);
                    if let Some(end) = within.and_then(|w| e.at.checked_add_signed(w + tick)) {
                        times.push(end);
                    }
                }
            }
            _ => {}
        }
    }
    times.into_iter().filter(|at| *at > now).min()
}

/// The longest event window among `criteria`: how far back events must be kept for them.
/// Callers prune with `now - longest` (see [`Evidence::prune_events_before`]); `None` when
/// no criterion counts events.
pub fn longest_event_window<'a>(
    criteria: impl IntoIterator<Item = &'a Criterion>,
) -> Option<Duration> {
    criteria
        .into_iter()
        .filter_map(|criterion| match &criterion.check {
            Check::Events { within, .. } => Some(*within),
            _ => None,
        })
        .max()
}

/// Which question a criterion answers; they differ in what evidence they read and, for
/// events, in which way the count is judged.
#[derive(Clone, Copy, PartialEq)]
enum Reading {
    /// Passes when the condition holds; reads all evidence.
    Exit,
    /// Fires when the condition holds (events: count > max); reads only this stage's.
    Trigger,
}

/// `(passed or fired, message)`.
fn judge(
    criterion: &Criterion,
    evidence: &Evidence,
    stage_started_at: DateTime<Utc>,
    now: DateTime<Utc>,
    reading: Reading,
) -> (bool, String) {
    // Metrics and flags: this stage's observations unless the criterion says otherwise.
    let fresh_since = (criterion.since == Since::Stage).then_some(stage_started_at);
    // Strictly after: a value observed in the very step that entered the stage (the
    // report that fired a rollback which landed at once) belongs to the stage it left.
    let fresh = |at: DateTime<Utc>| fresh_since.is_none_or(|since| at > since);
    // Event windows: an exit criterion looks back its whole window (stricter, never
    // laxer); a trigger counts this stage's events.
    let since = (reading == Reading::Trigger && criterion.since == Since::Stage)
        .then_some(stage_started_at);
    let needs = match reading {
        Reading::Exit => "needs",
        Reading::Trigger => "fires when",
    };
    // `stale`: a value exists, but from before the stage was (re)entered.
    let missing = |name: &str, stale: bool| match (reading, stale) {
        (Reading::Exit, true) => format!(
            "{name} was last reported before the stage started; this stage needs a fresh value"
        ),
        (Reading::Exit, false) => format!("no value reported for {name}"),
        (Reading::Trigger, _) => format!("no value reported for {name} since the stage started"),
    };

    match &criterion.check {
        Check::Metric { metric, op, value } => {
            match evidence
                .metric(metric)
                .filter(|observed| fresh(observed.at))
            {
                Some(observed) => (
                    op.holds(observed.value, *value),
                    format!("{metric} = {}, {needs} {op} {value}", observed.value),
                ),
                None => (false, missing(metric, evidence.metric(metric).is_some())),
            }
        }
        Check::Flag { flag, equals } => {
            match evidence.flag(flag).filter(|observed| fresh(observed.at)) {
                Some(observed) => (
                    observed.value == *equals,
                    format!("{flag} = {}, {needs} {equals}", observed.value),
                ),
                None => (false, missing(flag, evidence.flag(flag).is_some())),
            }
        }
        Check::Events {
            event,
            within,
            max,
            severity,
        } => {
            let window_start = chrono_duration(*within).and_then(|d| now.checked_sub_signed(d));
            let (from, described) = match (window_start, since) {
                (Some(start), Some(since)) if since > start => (Some(since), None),
                (None, Some(since)) => (Some(since), None),
                (start, _) => (start, Some(*within)),
            };
            let count = evidence
                .events
                .iter()
                .filter(|e| e.name == *event)
                .filter(|e| from.is_none_or(|from| e.at >= from) && e.at <= now)
                .filter(|e| {
                    severity.as_ref().is_none_or(|wanted| {
                        e.severity
                            .as_ref()
                            .is_some_and(|got| got.eq_ignore_ascii_case(wanted))
                    })
                })
                .count();
            let what = format!(
                "{count} {event} event{}{}",
                if count == 1 { "" } else { "s" },
                severity
                    .as_ref()
                    .map(|s| format!(" of severity {s}"))
                    .unwrap_or_default()
            );
            let when = match described {
                Some(within) => format!("in the last {}", short(within)),
                None => "since the stage started".to_owned(),
            };
            let over = count > *max as usize;
            match reading {
                Reading::Exit => (!over, format!("{what} {when}, allowed at most {max}")),
                Reading::Trigger => (over, format!("{what} {when}, fires when more than {max}")),
            }
        }
        Check::AllFlags { prefix } => {
            let matching: BTreeMap<&str, bool> = evidence
                .flags
                .iter()
                .filter(|(name, observed)| name.starts_with(prefix.as_str()) && fresh(observed.at))
                .map(|(name, observed)| (name.as_str(), observed.value))
                .collect();
            let false_ones: Vec<&str> = matching
                .iter()
                .filter(|(_, value)| !**value)
                .map(|(name, _)| *name)
                .collect();
            if matching.is_empty() {
                let stale = evidence
                    .flags
                    .keys()
                    .any(|n| n.starts_with(prefix.as_str()));
                (false, missing(&format!("any {prefix}* flag"), stale))
            } else if false_ones.is_empty() {
                (true, format!("all {} {prefix}* flags true", matching.len()))
            } else {
                (
                    false,
                    format!(
                        "{} of {} {prefix}* flags false: {}",
                        false_ones.len(),
                        matching.len(),
                        false_ones.join(", ")
                    ),
                )
            }
        }
        Check::MinTimeInStage { min_time_in_stage } => {
            // A stage "started in the future" (clock skew) has lasted zero.
            let elapsed = (now - stage_started_at).to_std().unwrap_or(Duration::ZERO);
            let shown = short(Duration::from_secs(elapsed.as_secs()));
            let min = short(*min_time_in_stage);
            let message = match reading {
                Reading::Exit => format!("{shown} in stage, needs at least {min}"),
                Reading::Trigger => format!("{shown} in stage, fires at {min}"),
            };
            (elapsed >= *min_time_in_stage, message)
        }
    }
}

/// `None` for a window too long for chrono: it then reaches back without bound.
/// A duration in a check's message, as humantime writes it but with a space before "days"
/// ("7 days 2h", not "7days 2h").
fn short(d: Duration) -> String {
    humantime::format_duration(d)
        .to_string()
        .split(' ')
        .map(|part| match part.find("day") {
            Some(i) if i > 0 => format!("{} {}", &part[..i], &part[i..]),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn chrono_duration(d: Duration) -> Option<TimeDelta> {
    TimeDelta::from_std(d).ok()
}

/// The YAML and JSON form of a [`Criterion`]: one flat mapping. Deserialising through it
/// lets us reject unknown keys and say exactly which kind-specific key is missing or out of
/// place, which neither a flattened nor an untagged enum can.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCriterion {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<Op>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    equals: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    within: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all_flags: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    min_time_in_stage: Option<Duration>,
    /// Left out when it is the default, so playbooks that never say it keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<Since>,
}

impl TryFrom<RawCriterion> for Criterion {
    type Error = String;

    fn try_from(raw: RawCriterion) -> Result<Self, String> {
        let name = raw.name.clone();
        let since = raw.since.unwrap_or_default();
        let fail = |reason: String| Err(format!("criterion `{name}`: {reason}"));
        let kinds: Vec<&str> = [
            ("metric", raw.metric.is_some()),
            ("flag", raw.flag.is_some()),
            ("event", raw.event.is_some()),
            ("all_flags", raw.all_flags.is_some()),
            ("min_time_in_stage", raw.min_time_in_stage.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, present)| present.then_some(key))
        .collect();
        let [kind] = kinds.as_slice() else {
            return fail(format!(
                "give exactly one of `metric`, `flag`, `event`, `all_flags`, `min_time_in_stage` (found {})",
                if kinds.is_empty() {
                    "none".to_owned()
                } else {
                    kinds.join(", ")
                }
            ));
        };
        // Keys that belong to another kind are mistakes, not decoration.
        let allowed: &[&str] = match *kind {
            "metric" => &["op", "value"],
            "flag" => &["equals"],
            "event" => &["within", "max", "severity"],
            _ => &[],
        };
        let extras = [
            ("op", raw.op.is_some()),
            ("value", raw.value.is_some()),
            ("equals", raw.equals.is_some()),
            ("within", raw.within.is_some()),
            ("max", raw.max.is_some()),
            ("severity", raw.severity.is_some()),
        ];
        if let Some((key, _)) = extras
            .iter()
            .find(|(key, present)| *present && !allowed.contains(key))
        {
            return fail(format!("`{key}` does not apply to a `{kind}` check"));
        }
        let check = match raw {
            RawCriterion {
                metric: Some(metric),
                op,
                value,
                ..
            } => match (op, value) {
                (Some(op), Some(value)) => Check::Metric { metric, op, value },
                _ => return fail("a `metric` check needs `op` and `value`".to_owned()),
            },
            RawCriterion {
                flag: Some(flag),
                equals,
                ..
            } => Check::Flag {
                flag,
                equals: equals.unwrap_or(true),
            },
            RawCriterion {
                event: Some(event),
                within,
                max,
                severity,
                ..
            } => match within {
                Some(within) => Check::Events {
                    event,
                    within,
                    max: max.unwrap_or(0),
                    severity,
                },
                None => return fail("an `event` check needs `within`".to_owned()),
            },
            RawCriterion {
                all_flags: Some(prefix),
                ..
            } => Check::AllFlags { prefix },
            RawCriterion {
                min_time_in_stage: Some(min_time_in_stage),
                ..
            } => Check::MinTimeInStage { min_time_in_stage },
            _ => unreachable!("exactly one kind key is present"),
        };
        Ok(Criterion { name, check, since })
    }
}

impl From<Criterion> for RawCriterion {
    /// Defaults are written out (`equals`, `max`), so the stored form is explicit.
    fn from(criterion: Criterion) -> Self {
        let raw = RawCriterion {
            name: criterion.name,
            since: (criterion.since != Since::Stage).then_some(criterion.since),
            ..RawCriterion::default()
        };
        match criterion.check {
            Check::Metric { metric, op, value } => RawCriterion {
                metric: Some(metric),
                op: Some(op),
                value: Some(value),
                ..raw
            },
            Check::Flag { flag, equals } => RawCriterion {
                flag: Some(flag),
                equals: Some(equals),
                ..raw
            },
            Check::Events {
                event,
                within,
                max,
                severity,
            } => RawCriterion {
                event: Some(event),
                within: Some(within),
                max: Some(max),
                severity,
                ..raw
            },
            Check::AllFlags { prefix } => RawCriterion {
                all_flags: Some(prefix),
                ..raw
            },
            Check::MinTimeInStage { min_time_in_stage } => RawCriterion {
                min_time_in_stage: Some(min_time_in_stage),
                ..raw
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::evidence::{EvidenceEvent, Observed};
    use chrono::TimeZone;

    const NOW: i64 = 1_800_000_000;
    const HOUR: i64 = 3600;
    const DAY: i64 = 24 * HOUR;

    /// Seconds relative to NOW.
    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(NOW + secs, 0).unwrap()
    }

    fn now() -> DateTime<Utc> {
        t(0)
    }

    fn crit(yaml: &str) -> Criterion {
        serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    fn observed<T>(value: T, at: DateTime<Utc>) -> Observed<T> {
        Observed {
            value,
            at,
            source: "test".to_owned(),
            message_id: None,
        }
    }

    fn metrics(pairs: &[(&str, f64)]) -> Evidence {
        Evidence {
            metrics: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), observed(*v, t(-10))))
                .collect(),
            ..Evidence::default()
        }
    }

    /// Flag names and values, as a test case gives them.
    type FlagList<'a> = &'a [(&'a str, bool)];

    fn flags(pairs: FlagList) -> Evidence {
        Evidence {
            flags: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), observed(*v, t(-10))))
                .collect(),
            ..Evidence::default()
        }
    }

    fn event(name: &str, at: DateTime<Utc>, severity: Option<&str>) -> EvidenceEvent {
        EvidenceEvent {
            name: name.to_owned(),
            at,
            severity: severity.map(str::to_owned),
            detail: None,
            source: "test".to_owned(),
            message_id: None,
        }
    }

    /// The single check of evaluating one criterion, stage started a day ago.
    fn check(criterion: &Criterion, evidence: &Evidence) -> ValidationCheck {
        let result = evaluate(
            "sandbox",
            std::slice::from_ref(criterion),
            evidence,
            t(-DAY),
            now(),
        );
        assert_eq!(result.checks.len(), 1);
        assert_eq!(result.passed, result.checks[0].passed);
        result.checks[0].clone()
    }

    #[test]
    fn every_op_at_and_around_its_boundary() {
        let cases: &[(&str, f64, f64, bool)] = &[
            // (op, observed, threshold, passes)
            (">", 0.80, 0.80, false),
            (">", 0.8000001, 0.80, true),
            (">", 0.7999999, 0.80, false),
            (">=", 0.80, 0.80, true),
            (">=", 0.8000001, 0.80, true),
            (">=", 0.7999999, 0.80, false),
            ("<", 500.0, 500.0, false),
            ("<", 499.999, 500.0, true),
            ("<", 500.001, 500.0, false),
            ("<=", 500.0, 500.0, true),
            ("<=", 499.999, 500.0, true),
            ("<=", 500.001, 500.0, false),
            ("==", 0.0, 0.0, true),
            ("==", 0.0000001, 0.0, false),
            ("==", 1.0, 0.0, false),
            ("!=", 0.0, 0.0, false),
            ("!=", 0.0000001, 0.0, true),
            ("!=", -1.0, 0.0, true),
            // Names work as well as symbols.
            ("gt", 0.80, 0.80, false),
            ("ge", 0.80, 0.80, true),
            ("lt", 3.5, 3.5, false),
            ("le", 3.5, 3.5, true),
            ("eq", 2.0, 2.0, true),
            ("ne", 2.0, 2.0, false),
        ];
        for &(op, observed, threshold, passes) in cases {
            let criterion = crit(&format!(
                "{{name: c, metric: m.x, op: '{op}', value: {threshold}}}"
            ));
            let got = check(&criterion, &metrics(&[("m.x", observed)]));
            assert_eq!(
                got.passed, passes,
                "{observed} {op} {threshold}: {}",
                got.message
            );
        }
    }

    #[test]
    fn metric_messages_name_value_and_threshold() {
        let criterion =
            crit("{name: search_quality, metric: search.precision, op: '>', value: 0.80}");
        assert_eq!(
            check(&criterion, &metrics(&[("search.precision", 0.78)])),
            ValidationCheck {
                name: "search_quality".to_owned(),
                passed: false,
                message: "search.precision = 0.78, needs > 0.8".to_owned(),
            }
        );
        assert_eq!(
            check(&criterion, &metrics(&[("search.precision", 0.91)])).message,
            "search.precision = 0.91, needs > 0.8"
        );
        // Missing evidence fails and says so, even when another metric is present.
        assert_eq!(
            check(&criterion, &metrics(&[("search.recall", 0.99)])),
            ValidationCheck {
                name: "search_quality".to_owned(),
                passed: false,
                message: "no value reported for search.precision".to_owned(),
            }
        );
    }

    #[test]
    fn flag_checks() {
        let approved = crit("{name: demo_approved, flag: demo.approved}");
        let must_be_off = crit("{name: off, flag: maintenance, equals: false}");
        let cases: &[(&Criterion, FlagList, bool, &str)] = &[
            (
                &approved,
                &[("demo.approved", true)],
                true,
                "demo.approved = true, needs true",
            ),
            (
                &approved,
                &[("demo.approved", false)],
                false,
                "demo.approved = false, needs true",
            ),
            (&approved, &[], false, "no value reported for demo.approved"),
            (
                &must_be_off,
                &[("maintenance", false)],
                true,
                "maintenance = false, needs false",
            ),
            (
                &must_be_off,
                &[("maintenance", true)],
                false,
                "maintenance = true, needs false",
            ),
        ];
        for &(criterion, pairs, passes, message) in cases {
            let got = check(criterion, &flags(pairs));
            assert_eq!(
                (got.passed, got.message.as_str()),
                (passes, message),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn events_are_counted_inside_the_window_only() {
        let no_bugs = crit("{name: no_critical_bugs, event: bug.critical, within: 7d}");
        let week = 7 * DAY;
        let cases: &[(&[i64], bool, &str)] = &[
            // (event times relative to now, passes, message)
            (
                &[],
                true,
                "0 bug.critical events in the last 7 days, allowed at most 0",
            ),
            (&[-week - 1], true, "0 bug.critical events"),
            (
                &[-week],
                false,
                "1 bug.critical event in the last 7 days, allowed at most 0",
            ),
            (&[0], false, "1 bug.critical event "),
            (&[-HOUR, -2 * DAY], false, "2 bug.critical events"),
            // Reported with a time in the future: not in [now - 7d, now].
            (&[1], true, "0 bug.critical events"),
        ];
        for &(times, passes, message) in cases {
            let evidence = Evidence {
                events: times
                    .iter()
                    .map(|s| event("bug.critical", t(*s), None))
                    .collect(),
                ..Evidence::default()
            };
            let got = check(&no_bugs, &evidence);
            assert_eq!(got.passed, passes, "{times:?}: {}", got.message);
            assert!(
                got.message.starts_with(message),
                "{times:?}: {}",
                got.message
            );
        }

        // Other names do not count; `max` allows some.
        let evidence = Evidence {
            events: vec![
                event("bug.minor", t(-1), None),
                event("bug.critical", t(-1), None),
                event("bug.critical", t(-2), None),
            ],
            ..Evidence::default()
        };
        assert!(!check(&no_bugs, &evidence).passed);
        let two_ok = crit("{name: few, event: bug.critical, within: 1h, max: 2}");
        assert!(check(&two_ok, &evidence).passed);
        let one_ok = crit("{name: few, event: bug.critical, within: 1h, max: 1}");
        assert_eq!(
            check(&one_ok, &evidence).message,
            "2 bug.critical events in the last 1h, allowed at most 1"
        );
    }

    #[test]
    fn event_severity_filter() {
        let evidence = Evidence {
            events: vec![
                event("security.vulnerability", t(-5), Some("high")),
                event("security.vulnerability", t(-4), None),
                event("security.vulnerability", t(-3), Some("high")),
                event("security.vulnerability", t(-2), Some("CRITICAL")),
            ],
            ..Evidence::default()
        };
        let cases = [
            (
                "critical",
                false,
                "1 security.vulnerability event of severity critical",
            ),
            (
                "high",
                false,
                "2 security.vulnerability events of severity high",
            ),
            (
                "low",
                true,
                "0 security.vulnerability events of severity low",
            ),
        ];
        for (severity, passes, message) in cases {
            let criterion = crit(&format!(
                "{{name: vulns, event: security.vulnerability, within: 1d, severity: {severity}}}"
            ));
            let got = check(&criterion, &evidence);
            assert_eq!(got.passed, passes, "{severity}");
            assert!(got.message.starts_with(message), "{}", got.message);
        }
        // Without a severity every one counts.
        let any = crit("{name: vulns, event: security.vulnerability, within: 1d, max: 3}");
        assert_eq!(
            check(&any, &evidence).message,
            "4 security.vulnerability events in the last 1 day, allowed at most 3"
        );
    }

    #[test]
    fn all_flags() {
        let syncing = crit("{name: connectors_syncing, all_flags: connector.}");
        let cases: &[(FlagList, bool, &str)] = &[
            (&[], false, "no value reported for any connector.* flag"),
            // Only names starting with the prefix count.
            (
                &[("connectors.slack", true), ("demo.approved", true)],
                false,
                "no value reported for any connector.* flag",
            ),
            (
                &[
                    ("connector.slack.syncing", true),
                    ("connector.jira.syncing", false),
                    ("connector.drive.syncing", false),
                ],
                false,
                "2 of 3 connector.* flags false: connector.drive.syncing, connector.jira.syncing",
            ),
            (
                &[
                    ("connector.slack.syncing", true),
                    ("connector.all.syncing", true),
                    ("connectorx", false),
                ],
                true,
                "all 2 connector.* flags true",
            ),
        ];
        for &(pairs, passes, message) in cases {
            let got = check(&syncing, &flags(pairs));
            assert_eq!(
                (got.passed, got.message.as_str()),
                (passes, message),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn min_time_in_stage() {
        let soak = crit("{name: soak, min_time_in_stage: 1h}");
        let cases: &[(i64, bool, &str)] = &[
            // (stage started, relative to now; passes; message)
            (-HOUR, true, "1h in stage, needs at least 1h"),
            (-HOUR - 1, true, "1h 1s in stage, needs at least 1h"),
            (-HOUR + 1, false, "59m 59s in stage, needs at least 1h"),
            (0, false, "0s in stage, needs at least 1h"),
            // Clock skew: a stage that starts "later" has lasted nothing.
            (60, false, "0s in stage, needs at least 1h"),
        ];
        for &(started, passes, message) in cases {
            let result = evaluate(
                "pilot",
                std::slice::from_ref(&soak),
                &Evidence::default(),
                t(started),
                now(),
            );
            let got = &result.checks[0];
            assert_eq!(
                (got.passed, got.message.as_str()),
                (passes, message),
                "{started}"
            );
        }
        // Sub-second precision still counts at the boundary.
        let almost = t(-HOUR) + TimeDelta::milliseconds(1);
        assert!(
            !evaluate(
                "p",
                std::slice::from_ref(&soak),
                &Evidence::default(),
                almost,
                now()
            )
            .passed
        );
    }

    #[test]
    fn evaluate_keeps_order_and_needs_every_check() {
        let criteria = [
            crit("{name: a, metric: m, op: '>=', value: 1}"),
            crit("{name: b, flag: f}"),
            crit("{name: c, event: e, within: 1h}"),
        ];
        let mut evidence = metrics(&[("m", 1.0)]);
        evidence
            .flags
            .insert("f".to_owned(), observed(false, t(-1)));
        let result = evaluate("pilot", &criteria, &evidence, t(-DAY), now());
        assert_eq!(result.stage, "pilot");
        assert_eq!(result.evaluated_at, now());
        assert!(!result.passed);
        let verdicts: Vec<(&str, bool)> = result
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.passed))
            .collect();
        assert_eq!(verdicts, [("a", true), ("b", false), ("c", true)]);
        assert_eq!(
            result.summary(),
            "1 of 3 checks failed: b: f = false, needs true"
        );

        evidence.flags.insert("f".to_owned(), observed(true, t(-1)));
        let result = evaluate("pilot", &criteria, &evidence, t(-DAY), now());
        assert!(result.passed);
        assert_eq!(result.summary(), "all 3 checks passed");

        let empty = evaluate("production", &[], &Evidence::default(), t(-DAY), now());
        assert!(empty.passed);
        assert!(empty.checks.is_empty());

        // Recorded in history: it round-trips.
        let json = serde_json::to_string(&result).unwrap();
        assert_eq!(
            serde_json::from_str::<ValidationResult>(&json).unwrap(),
            result
        );
    }

    #[test]
    fn triggers_fire_when_their_condition_holds() {
        let started = t(-DAY);
        let triggers = [
            crit("{name: low_satisfaction, metric: user.satisfaction, op: '<', value: 3.5}"),
            crit("{name: paused, flag: client.pause_requested}"),
            crit("{name: critical_bug, event: bug.critical, within: 7d}"),
            crit("{name: all_down, all_flags: outage.}"),
            crit("{name: stage_timeout, min_time_in_stage: 2d}"),
        ];
        let fire = |evidence: &Evidence, started| -> Vec<(String, String)> {
            triggered(&triggers, evidence, started, now())
                .into_iter()
                .map(|hit| (hit.name, hit.message))
                .collect()
        };

        assert!(
            fire(&Evidence::default(), started).is_empty(),
            "nothing reported"
        );

        let mut quiet = metrics(&[("user.satisfaction", 3.5)]);
        quiet
            .flags
            .insert("client.pause_requested".to_owned(), observed(false, t(-1)));
        quiet
            .flags
            .insert("outage.eu".to_owned(), observed(true, t(-1)));
        quiet
            .flags
            .insert("outage.us".to_owned(), observed(false, t(-1)));
        assert!(fire(&quiet, started).is_empty(), "3.5 is not < 3.5");

        let mut loud = metrics(&[("user.satisfaction", 3.4999)]);
        loud.flags
            .insert("client.pause_requested".to_owned(), observed(true, t(-1)));
        loud.flags
            .insert("outage.eu".to_owned(), observed(true, t(-1)));
        loud.events.push(event("bug.critical", t(-HOUR), None));
        assert_eq!(
            fire(&loud, started),
            [
                (
                    "low_satisfaction".to_owned(),
                    "user.satisfaction = 3.4999, fires when < 3.5".to_owned()
                ),
                (
                    "paused".to_owned(),
                    "client.pause_requested = true, fires when true".to_owned()
                ),
                (
                    "critical_bug".to_owned(),
                    "1 bug.critical event since the stage started, fires when more than 0"
                        .to_owned()
                ),
                (
                    "all_down".to_owned(),
                    "all 1 outage.* flags true".to_owned()
                ),
            ]
        );

        // Stage timeout at exactly its boundary.
        let timeout = fire(&Evidence::default(), t(-2 * DAY));
        assert_eq!(
            timeout,
            [(
                "stage_timeout".to_owned(),
                "2 days in stage, fires at 2 days".to_owned()
            )]
        );
        assert!(fire(&Evidence::default(), t(-2 * DAY + 1)).is_empty());

        // The window, not the stage, bounds events when the stage is older than it.
        let old_stage = t(-30 * DAY);
        let bugs = &triggers[2..3];
        let mut evidence = Evidence::default();
        evidence
            .events
            .push(event("bug.critical", t(-8 * DAY), None));
        assert!(
            triggered(bugs, &evidence, old_stage, now()).is_empty(),
            "outside 7d"
        );
        evidence
            .events
            .push(event("bug.critical", t(-7 * DAY), None));
        assert_eq!(
            triggered(bugs, &evidence, old_stage, now()),
            [TriggerHit {
                name: "critical_bug".to_owned(),
                message: "1 bug.critical event in the last 7 days, fires when more than 0"
                    .to_owned(),
            }]
        );
    }

    #[test]
    fn triggers_ignore_evidence_from_before_the_stage() {
        let started = t(-HOUR);
        let triggers = [
            crit("{name: low_satisfaction, metric: user.satisfaction, op: '<', value: 3.5}"),
            crit("{name: critical_bug, event: bug.critical, within: 7d}"),
            crit("{name: vuln, flag: security.breach}"),
        ];
        let mut evidence = Evidence::default();
        evidence
            .metrics
            .insert("user.satisfaction".to_owned(), observed(3.0, t(-HOUR - 1)));
        evidence
            .flags
            .insert("security.breach".to_owned(), observed(true, t(-HOUR - 1)));
        evidence
            .events
            .push(event("bug.critical", t(-HOUR - 1), None));
        assert!(triggered(&triggers, &evidence, started, now()).is_empty());

        // Exit criteria do read it: the 7-day bug window spans stages.
        let exit = [crit("{name: no_bugs, event: bug.critical, within: 7d}")];
        assert!(!evaluate("pilot", &exit, &evidence, started, now()).passed);

        // A metric observed exactly at the stage start belongs to the step that entered
        // it (the one before); an event dated exactly at the stage start counts.
        evidence
            .metrics
            .insert("user.satisfaction".to_owned(), observed(3.0, started));
        evidence.events.push(event("bug.critical", started, None));
        let names: Vec<String> = triggered(&triggers, &evidence, started, now())
            .into_iter()
            .map(|hit| hit.name)
            .collect();
        assert_eq!(names, ["critical_bug"]);
        evidence.metrics.insert(
            "user.satisfaction".to_owned(),
            observed(3.0, started + TimeDelta::milliseconds(1)),
        );
        let names: Vec<String> = triggered(&triggers, &evidence, started, now())
            .into_iter()
            .map(|hit| hit.name)
            .collect();
        assert_eq!(names, ["low_satisfaction", "critical_bug"]);
    }

    #[test]
    fn yaml_forms_and_round_trip() {
        let cases = [
            (
                "{name: a, metric: search.precision, op: '>', value: 0.80}",
                Check::Metric {
                    metric: "search.precision".into(),
                    op: Op::Gt,
                    value: 0.8,
                },
            ),
            (
                "{name: a, metric: security.critical_count, op: '==', value: 0}",
                Check::Metric {
                    metric: "security.critical_count".into(),
                    op: Op::Eq,
                    value: 0.0,
                },
            ),
            (
                "{name: a, flag: demo.approved}",
                Check::Flag {
                    flag: "demo.approved".into(),
                    equals: true,
                },
            ),
            (
                "{name: a, flag: x, equals: false}",
                Check::Flag {
                    flag: "x".into(),
                    equals: false,
                },
            ),
            (
                "{name: a, event: bug.critical, within: 7d}",
                Check::Events {
                    event: "bug.critical".into(),
                    within: Duration::from_secs(7 * 86400),
                    max: 0,
                    severity: None,
                },
            ),
            (
                "{name: a, event: incident, within: 90m, max: 2, severity: p1}",
                Check::Events {
                    event: "incident".into(),
                    within: Duration::from_secs(5400),
                    max: 2,
                    severity: Some("p1".into()),
                },
            ),
            (
                "{name: a, all_flags: connector.}",
                Check::AllFlags {
                    prefix: "connector.".into(),
                },
            ),
            (
                "{name: a, min_time_in_stage: 3d}",
                Check::MinTimeInStage {
                    min_time_in_stage: Duration::from_secs(3 * 86400),
                },
            ),
        ];
        for (yaml, want) in cases {
            let criterion = crit(yaml);
            assert_eq!(criterion.check, want, "{yaml}");
            let json = serde_json::to_value(&criterion).unwrap();
            assert_eq!(
                serde_json::from_value::<Criterion>(json).unwrap(),
                criterion,
                "{yaml}"
            );
        }
        assert_eq!(
            serde_json::to_value(crit("{name: a, event: bug.critical, within: 7d}")).unwrap(),
            serde_json::json!({"name": "a", "event": "bug.critical", "within": "7days", "max": 0})
        );
    }

    #[test]
    fn malformed_criteria_are_rejected_clearly() {
        let cases = [
            (
                "{name: a}",
                "criterion `a`: give exactly one of `metric`, `flag`, `event`, `all_flags`, `min_time_in_stage` (found none)",
            ),
            (
                "{name: a, metric: m, flag: f, op: '>', value: 1}",
                "(found metric, flag)",
            ),
            (
                "{name: a, metric: m, op: '>'}",
                "criterion `a`: a `metric` check needs `op` and `value`",
            ),
            ("{name: a, metric: m, value: 1}", "needs `op` and `value`"),
            (
                "{name: a, metric: m, op: '=>', value: 1}",
                "unknown variant `=>`",
            ),
            (
                "{name: a, event: e}",
                "criterion `a`: an `event` check needs `within`",
            ),
            ("{name: a, event: e, within: soon}", "within"),
            (
                "{name: a, flag: f, value: 1}",
                "criterion `a`: `value` does not apply to a `flag` check",
            ),
            (
                "{name: a, metric: m, op: '>', value: 1, within: 1h}",
                "`within` does not apply to a `metric` check",
            ),
            (
                "{name: a, all_flags: p, equals: true}",
                "`equals` does not apply to a `all_flags` check",
            ),
            (
                "{name: a, flag: f, treshold: 1}",
                "unknown field `treshold`",
            ),
            ("{metric: m, op: '>', value: 1}", "missing field `name`"),
        ];
        for (yaml, want) in cases {
            let err = serde_norway::from_str::<Criterion>(yaml)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{yaml}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn criterion_validation() {
        let ok = [
            "{name: a, metric: search.precision, op: '>', value: 0.8}",
            "{name: a, event: bug.critical, within: 1s}",
            "{name: a, all_flags: connector.}",
        ];
        for yaml in ok {
            crit(yaml).validate().unwrap();
        }
        let cases = [
            (
                "{name: a, metric: Search.Precision, op: '>', value: 0.8}",
                "invalid metric name `Search.Precision` (allowed: lowercase letters, digits, `_`, `.`, `-`)",
            ),
            (
                "{name: a, metric: m, op: '>', value: .nan}",
                "value must be a finite number, got NaN",
            ),
            (
                "{name: a, flag: 'demo approved'}",
                "invalid flag name `demo approved`",
            ),
            (
                "{name: a, event: 'bug/critical', within: 1h}",
                "invalid event name `bug/critical`",
            ),
            (
                "{name: a, event: e, within: 0s}",
                "`within` must be greater than zero",
            ),
            (
                "{name: a, event: e, within: 1h, severity: ' '}",
                "`severity` must not be empty",
            ),
            ("{name: a, all_flags: ''}", "invalid flag prefix ``"),
            (
                "{name: a, min_time_in_stage: 0s}",
                "`min_time_in_stage` must be greater than zero",
            ),
        ];
        for (yaml, want) in cases {
            let err = crit(yaml).validate().unwrap_err();
            assert!(err.starts_with(want), "{yaml}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn longest_window() {
        let criteria = [
            crit("{name: a, event: e, within: 1h}"),
            crit("{name: b, metric: m, op: '>', value: 1}"),
            crit("{name: c, event: e, within: 7d}"),
        ];
        assert_eq!(
            longest_event_window(&criteria),
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(longest_event_window(&criteria[1..2]), None);
    }

    /// Records what the simulated agents return for a stage's tasks, through the default
    /// playbook's evidence mappings, as the orchestrator will.
    fn run_sim_stage(
        playbook: &crate::domain::playbook::Playbook,
        stage: &str,
        evidence: &mut Evidence,
        at: DateTime<Utc>,
    ) {
        for task in &playbook.stage(stage).unwrap().tasks {
            let output = crate::agent::sim::simulated_output(&task.intent, "client-1", &task.input);
            let problems =
                evidence.record_task_output(&task.evidence, &output, &task.task_id, None, at);
            assert!(problems.is_empty(), "{}: {problems:?}", task.task_id);
        }
    }

    fn failing(result: &ValidationResult) -> Vec<(&str, &str)> {
        result
            .failed_checks()
            .map(|c| (c.name.as_str(), c.message.as_str()))
            .collect()
    }

    #[test]
    fn default_playbook_gates_over_simulated_outputs() {
        use crate::domain::command::{EvidenceEvent as Reported, EvidencePayload};

        let playbook = crate::domain::playbook::Playbook::default_playbook();
        let stage = |name: &str| playbook.stage(name).unwrap();
        let mut evidence = Evidence::default();
        let started = t(-HOUR);

        // Sandbox: the tasks prove connectors and security; precision and the demo
        // approval must come from upstream agents.
        run_sim_stage(&playbook, "sandbox", &mut evidence, t(-HOUR / 2));
        let sandbox = stage("sandbox");
        let result = evaluate("sandbox", &sandbox.exit_criteria, &evidence, started, now());
        assert_eq!(
            failing(&result),
            [
                ("search_quality", "no value reported for search.precision"),
                ("demo_approved", "no value reported for demo.approved"),
            ]
        );
        assert_eq!(result.checks[0].message, "all 1 connector.* flags true");
        assert_eq!(
            result.checks[2].message,
            "security.critical_count = 0, needs == 0"
        );
        assert!(triggered(&sandbox.rollback_triggers, &evidence, started, now()).is_empty());

        let mut upstream = EvidencePayload {
            client_id: "client-1".to_owned(),
            metrics: BTreeMap::from([("search.precision".to_owned(), 0.80)]),
            flags: BTreeMap::from([("demo.approved".to_owned(), true)]),
            events: vec![],
        };
        evidence.record_report(&upstream, "qa-agent", "m1", t(-60));
        let result = evaluate("sandbox", &sandbox.exit_criteria, &evidence, started, now());
        assert_eq!(
            failing(&result),
            [("search_quality", "search.precision = 0.8, needs > 0.8")],
            "80 % is not > 80 %"
        );
        upstream.metrics.insert("search.precision".to_owned(), 0.81);
        evidence.record_report(&upstream, "qa-agent", "m2", t(-30));
        assert!(evaluate("sandbox", &sandbox.exit_criteria, &evidence, started, now()).passed);

        // Pilot: the simulated outputs meet every criterion by themselves.
        let pilot = stage("pilot");
        let pilot_started = t(-10);
        run_sim_stage(&playbook, "pilot", &mut evidence, t(-5));
        let result = evaluate(
            "pilot",
            &pilot.exit_criteria,
            &evidence,
            pilot_started,
            now(),
        );
        assert!(result.passed, "{}", result.summary());
        let messages: Vec<&str> = result.checks.iter().map(|c| c.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "search.precision = 0.91, needs > 0.85",
                "user.satisfaction = 4.4, needs > 4",
                "0 bug.critical events in the last 7 days, allowed at most 0",
                "latency.p95_ms = 310, needs < 500",
            ]
        );
        assert!(triggered(&pilot.rollback_triggers, &evidence, pilot_started, now()).is_empty());

        // A critical bug fails the gate and fires the rollback trigger.
        let bug = EvidencePayload {
            client_id: "client-1".to_owned(),
            metrics: BTreeMap::new(),
            flags: BTreeMap::new(),
            events: vec![Reported {
                name: "bug.critical".to_owned(),
                at: None,
                severity: Some("critical".to_owned()),
                detail: Some("search returns other tenants' documents".to_owned()),
            }],
        };
        evidence.record_report(&bug, "bug-tracker", "m3", now());
        let result = evaluate(
            "pilot",
            &pilot.exit_criteria,
            &evidence,
            pilot_started,
            now(),
        );
        assert_eq!(
            failing(&result),
            [(
                "no_critical_bugs",
                "1 bug.critical event in the last 7 days, allowed at most 0"
            )]
        );
        assert_eq!(
            triggered(&pilot.rollback_triggers, &evidence, pilot_started, now()),
            [TriggerHit {
                name: "critical_bug".to_owned(),
                message: "1 bug.critical event since the stage started, fires when more than 0"
                    .to_owned(),
            }]
        );

        // Production: nothing reported yet, so `journey.complete` is refused.
        let production = stage("production");
        let result = evaluate(
            "production",
            &production.exit_criteria,
            &evidence,
            now(),
            now(),
        );
        assert_eq!(
            result.summary(),
            "3 of 3 checks failed: user_adoption: no value reported for users.adoption; \
             search_satisfaction: no value reported for search.satisfaction; \
             query_growth: no value reported for query.growth_mom"
        );
        assert!(triggered(&production.rollback_triggers, &evidence, now(), now()).is_empty());
        let survey = EvidencePayload {
            client_id: "client-1".to_owned(),
            metrics: BTreeMap::from([("user.satisfaction".to_owned(), 3.9)]),
            flags: BTreeMap::new(),
            events: vec![],
        };
        evidence.record_report(&survey, "feedback-agent", "m4", now());
        // Observed after the stage started (a value from the entering instant is not).
        assert_eq!(
            triggered(&production.rollback_triggers, &evidence, t(-1), now()),
            [TriggerHit {
                name: "low_satisfaction".to_owned(),
                message: "user.satisfaction = 3.9, fires when < 4".to_owned(),
            }]
        );
    }

    #[test]
    fn huge_windows_reach_back_without_bound() {
        let criterion = crit("{name: a, event: e, within: 100000000years}");
        let evidence = Evidence {
            events: vec![event("e", Utc.timestamp_opt(0, 0).unwrap(), None)],
            ..Evidence::default()
        };
        assert!(!check(&criterion, &evidence).passed);
    }
}
