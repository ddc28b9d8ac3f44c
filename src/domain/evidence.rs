//! Evidence: what a journey has been told about itself, which the gates judge. Metrics
//! (numbers) and flags (booleans) keep their latest value; events (a critical bug, a P1
//! incident) accumulate with their time. Every value keeps where it came from — an agent id
//! or `task:<task_id>` — when it was observed and the message that carried it, so a gate's
//! verdict can be audited back to its inputs.
//!
//! Evidence arrives two ways: `journey.evidence` reports from upstream agents
//! ([`Evidence::record_report`]) and task outputs, through the playbook's per-task
//! `evidence` mapping ([`extract`], [`Evidence::record_task_output`]).
//!
//! This module owns only the bookkeeping. It must not read the clock (callers pass `now`),
//! touch storage or the broker, or judge anything: that is [`crate::domain::gate`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::command::EvidencePayload;

/// One observed value with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observed<T> {
    /// The value itself.
    pub value: T,
    /// When it was observed: the time the orchestrator received it.
    pub at: DateTime<Utc>,
    /// Who said so: the reporting agent's id, or `task:<task_id>` for a mapped task output.
    pub source: String,
    /// The message that carried it, so an audit can find the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl<T> Observed<T> {
    pub fn new(value: T, at: DateTime<Utc>, source: &str, message_id: Option<&str>) -> Self {
        Self {
            value,
            at,
            source: source.to_owned(),
            message_id: message_id.map(str::to_owned),
        }
    }
}

/// A dated occurrence (a critical bug, an incident) as stored: the reported event plus its
/// provenance. Distinct from [`crate::domain::command::EvidenceEvent`], the wire form, whose `at`
/// is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceEvent {
    /// What happened, e.g. `bug.critical`, `incident.p1`.
    pub name: String,
    /// When it happened: as reported, or the time the report arrived if it gave none.
    pub at: DateTime<Utc>,
    /// Reporter's severity, e.g. `critical`; criteria may filter on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Who reported it (agent id).
    pub source: String,
    /// The message that carried it; also how a redelivered report is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// Everything a journey has accumulated. Stored with the journey; gates read it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Latest value per metric name (`search.precision`, `latency.p95_ms`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, Observed<f64>>,
    /// Latest value per flag name (`demo.approved`, `connector.all.syncing`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, Observed<bool>>,
    /// Every event still within the retention the caller prunes to, in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EvidenceEvent>,
}

impl Evidence {
    /// Merges a `journey.evidence` payload reported by `source` in message `message_id`,
    /// received at `now`. Metrics and flags are observed at `now`; events keep their
    /// reported `at`, or get `now` when they have none.
    ///
    /// Redelivery-safe: if events from `message_id` are already recorded, the payload's
    /// events are not appended again (metrics and flags are overwritten, which is harmless).
    pub fn record_report(
        &mut self,
        p: &EvidencePayload,
        source: &str,
        message_id: &str,
        now: DateTime<Utc>,
    ) {
        for (name, value) in &p.metrics {
            let value = Observed::new(*value, now, source, Some(message_id));
            set_latest(&mut self.metrics, name, value);
        }
        for (name, value) in &p.flags {
            let value = Observed::new(*value, now, source, Some(message_id));
            set_latest(&mut self.flags, name, value);
        }
        let seen = self
            .events
            .iter()
            .any(|event| event.message_id.as_deref() == Some(message_id));
        if !seen {
            self.events
                .extend(p.events.iter().map(|event| EvidenceEvent {
                    name: event.name.clone(),
                    at: event.at.unwrap_or(now),
                    severity: event.severity.clone(),
                    detail: event.detail.clone(),
                    source: source.to_owned(),
                    message_id: Some(message_id.to_owned()),
                }));
        }
    }

    /// Records one value mapped from a task output: a number becomes a metric, a boolean a
    /// flag. Anything else is refused with a reason for the caller to log; the evidence is
    /// unchanged then.
    pub fn record_value(
        &mut self,
        name: &str,
        v: &Value,
        source: &str,
        message_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        match v {
            Value::Bool(flag) => {
                let value = Observed::new(*flag, now, source, message_id);
                set_latest(&mut self.flags, name, value);
            }
            // JSON numbers are always finite; as_f64 only fails for arbitrary precision.
            Value::Number(number) => match number.as_f64() {
                Some(metric) => {
                    let value = Observed::new(metric, now, source, message_id);
                    set_latest(&mut self.metrics, name, value);
                }
                None => {
                    return Err(format!(
                        "evidence `{name}`: {number} is not a finite number"
                    ));
                }
            },
            other => {
                return Err(format!(
                    "evidence `{name}`: expected a number or a boolean, got {}",
                    json_type(other)
                ));
            }
        }
        Ok(())
    }

    /// Maps a completed task's output through the task's `evidence` mapping (evidence name →
    /// dotted path, see [`extract`]) and records every value with source `task:<task_id>`.
    /// Returns one reason per mapping entry that recorded nothing (path absent, or a value
    /// that is neither a number nor a boolean), for the caller to log; an empty mapping
    /// records nothing and returns nothing.
    pub fn record_task_output(
        &mut self,
        mapping: &BTreeMap<String, String>,
        output: &Value,
        task_id: &str,
        message_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Vec<String> {
        let source = format!("task:{task_id}");
        let mut problems = Vec::new();
        for (name, path) in mapping {
            match lookup_path(output, path) {
                Some(value) => {
                    if let Err(reason) = self.record_value(name, value, &source, message_id, now) {
                        problems.push(format!("task `{task_id}`: {reason} at `{path}`"));
                    }
                }
                None => problems.push(format!(
                    "task `{task_id}`: evidence `{name}`: its output has no value at `{path}`"
                )),
            }
        }
        problems
    }

    /// Drops events that happened before `t`, so the list stays bounded. Callers pass
    /// `now - longest window` (see [`crate::domain::gate::longest_event_window`]); metrics and flags
    /// are bounded by their names and kept.
    pub fn prune_events_before(&mut self, t: DateTime<Utc>) {
        self.events.retain(|event| event.at >= t);
    }

    /// The latest value of a metric.
    pub fn metric(&self, name: &str) -> Option<&Observed<f64>> {
        self.metrics.get(name)
    }

    /// The latest value of a flag.
    pub fn flag(&self, name: &str) -> Option<&Observed<bool>> {
        self.flags.get(name)
    }
}

/// Latest wins, judged by observation time; on a tie the later call wins. Comparing times
/// rather than always overwriting keeps an out-of-order replay of an older observation from
/// hiding a newer one.
fn set_latest<T>(map: &mut BTreeMap<String, Observed<T>>, name: &str, value: Observed<T>) {
    match map.get(name) {
        Some(existing) if existing.at > value.at => {}
        _ => {
            map.insert(name.to_owned(), value);
        }
    }
}

/// The values a task's `evidence` mapping selects from its output, as (evidence name,
/// value) pairs in name order. Paths are dotted object keys; a segment that is a number
/// indexes an array (`connectors.0.status`). Mapping entries whose path is absent are
/// skipped; a JSON `null` at the path counts as present.
pub fn extract(mapping: &BTreeMap<String, String>, output: &Value) -> Vec<(String, Value)> {
    mapping
        .iter()
        .filter_map(|(name, path)| Some((name.clone(), lookup_path(output, path)?.clone())))
        .collect()
}

/// Is `path` a well-formed evidence path: non-empty segments separated by dots, no
/// whitespace. Playbook validation uses it; [`extract`] just finds nothing at a bad path.
pub fn is_valid_path(path: &str) -> bool {
    path.split('.')
        .all(|segment| !segment.is_empty() && !segment.chars().any(char::is_whitespace))
}

/// Is `name` a valid evidence (metric, flag, event) name: `[a-z0-9_.-]+`. Reports with
/// other names are still recorded, but no criterion can refer to them.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

fn lookup_path<'v>(output: &'v Value, path: &str) -> Option<&'v Value> {
    if !is_valid_path(path) {
        return None;
    }
    path.split('.').try_fold(output, |value, key| match value {
        Value::Object(map) => map.get(key),
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::EvidenceEvent as ReportedEvent;
    use chrono::TimeZone;
    use serde_json::json;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn report(
        metrics: &[(&str, f64)],
        flags: &[(&str, bool)],
        events: &[ReportedEvent],
    ) -> EvidencePayload {
        EvidencePayload {
            client_id: "client-1".to_owned(),
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            flags: flags.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            events: events.to_vec(),
        }
    }

    fn reported(name: &str, at: Option<DateTime<Utc>>, severity: Option<&str>) -> ReportedEvent {
        ReportedEvent {
            name: name.to_owned(),
            at,
            severity: severity.map(str::to_owned),
            detail: None,
        }
    }

    #[test]
    fn reports_keep_provenance_and_latest_wins() {
        let mut evidence = Evidence::default();
        evidence.record_report(
            &report(
                &[("search.precision", 0.78)],
                &[("demo.approved", false)],
                &[],
            ),
            "qa-agent",
            "m1",
            t(0),
        );
        evidence.record_report(
            &report(&[("search.precision", 0.83)], &[], &[]),
            "qa-agent-2",
            "m2",
            t(10),
        );
        assert_eq!(
            evidence.metric("search.precision"),
            Some(&Observed {
                value: 0.83,
                at: t(10),
                source: "qa-agent-2".to_owned(),
                message_id: Some("m2".to_owned()),
            })
        );
        // Untouched by the second report.
        let approved = evidence.flag("demo.approved").unwrap();
        assert!(!approved.value);
        assert_eq!(approved.message_id.as_deref(), Some("m1"));

        // An older observation replayed late does not hide the newer one.
        evidence.record_report(
            &report(&[("search.precision", 0.5)], &[], &[]),
            "old",
            "m0",
            t(5),
        );
        assert_eq!(evidence.metric("search.precision").unwrap().value, 0.83);
        // Same time: the later call wins.
        evidence.record_report(
            &report(&[("search.precision", 0.9)], &[], &[]),
            "same",
            "m3",
            t(10),
        );
        assert_eq!(evidence.metric("search.precision").unwrap().value, 0.9);
    }

    #[test]
    fn events_accumulate_default_to_now_and_ignore_redelivery() {
        let mut evidence = Evidence::default();
        let events = [
            reported("bug.critical", Some(t(-100)), Some("critical")),
            reported("incident.p1", None, None),
        ];
        evidence.record_report(&report(&[], &[], &events), "bugs", "m1", t(0));
        evidence.record_report(&report(&[], &[], &events[..1]), "bugs", "m2", t(50));
        // m1 redelivered: nothing appended.
        evidence.record_report(&report(&[], &[], &events), "bugs", "m1", t(60));
        let got: Vec<(&str, DateTime<Utc>, Option<&str>)> = evidence
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.at, e.message_id.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("bug.critical", t(-100), Some("m1")),
                ("incident.p1", t(0), Some("m1")),
                ("bug.critical", t(-100), Some("m2")),
            ]
        );
        assert_eq!(evidence.events[0].severity.as_deref(), Some("critical"));
        assert_eq!(evidence.events[0].source, "bugs");

        evidence.prune_events_before(t(-100));
        assert_eq!(evidence.events.len(), 3, "boundary kept");
        evidence.prune_events_before(t(-99));
        assert_eq!(evidence.events.len(), 1);
        assert_eq!(evidence.events[0].name, "incident.p1");
    }

    #[test]
    fn record_value_maps_numbers_and_booleans_only() {
        let mut evidence = Evidence::default();
        evidence
            .record_value(
                "security.critical_count",
                &json!(0),
                "task:scan",
                Some("m1"),
                t(0),
            )
            .unwrap();
        evidence
            .record_value(
                "connector.all.syncing",
                &json!(true),
                "task:install",
                None,
                t(0),
            )
            .unwrap();
        assert_eq!(
            evidence.metric("security.critical_count").unwrap().value,
            0.0
        );
        assert_eq!(
            evidence.metric("security.critical_count").unwrap().source,
            "task:scan"
        );
        let flag = evidence.flag("connector.all.syncing").unwrap();
        assert!(flag.value);
        assert_eq!(flag.message_id, None);

        let before = evidence.clone();
        for (value, reason) in [
            (
                json!("0"),
                "evidence `x`: expected a number or a boolean, got a string",
            ),
            (json!(null), "got null"),
            (json!([1]), "got an array"),
            (json!({"a": 1}), "got a mapping"),
        ] {
            let err = evidence
                .record_value("x", &value, "s", None, t(1))
                .unwrap_err();
            assert!(err.contains(reason), "{err}");
        }
        assert_eq!(evidence, before);
    }

    #[test]
    fn extract_follows_nested_paths() {
        let output = json!({
            "scan_result": {"critical": 0, "high": 2, "nested": {"deeper": {"x": 1.5}}},
            "all_syncing": true,
            "connectors": [{"id": "slack", "syncing": true}, {"id": "jira", "syncing": false}],
            "nothing": null,
            "label": "ok",
        });
        let mapping = map(&[
            ("security.critical_count", "scan_result.critical"),
            ("deep", "scan_result.nested.deeper.x"),
            ("connector.all.syncing", "all_syncing"),
            ("connector.jira.syncing", "connectors.1.syncing"),
            ("whole", "scan_result.nested"),
            ("null", "nothing"),
            ("label", "label"),
            ("missing", "scan_result.low"),
            ("too-deep", "all_syncing.x"),
            ("bad-index", "connectors.x.syncing"),
            ("out-of-range", "connectors.5.syncing"),
            ("empty-segment", "scan_result..critical"),
            ("empty", ""),
        ]);
        assert_eq!(
            extract(&mapping, &output),
            [
                ("connector.all.syncing".to_owned(), json!(true)),
                ("connector.jira.syncing".to_owned(), json!(false)),
                ("deep".to_owned(), json!(1.5)),
                ("label".to_owned(), json!("ok")),
                ("null".to_owned(), Value::Null),
                ("security.critical_count".to_owned(), json!(0)),
                ("whole".to_owned(), json!({"deeper": {"x": 1.5}})),
            ]
        );
        assert!(extract(&BTreeMap::new(), &output).is_empty());
        assert!(extract(&mapping, &json!("not an object")).is_empty());
    }

    #[test]
    fn record_task_output_reports_what_it_skipped() {
        let mut evidence = Evidence::default();
        let output = json!({"scan_result": {"critical": 2, "summary": "bad"}});
        let problems = evidence.record_task_output(
            &map(&[
                ("security.critical_count", "scan_result.critical"),
                ("security.summary", "scan_result.summary"),
                ("security.high_count", "scan_result.high"),
            ]),
            &output,
            "run-security-scan",
            Some("m9"),
            t(3),
        );
        assert_eq!(
            problems,
            [
                "task `run-security-scan`: evidence `security.high_count`: its output has no value at `scan_result.high`",
                "task `run-security-scan`: evidence `security.summary`: expected a number or a boolean, got a string at `scan_result.summary`",
            ]
        );
        assert_eq!(
            evidence.metric("security.critical_count"),
            Some(&Observed {
                value: 2.0,
                at: t(3),
                source: "task:run-security-scan".to_owned(),
                message_id: Some("m9".to_owned()),
            })
        );
        assert_eq!(evidence.metrics.len(), 1);
    }

    #[test]
    fn names_and_paths() {
        for good in ["search.precision", "latency.p95_ms", "a-b", "0"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "Search.precision", "a b", "a/b", "ä"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        for good in ["a", "scan_result.critical", "connectors.0.Status"] {
            assert!(is_valid_path(good), "{good}");
        }
        for bad in ["", ".a", "a.", "a..b", "a .b"] {
            assert!(!is_valid_path(bad), "{bad}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let mut evidence = Evidence::default();
        evidence.record_report(
            &report(
                &[("search.precision", 0.81)],
                &[("demo.approved", true)],
                &[reported("bug.critical", None, Some("critical"))],
            ),
            "a",
            "m",
            t(0),
        );
        let json = serde_json::to_string(&evidence).unwrap();
        assert_eq!(serde_json::from_str::<Evidence>(&json).unwrap(), evidence);
        assert_eq!(serde_json::to_string(&Evidence::default()).unwrap(), "{}");
    }
}
