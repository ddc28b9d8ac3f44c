//! The client journey state machine (DES-002 §1-2): which stage a client is in, which
//! events may move it, and where each event lands. It owns the transition rules and the
//! record of gates passed (`completed_stages`), and nothing else: it is a pure function of
//! (journey, event, `now`). It must not read the clock, touch the store or the broker,
//! decide whether a gate's exit criteria are met, or enforce "one journey per client";
//! the orchestrator does those and hands the verdict in as an [`Event`].
//!
//! Deliberate departures from DES-002's Python: completing a rollback lands on the rollback
//! target (the Python returned to `previous_stage`, i.e. back to `Rollback`'s origin),
//! `completed_stages` records only stages exited through their gate (the Python appended
//! every stage it left, including `Rollback`), cancelling is also allowed mid-rollback, and
//! starting a journey is a constructor rather than an event from a `None` stage.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a journey is. Declaration order is journey order: the derived `Ord` is what makes
/// `Sandbox < Pilot < Production`, which rollback validation and truncation rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Sandbox,
    Pilot,
    Production,
    /// Transitional: work is being undone, no unit of work runs for the journey itself.
    Rollback,
    /// Terminal success: Production passed its gate.
    Completed,
    /// Terminal failure, reachable from anywhere not already terminal.
    Cancelled,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Sandbox,
        Stage::Pilot,
        Stage::Production,
        Stage::Rollback,
        Stage::Completed,
        Stage::Cancelled,
    ];

    /// The wire and storage name; must match the serde representation.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Sandbox => "sandbox",
            Stage::Pilot => "pilot",
            Stage::Production => "production",
            Stage::Rollback => "rollback",
            Stage::Completed => "completed",
            Stage::Cancelled => "cancelled",
        }
    }

    /// No event is accepted from here; the caller may archive the journey.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Completed | Stage::Cancelled)
    }

    /// Stages that have a unit of work and an exit gate; the only valid rollback targets.
    pub fn is_active_stage(self) -> bool {
        matches!(self, Stage::Sandbox | Stage::Pilot | Stage::Production)
    }

    /// The stage a promotion leads to. `None` for Production: leaving it is `Complete`.
    pub fn next(self) -> Option<Stage> {
        match self {
            Stage::Sandbox => Some(Stage::Pilot),
            Stage::Pilot => Some(Stage::Production),
            _ => None,
        }
    }

    /// The default rollback target. `None` for Sandbox, which has nothing before it.
    pub fn before(self) -> Option<Stage> {
        match self {
            Stage::Pilot => Some(Stage::Sandbox),
            Stage::Production => Some(Stage::Pilot),
            _ => None,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name that is not one of [`Stage::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stage {input:?}: expected one of {}", stage_names())]
pub struct ParseStageError {
    /// Kept verbatim so the message shows exactly what the user or peer sent.
    pub input: String,
}

fn stage_names() -> String {
    Stage::ALL.map(Stage::as_str).join(", ")
}

impl FromStr for Stage {
    type Err = ParseStageError;

    /// Exact lowercase names only, so that text accepted here is exactly what serde
    /// accepts; a looser parser would let the CLI and the wire disagree.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| ParseStageError {
                input: s.to_owned(),
            })
    }
}

/// Something that asks a journey to move. Gate verdicts arrive as `Promote`/`Complete`:
/// by the time an event reaches this module the orchestrator has already decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// Exit Sandbox or Pilot through its gate into the next stage.
    Promote,
    /// Start undoing work. `to: None` means the stage before (Sandbox restarts itself).
    InitiateRollback { to: Option<Stage> },
    /// The undo work is done; land on the target chosen when the rollback started.
    CompleteRollback,
    /// Abandon the journey.
    Cancel,
    /// Exit Production through its gate; the journey is finished.
    Complete,
}

impl Event {
    /// Matches the serde `kind` tag, so logs and errors use the same word as the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Promote => "promote",
            Event::InitiateRollback { .. } => "initiate_rollback",
            Event::CompleteRollback => "complete_rollback",
            Event::Cancel => "cancel",
            Event::Complete => "complete",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an event was refused. Both variants are verdicts on (state, event), not failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("invalid transition: event {event} is not allowed in stage {stage}")]
    InvalidTransition {
        stage: Stage,
        /// The event's [`Event::name`]; a string so the error stays printable and
        /// comparable without carrying the event's payload.
        event: String,
    },
    #[error(
        "invalid rollback target: cannot roll back from {from} to {to} (allowed targets: {})",
        allowed_targets_text(.from)
    )]
    InvalidRollbackTarget { from: Stage, to: Stage },
}

impl TransitionError {
    /// Always false: the same journey and event give the same answer, so a retry can only
    /// fail again. The caller should report the refusal, not requeue it.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Where a rollback from `from` may land: an earlier active stage, or Sandbox itself when
/// rolling back from Sandbox (there is nothing earlier, so the stage restarts).
fn allowed_rollback_targets(from: Stage) -> &'static [Stage] {
    match from {
        Stage::Sandbox | Stage::Pilot => &[Stage::Sandbox],
        Stage::Production => &[Stage::Sandbox, Stage::Pilot],
        Stage::Rollback | Stage::Completed | Stage::Cancelled => &[],
    }
}

fn allowed_targets_text(from: &Stage) -> String {
    let allowed = allowed_rollback_targets(*from);
    if allowed.is_empty() {
        return "none".to_owned();
    }
    allowed
        .iter()
        .map(|stage| stage.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One client's journey. Immutable by convention: [`Journey::apply`] returns a new value so
/// the caller can persist it before acting on it, and keep the old one if persisting fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journey {
    /// The key the caller uses to keep one journey per client.
    pub client_id: String,
    /// Where the journey is now; decides which events are accepted.
    pub stage: Stage,
    /// The stage the last transition left; `None` only for a fresh journey. A rollback
    /// counts as one move: while it runs and after it lands this names the active stage it
    /// started from (production for production -> sandbox), never the transitional
    /// `rollback`, except for a journey cancelled during a rollback. Kept for display and
    /// audit, never for routing (that was DES-002's rollback bug).
    pub previous_stage: Option<Stage>,
    /// Where a rollback in progress will land (Some only while stage == Rollback). Fixed
    /// when the rollback starts so the undo work and the landing agree.
    pub rollback_target: Option<Stage>,
    /// The active stage the rollback started from (Some only while stage == Rollback), so
    /// the orchestrator knows whose work to undo.
    pub rollback_from: Option<Stage>,
    /// When the journey was created; never changes, so time-to-production is measurable.
    pub started_at: DateTime<Utc>,
    /// When the current stage was entered; stage timeouts and durations count from here.
    pub stage_started_at: DateTime<Utc>,
    /// Stages exited through their gate (promote/complete) and still valid, always a prefix
    /// of Sandbox, Pilot, Production. A rollback invalidates the target and later stages.
    pub completed_stages: Vec<Stage>,
}

impl Journey {
    /// A new journey in Sandbox. Starting is not an [`Event`]: there is no prior state to
    /// validate, and uniqueness per client is the caller's (store's) concern.
    pub fn start(client_id: impl Into<String>, now: DateTime<Utc>) -> Journey {
        Journey {
            client_id: client_id.into(),
            stage: Stage::Sandbox,
            previous_stage: None,
            rollback_target: None,
            rollback_from: None,
            started_at: now,
            stage_started_at: now,
            completed_stages: Vec::new(),
        }
    }

    /// The journey after `event`, or why the event is refused. `now` becomes the new
    /// `stage_started_at`; it is not checked against earlier timestamps because clock
    /// skew between hosts is the caller's problem, and refusing a valid transition over it
    /// would wedge the journey.
    pub fn apply(&self, event: &Event, now: DateTime<Utc>) -> Result<Journey, TransitionError> {
        let invalid = || TransitionError::InvalidTransition {
            stage: self.stage,
            event: event.name().to_owned(),
        };

        let mut next = self.clone();
        match (self.stage, event) {
            (from, Event::Promote) => {
                let to = from.next().ok_or_else(invalid)?;
                next.completed_stages.push(from);
                next.stage = to;
            }
            (Stage::Production, Event::Complete) => {
                next.completed_stages.push(Stage::Production);
                next.stage = Stage::Completed;
            }
            (from, Event::InitiateRollback { to }) if from.is_active_stage() => {
                let target = match *to {
                    None => from.before().unwrap_or(from),
                    Some(to) if allowed_rollback_targets(from).contains(&to) => to,
                    Some(to) => return Err(TransitionError::InvalidRollbackTarget { from, to }),
                };
                // completed_stages is left alone until the rollback completes: while the
                // undo work runs, the stages it has not yet undone are still in place.
                next.stage = Stage::Rollback;
                next.rollback_from = Some(from);
                next.rollback_target = Some(target);
            }
            (Stage::Rollback, Event::CompleteRollback) => {
                // A Rollback journey always has a target unless the stored value was
                // edited by hand; refusing is safer than guessing where to land.
                let target = self.rollback_target.ok_or_else(invalid)?;
                // The target's own gate and every later one must be passed again.
                next.completed_stages.retain(|stage| *stage < target);
                next.stage = target;
                next.rollback_target = None;
                next.rollback_from = None;
            }
            (from, Event::Cancel) if !from.is_terminal() => {
                next.stage = Stage::Cancelled;
                next.rollback_target = None;
                next.rollback_from = None;
            }
            _ => return Err(invalid()),
        }
        // A landing rollback names the stage it left, not the transitional `rollback`.
        next.previous_stage = match (self.stage, event) {
            (Stage::Rollback, Event::CompleteRollback) => self.rollback_from.or(Some(self.stage)),
            _ => Some(self.stage),
        };
        next.stage_started_at = now;
        Ok(next)
    }

    /// Whether [`Journey::apply`] would accept `event`. Defined through `apply` so the two
    /// can never disagree; the timestamp passed is irrelevant to validity.
    pub fn can_apply(&self, event: &Event) -> bool {
        self.apply(event, self.stage_started_at).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    /// The stages that carry a unit of work, in the only order a journey may pass them.
    const ACTIVE: [Stage; 3] = [Stage::Sandbox, Stage::Pilot, Stage::Production];

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 27, 9, 0, 0).unwrap()
    }

    fn at(minutes: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(minutes)
    }

    fn rollback(to: Option<Stage>) -> Event {
        Event::InitiateRollback { to }
    }

    fn run(events: &[Event]) -> Journey {
        let mut journey = Journey::start("acme", t0());
        for (i, event) in events.iter().enumerate() {
            journey = journey
                .apply(event, at(i as i64 + 1))
                .unwrap_or_else(|e| panic!("setup step {i} ({event}) failed: {e}"));
        }
        journey
    }

    /// A journey in `stage`, reached through valid events only. The Rollback one comes
    /// from Production with the default target, so it lands on Pilot.
    fn journey_in(stage: Stage) -> Journey {
        use Event::*;
        let journey = match stage {
            Stage::Sandbox => run(&[]),
            Stage::Pilot => run(&[Promote]),
            Stage::Production => run(&[Promote, Promote]),
            Stage::Rollback => run(&[Promote, Promote, rollback(None)]),
            Stage::Completed => run(&[Promote, Promote, Complete]),
            Stage::Cancelled => run(&[Cancel]),
        };
        assert_eq!(journey.stage, stage);
        journey
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Outcome {
        Lands(Stage),
        Invalid,
        BadTarget,
    }

    #[test]
    fn every_stage_event_pair() {
        use Event::*;
        use Outcome::*;
        use Stage::{Cancelled as Can, Completed as Done, Pilot as Pil, Production as Prod};
        use Stage::{Rollback as Rb, Sandbox as Sbx};

        let events = [
            Promote,
            rollback(None),
            rollback(Some(Sbx)),
            rollback(Some(Pil)),
            rollback(Some(Prod)),
            CompleteRollback,
            Cancel,
            Complete,
        ];
        // Columns follow `events`.
        let table: [(Stage, [Outcome; 8]); 6] = [
            (
                Sbx,
                [
                    Lands(Pil),
                    Lands(Rb),
                    Lands(Rb),
                    BadTarget,
                    BadTarget,
                    Invalid,
                    Lands(Can),
                    Invalid,
                ],
            ),
            (
                Pil,
                [
                    Lands(Prod),
                    Lands(Rb),
                    Lands(Rb),
                    BadTarget,
                    BadTarget,
                    Invalid,
                    Lands(Can),
                    Invalid,
                ],
            ),
            (
                Prod,
                [
                    Invalid,
                    Lands(Rb),
                    Lands(Rb),
                    Lands(Rb),
                    BadTarget,
                    Invalid,
                    Lands(Can),
                    Lands(Done),
                ],
            ),
            (
                Rb,
                [
                    Invalid,
                    Invalid,
                    Invalid,
                    Invalid,
                    Invalid,
                    Lands(Pil),
                    Lands(Can),
                    Invalid,
                ],
            ),
            (Done, [Invalid; 8]),
            (Can, [Invalid; 8]),
        ];

        let mut checked = 0;
        for stage in Stage::ALL {
            let (_, row) = table
                .iter()
                .find(|(s, _)| *s == stage)
                .unwrap_or_else(|| panic!("no table row for {stage}"));
            let journey = journey_in(stage);
            for (event, expected) in events.iter().zip(row) {
                let now = at(100);
                let got = journey.apply(event, now);
                let case = format!("{stage} + {event:?}");
                assert_eq!(journey.can_apply(event), got.is_ok(), "{case}");
                match (*expected, got) {
                    (Lands(to), Ok(next)) => {
                        assert_eq!(next.stage, to, "{case}");
                        let left = if *event == CompleteRollback {
                            journey.rollback_from
                        } else {
                            Some(stage)
                        };
                        assert_eq!(next.previous_stage, left, "{case}");
                        assert_eq!(next.stage_started_at, now, "{case}");
                        assert_eq!(next.started_at, journey.started_at, "{case}");
                    }
                    (Invalid, Err(e)) => assert_eq!(
                        e,
                        TransitionError::InvalidTransition {
                            stage,
                            event: event.name().to_owned()
                        },
                        "{case}"
                    ),
                    (BadTarget, Err(e)) => {
                        let Event::InitiateRollback { to: Some(to) } = *event else {
                            panic!("{case}: only an explicit rollback target can be bad");
                        };
                        assert_eq!(
                            e,
                            TransitionError::InvalidRollbackTarget { from: stage, to },
                            "{case}"
                        );
                    }
                    (expected, got) => panic!("{case}: expected {expected:?}, got {got:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, Stage::ALL.len() * events.len());
    }

    #[test]
    fn rollback_to_a_non_active_stage_is_a_bad_target() {
        for from in ACTIVE {
            for to in [Stage::Rollback, Stage::Completed, Stage::Cancelled] {
                assert_eq!(
                    journey_in(from).apply(&rollback(Some(to)), at(100)),
                    Err(TransitionError::InvalidRollbackTarget { from, to })
                );
            }
        }
    }

    #[test]
    fn default_rollback_target_is_the_stage_before() {
        for (from, target) in [
            (Stage::Sandbox, Stage::Sandbox),
            (Stage::Pilot, Stage::Sandbox),
            (Stage::Production, Stage::Pilot),
        ] {
            let rolling = journey_in(from).apply(&rollback(None), at(100)).unwrap();
            assert_eq!(rolling.stage, Stage::Rollback);
            assert_eq!(rolling.rollback_from, Some(from));
            assert_eq!(rolling.rollback_target, Some(target));
            let landed = rolling.apply(&Event::CompleteRollback, at(101)).unwrap();
            assert_eq!(landed.stage, target, "from {from}");
        }
    }

    /// DES-002 returned to `previous_stage`, which after a rollback is the stage it fled.
    #[test]
    fn complete_rollback_lands_on_target_not_origin() {
        let rolling = journey_in(Stage::Production)
            .apply(&rollback(Some(Stage::Sandbox)), at(100))
            .unwrap();
        assert_eq!(rolling.completed_stages, [Stage::Sandbox, Stage::Pilot]);
        let landed = rolling.apply(&Event::CompleteRollback, at(101)).unwrap();
        assert_eq!(landed.stage, Stage::Sandbox);
        // The stage the rollback left, not the transitional `rollback`.
        assert_eq!(landed.previous_stage, Some(Stage::Production));
        assert_eq!(landed.completed_stages, []);
        assert_eq!(landed.rollback_target, None);
        assert_eq!(landed.rollback_from, None);
    }

    #[test]
    fn completed_stages_truncate_to_before_the_target() {
        let landed = journey_in(Stage::Rollback)
            .apply(&Event::CompleteRollback, at(100))
            .unwrap();
        assert_eq!(landed.stage, Stage::Pilot);
        assert_eq!(landed.completed_stages, [Stage::Sandbox]);

        // Pilot's gate must be passed again before Production is reachable.
        assert!(!landed.can_apply(&Event::Complete));
        let production = landed.apply(&Event::Promote, at(101)).unwrap();
        assert_eq!(production.stage, Stage::Production);
        assert_eq!(production.completed_stages, [Stage::Sandbox, Stage::Pilot]);
        let done = production.apply(&Event::Complete, at(102)).unwrap();
        assert_eq!(
            done.completed_stages,
            [Stage::Sandbox, Stage::Pilot, Stage::Production]
        );
    }

    #[test]
    fn rollback_from_sandbox_restarts_sandbox() {
        let sandbox = journey_in(Stage::Sandbox);
        let rolling = sandbox
            .apply(&rollback(Some(Stage::Sandbox)), at(10))
            .unwrap();
        assert_eq!(rolling.rollback_target, Some(Stage::Sandbox));
        let restarted = rolling.apply(&Event::CompleteRollback, at(20)).unwrap();
        assert_eq!(restarted.stage, Stage::Sandbox);
        assert_eq!(restarted.stage_started_at, at(20));
        assert_eq!(restarted.started_at, sandbox.started_at);
        assert_eq!(restarted.completed_stages, []);
        assert_eq!(restarted.previous_stage, Some(Stage::Sandbox));
    }

    #[test]
    fn cancel_mid_rollback_clears_rollback_fields() {
        let cancelled = journey_in(Stage::Rollback)
            .apply(&Event::Cancel, at(100))
            .unwrap();
        assert_eq!(cancelled.stage, Stage::Cancelled);
        assert_eq!(cancelled.previous_stage, Some(Stage::Rollback));
        assert_eq!(cancelled.rollback_target, None);
        assert_eq!(cancelled.rollback_from, None);
    }

    #[test]
    fn rollback_without_target_is_refused_not_guessed() {
        let mut damaged = journey_in(Stage::Rollback);
        damaged.rollback_target = None;
        assert_eq!(
            damaged.apply(&Event::CompleteRollback, at(100)),
            Err(TransitionError::InvalidTransition {
                stage: Stage::Rollback,
                event: "complete_rollback".to_owned()
            })
        );
    }

    #[test]
    fn error_messages_name_what_went_wrong() {
        let err = journey_in(Stage::Completed)
            .apply(&Event::Promote, at(100))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("completed") && text.contains("promote"),
            "{text}"
        );
        assert!(!err.is_retryable());

        let err = journey_in(Stage::Production)
            .apply(&rollback(Some(Stage::Production)), at(100))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rollback target: cannot roll back from production to production \
             (allowed targets: sandbox, pilot)"
        );
        let err = TransitionError::InvalidRollbackTarget {
            from: Stage::Cancelled,
            to: Stage::Pilot,
        };
        assert!(err.to_string().ends_with("(allowed targets: none)"));
    }

    #[test]
    fn stage_names_parse_and_print() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
            assert_eq!(stage.to_string(), stage.as_str());
            assert_eq!(
                serde_json::to_string(&stage).unwrap(),
                format!("\"{}\"", stage.as_str())
            );
        }
        let err = "Pilot".parse::<Stage>().unwrap_err();
        assert_eq!(err.input, "Pilot");
        assert_eq!(
            err.to_string(),
            "unknown stage \"Pilot\": expected one of sandbox, pilot, production, rollback, \
             completed, cancelled"
        );
    }

    #[test]
    fn stage_navigation() {
        for stage in Stage::ALL {
            assert_eq!(stage.is_active_stage(), ACTIVE.contains(&stage));
            assert!(!(stage.is_terminal() && stage.is_active_stage()));
            if let Some(next) = stage.next() {
                assert_eq!(next.before(), Some(stage));
            }
        }
        assert_eq!(Stage::Production.next(), None);
        assert_eq!(Stage::Sandbox.before(), None);
    }

    #[test]
    fn event_wire_format() {
        let cases = [
            (Event::Promote, r#"{"kind":"promote"}"#),
            (
                rollback(Some(Stage::Pilot)),
                r#"{"kind":"initiate_rollback","to":"pilot"}"#,
            ),
            (rollback(None), r#"{"kind":"initiate_rollback","to":null}"#),
            (Event::CompleteRollback, r#"{"kind":"complete_rollback"}"#),
            (Event::Cancel, r#"{"kind":"cancel"}"#),
            (Event::Complete, r#"{"kind":"complete"}"#),
        ];
        for (event, json) in cases {
            assert_eq!(serde_json::to_string(&event).unwrap(), json);
            assert_eq!(serde_json::from_str::<Event>(json).unwrap(), event);
            assert!(json.contains(&format!("\"{}\"", event.name())));
        }
        // Senders may omit `to` for the default target.
        assert_eq!(
            serde_json::from_str::<Event>(r#"{"kind":"initiate_rollback"}"#).unwrap(),
            rollback(None)
        );
    }

    fn any_stage() -> impl Strategy<Value = Stage> {
        prop::sample::select(Stage::ALL.to_vec())
    }

    fn any_event() -> impl Strategy<Value = Event> {
        // Weighted towards Promote so random runs regularly reach Production and Completed.
        prop_oneof![
            4 => Just(Event::Promote),
            2 => prop::option::of(any_stage()).prop_map(|to| Event::InitiateRollback { to }),
            2 => Just(Event::CompleteRollback),
            1 => Just(Event::Cancel),
            2 => Just(Event::Complete),
        ]
    }

    fn rank(stage: Stage) -> usize {
        ACTIVE.iter().position(|s| *s == stage).unwrap()
    }

    fn check_invariants(j: &Journey, started_at: DateTime<Utc>) -> Result<(), TestCaseError> {
        prop_assert!(
            ACTIVE.starts_with(&j.completed_stages),
            "completed_stages {:?} is not a prefix of the journey",
            j.completed_stages
        );
        if j.stage.is_active_stage() {
            // Being in a stage means exactly the stages before it passed their gates.
            prop_assert_eq!(&j.completed_stages[..], &ACTIVE[..rank(j.stage)]);
        }
        if j.stage == Stage::Completed {
            prop_assert_eq!(&j.completed_stages[..], &ACTIVE[..]);
        }
        prop_assert_eq!(j.rollback_target.is_some(), j.stage == Stage::Rollback);
        prop_assert_eq!(j.rollback_from.is_some(), j.stage == Stage::Rollback);
        if let (Some(target), Some(from)) = (j.rollback_target, j.rollback_from) {
            prop_assert!(target.is_active_stage() && from.is_active_stage());
            prop_assert!(target <= from, "target {} later than {}", target, from);
        }
        prop_assert_eq!(j.started_at, started_at);
        let json = serde_json::to_string(j).unwrap();
        prop_assert_eq!(&serde_json::from_str::<Journey>(&json).unwrap(), j);
        Ok(())
    }

    proptest! {
        #[test]
        fn random_event_sequences_keep_invariants(
            events in prop::collection::vec((any_event(), 0i64..10_000), 0..60)
        ) {
            let start = t0();
            let mut journey = Journey::start("acme", start);
            let mut now = start;
            check_invariants(&journey, start)?;
            for (event, step_secs) in events {
                now += Duration::seconds(step_secs);
                let before = journey.clone();
                let result = journey.apply(&event, now);
                prop_assert_eq!(before.can_apply(&event), result.is_ok());
                match result {
                    Ok(next) => {
                        prop_assert!(!before.stage.is_terminal(), "terminal stage moved");
                        let left = if event == Event::CompleteRollback {
                            before.rollback_from
                        } else {
                            Some(before.stage)
                        };
                        prop_assert_eq!(next.previous_stage, left);
                        prop_assert_eq!(next.stage_started_at, now);
                        if next.stage.is_active_stage() {
                            // Never more than one step past where we came from.
                            let base = before.rollback_from.unwrap_or(before.stage);
                            prop_assert!(rank(next.stage) <= rank(base) + 1);
                        }
                        if next.stage == Stage::Completed {
                            prop_assert_eq!(before.stage, Stage::Production);
                        }
                        journey = next;
                    }
                    Err(TransitionError::InvalidTransition { stage, event: name }) => {
                        prop_assert_eq!(stage, before.stage);
                        prop_assert_eq!(name, event.name());
                    }
                    Err(TransitionError::InvalidRollbackTarget { from, .. }) => {
                        prop_assert_eq!(from, before.stage);
                    }
                }
                check_invariants(&journey, start)?;
            }
        }
    }
}
