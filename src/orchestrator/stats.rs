//! The orchestrator's counters: totals ([`Stats`]) and counters by label ([`Metrics`]),
//! fed by the runtime where it applies a step's effects, read by `/metrics`, `/api/stats`,
//! the demo and the tests. Counting only: no decisions here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Counters the demo and tests read; the metrics endpoint will export them.
#[derive(Debug, Default)]
pub struct Stats {
    pub journeys_started: AtomicU64,
    pub tasks_dispatched: AtomicU64,
    pub tasks_completed: AtomicU64,
    pub retries: AtomicU64,
    pub works_failed: AtomicU64,
    pub promotions: AtomicU64,
    pub dead_letters: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale_replies: AtomicU64,
    pub refusals: AtomicU64,
    pub conflicts: AtomicU64,
    pub gate_passed: AtomicU64,
    pub gate_failed: AtomicU64,
    pub rollbacks_started: AtomicU64,
    pub rollbacks_automatic: AtomicU64,
    pub rollbacks_completed: AtomicU64,
    pub rollbacks_failed: AtomicU64,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub inputs: AtomicU64,
    pub flushes: AtomicU64,
    /// True while connected and consuming.
    pub ready: AtomicBool,
    /// Counters by intent and reason, exported on /metrics.
    pub metrics: Arc<Metrics>,
    pub webhook: Arc<super::webhook::WebhookStats>,
    /// Which replica of the fleet counts here: set once when the orchestrator is served,
    /// so a fleet's scrapes tell replicas apart (`/metrics` labels every series with it).
    pub replica: OnceLock<Identity>,
    /// The partitions this replica owns. Only known once the runtime has connected and
    /// read the namespace's partition count, so it is set then, once; empty until.
    pub partitions: OnceLock<Vec<u16>>,
}

/// A replica's name and place in the fleet, as the metrics report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The orchestrator id (`--orchestrator-id`), which also names its reply queue.
    pub id: String,
    pub replica: crate::domain::partition::Replica,
}

impl Default for Identity {
    /// What an orchestrator runs as when nothing says otherwise: `Config`'s defaults.
    fn default() -> Self {
        Self {
            id: "0".into(),
            replica: Default::default(),
        }
    }
}

impl Stats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    /// This replica's identity, or the defaults when none was set.
    pub fn identity(&self) -> Identity {
        self.replica.get().cloned().unwrap_or_default()
    }
    /// Records the partitions this replica owns (the first call wins: the count is fixed
    /// when the namespace is declared).
    pub fn set_partitions(&self, owned: Vec<u16>) {
        let _ = self.partitions.set(owned);
    }
    /// Task round-trip quantiles since start: an attempt's dispatch to its reply being
    /// applied, over all intents (recorded where the core observes each round trip).
    pub fn round_trips(&self) -> RoundTripSummary {
        self.metrics.round_trip_summary()
    }
}

/// Upper bounds (seconds) of the task round-trip histogram: dispatch to reply, so from a
/// few milliseconds (a local agent) to minutes (a human in the loop).
pub(crate) const ROUND_TRIP_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// Counters by label the core feeds where it knows the intent or the reason; [`Stats`]
/// keeps the totals. Shared as `Arc<Metrics>`; every method is cheap and never blocks
/// for long (one short mutex per family).
#[derive(Debug, Default)]
pub struct Metrics {
    /// (intent, outcome: dispatched | completed | failed | retried) → count.
    pub(crate) tasks: Family,
    /// Dead letters by reason code (`schema_violation`, `task_failed`, `no_agent`, ...).
    pub(crate) dead_letters: Family,
    /// Rollbacks started, by reason and whether a trigger fired it.
    pub(crate) rollbacks: Family,
    /// Task round trips by intent: dispatch of an attempt to its reply.
    pub(crate) round_trip: Mutex<BTreeMap<String, Histogram>>,
    /// Every task round trip (all intents) at microsecond resolution, for the quantiles
    /// the buckets above are too coarse for (p99.9): `/api/stats` and `journeyman bench`.
    pub(crate) round_trip_quantiles: Mutex<Quantiles>,
}

/// The longest round trip the quantiles resolve (longer ones count as this): an hour.
const MAX_ROUND_TRIP_US: u64 = 3_600_000_000;

/// An HDR histogram of round trips in microseconds (3 significant digits, so quantiles
/// are within 0.1 %), and their sum for the Prometheus summary.
#[derive(Debug)]
pub(crate) struct Quantiles {
    pub(crate) micros: hdrhistogram::Histogram<u64>,
    pub(crate) sum_secs: f64,
}

impl Default for Quantiles {
    fn default() -> Self {
        Self {
            micros: hdrhistogram::Histogram::new_with_bounds(1, MAX_ROUND_TRIP_US, 3)
                .expect("constant, valid histogram bounds"),
            sum_secs: 0.0,
        }
    }
}

/// Task round-trip quantiles (dispatch to the reply being applied), in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundTripSummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl RoundTripSummary {
    /// Reads the quantiles of an HDR histogram of microseconds.
    pub fn of_micros(h: &hdrhistogram::Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Family(Mutex<BTreeMap<Vec<String>, u64>>);

impl Family {
    fn inc(&self, labels: &[&str]) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(labels.iter().map(|s| s.to_string()).collect())
            .or_default() += 1;
    }
    pub(crate) fn snapshot(&self) -> BTreeMap<Vec<String>, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    /// Cumulative counts are computed when rendering; these are per bucket.
    pub(crate) buckets: [u64; ROUND_TRIP_BUCKETS.len()],
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

impl Metrics {
    pub fn task_dispatched(&self, intent: &str) {
        self.tasks.inc(&[intent, "dispatched"]);
    }
    /// An attempt after the first was dispatched.
    pub fn task_retried(&self, intent: &str) {
        self.tasks.inc(&[intent, "retried"]);
    }
    /// A task failed for good (retries exhausted, or a non-retryable error).
    pub fn task_failed(&self, intent: &str) {
        self.tasks.inc(&[intent, "failed"]);
    }
    pub fn task_completed(&self, intent: &str) {
        self.tasks.inc(&[intent, "completed"]);
    }
    /// An attempt's reply (success or error) came `round_trip` after its dispatch.
    pub fn observe_round_trip(&self, intent: &str, round_trip: Duration) {
        let secs = round_trip.as_secs_f64();
        let mut m = self.round_trip.lock().unwrap_or_else(|e| e.into_inner());
        let h = m.entry(intent.to_string()).or_default();
        if let Some(i) = ROUND_TRIP_BUCKETS.iter().position(|b| secs <= *b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
        drop(m);
        let mut q = self
            .round_trip_quantiles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.micros
            .saturating_record((round_trip.as_micros() as u64).clamp(1, MAX_ROUND_TRIP_US));
        q.sum_secs += secs;
    }

    /// Quantiles over every task round trip so far.
    pub fn round_trip_summary(&self) -> RoundTripSummary {
        let q = self
            .round_trip_quantiles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        RoundTripSummary::of_micros(&q.micros)
    }
    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters.inc(&[reason]);
    }
    pub fn rollback_started(&self, reason: &str, automatic: bool) {
        self.rollbacks
            .inc(&[reason, if automatic { "true" } else { "false" }]);
    }

    /// Dead letters counted by reason so far (empty until the core feeds them).
    pub fn dead_letters_by_reason(&self) -> BTreeMap<String, u64> {
        self.dead_letters
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.into_iter().next().unwrap_or_default(), v))
            .collect()
    }
}
