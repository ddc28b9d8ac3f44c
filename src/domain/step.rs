//! The orchestrator's heart: how one journey reacts to one input.
//!
//! [`step`] takes the journey's record as it stands (or none), one [`Input`] (a journey
//! command, a task reply, a timer, a returned publish) and a [`Ctx`] carrying everything
//! that would otherwise come from the outside world (`now`, fresh ids, the jitter sample).
//! It returns the record to save, if it changed, and the [`Effect`]s as data: messages to
//! publish, history lines to append, a snapshot to keep, timers to arm, counts to bump.
//! The runtime writes the record and the effects in one store batch, flushes, acks and
//! then publishes; the same input on the same record always gives the same step.
//!
//! Rules come from the floors beside it: `journey` (transitions), `work` (the DAG and
//! retries), `gate` (exit criteria and triggers), `evidence`.

use std::borrow::Cow;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::command::{Command, ErrorPayload, TaskOutcome};
use super::gate;
use super::journey::{Event, Journey, Stage, TransitionError};
use super::playbook::{Playbook, StageWork};
use super::record::{
    Hold, JourneyRecord, PastGeneration, RollbackInfo, Snapshot, event_payload, state_view,
};
use super::work::{JourneyView, ReplyEffect, TaskStatus, UnitOfWork, WorkKind, WorkStatus};

/// Behaviour the operator chooses.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Promote as soon as the unit of work is done and the gate passes.
    pub auto_promote: bool,
    /// How long rollback snapshots are kept.
    pub snapshot_retention: ChronoDuration,
    /// How long message ids are remembered for deduplication.
    pub dedup_retention: ChronoDuration,
    /// Queue status cards for the dashboard webhook.
    pub webhook: bool,
    /// How long a finished (completed or cancelled) journey keeps its last unit of work
    /// in full; after that the task outputs and attempt bookkeeping are dropped. The
    /// journey and its history are kept for good.
    pub finished_retention: ChronoDuration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            auto_promote: true,
            snapshot_retention: ChronoDuration::days(30),
            dedup_retention: ChronoDuration::days(7),
            webhook: false,
            finished_retention: ChronoDuration::days(7),
        }
    }
}

/// Fresh ids without a random generator: the runtime seeds one per step from its own
/// randomness; tests seed it with a constant and get the same ids every run.
#[derive(Debug, Clone)]
pub struct Ids {
    seed: u64,
    next: u64,
}

impl Ids {
    pub fn new(seed: u64) -> Self {
        Self { seed, next: 0 }
    }

    /// A version-4-shaped UUID unique to (seed, position).
    pub fn next_uuid(&mut self) -> Uuid {
        self.next += 1;
        // Mixed so that neighbouring seeds do not give neighbouring ids.
        let hi = splitmix(self.seed ^ 0x6a09_e667_f3bc_c908);
        let lo = splitmix(
            self.seed
                .wrapping_add(self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        uuid::Builder::from_random_bytes(
            ((u128::from(hi) << 64) | u128::from(lo ^ self.next)).to_be_bytes(),
        )
        .into_uuid()
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the outside world contributes to one step.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub now: DateTime<Utc>,
    pub ids: Ids,
    /// A sample in [0, 1) for the backoff jitter of any retry this step schedules.
    pub jitter: f64,
}

impl Ctx {
    pub fn new(now: DateTime<Utc>, seed: u64, jitter: f64) -> Self {
        Self {
            now,
            ids: Ids::new(seed),
            jitter,
        }
    }
}

/// The playbooks a step may need: the one new journeys start on, and the one the
/// journey is pinned to (the same, unless the playbook changed since it started).
#[derive(Debug, Clone, Copy)]
pub struct Playbooks<'a> {
    pub current: &'a Playbook,
    pub current_hash: &'a str,
    /// The journey's own playbook; `None` means the current one.
    pub pinned: Option<&'a Playbook>,
}

impl<'a> Playbooks<'a> {
    /// The playbook the journey being stepped runs on.
    fn journey(&self) -> &'a Playbook {
        self.pinned.unwrap_or(self.current)
    }
}

/// Who sent a command and how to answer it.
#[derive(Debug, Clone)]
pub struct Sender<'a> {
    /// The command's message id: the cause of what it changes.
    pub message_id: &'a str,
    pub agent_id: &'a str,
    /// The agent's application, so an answer names it as its target.
    pub application: &'a str,
    /// Where to answer (`reply_to`), if anywhere.
    pub reply_to: Option<&'a str>,
    /// What an answer correlates on: the request's correlation id, else its message id.
    pub correlation: &'a str,
    /// The trace the command belongs to (W3C trace id), if it came with one.
    pub trace_id: Option<&'a str>,
}

/// What a replayed dead letter says about its past (headers set by `journeyman dlq`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replay {
    /// The dead letter's message id, when the replay carries a new one.
    pub replay_of: Option<String>,
    /// Failures so far, this replay included.
    pub attempts: u32,
    pub first_failed_at: Option<String>,
    /// When the payload was replaced by `--edit`.
    pub edited_at: Option<String>,
}

/// One input to a journey.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    Command {
        cmd: Command,
        from: Sender<'a>,
        /// The raw payload, recorded when a replay edited it.
        payload: &'a Value,
        replay: Option<&'a Replay>,
    },
    /// An agent's answer to one task attempt.
    Reply {
        correlation_id: &'a str,
        outcome: TaskOutcome,
        message_id: &'a str,
    },
    /// Deadlines and retry times that are due at `ctx.now`.
    Timers,
    /// A task request came back unroutable: no queue serves its intent.
    Unroutable { correlation_id: &'a str },
}

/// A message to publish, described by what it means; the runtime encodes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A task attempt for an agent, on `<ns>.intents`, mandatory.
    Task {
        message_id: Uuid,
        client_id: String,
        task_id: String,
        intent: String,
        /// The agent the playbook names, else the intent.
        agent: String,
        correlation_id: String,
        attempt: u32,
        input: Value,
        trace_id: Option<String>,
    },
    /// A journey event on `<ns>.events`.
    Event {
        message_id: Uuid,
        name: String,
        payload: Value,
        trace_id: Option<String>,
    },
    /// An answer to a command's `reply_to`.
    Reply {
        message_id: Uuid,
        to: String,
        /// The request's intent, echoed.
        intent: String,
        /// The agent that asked.
        target: (String, String),
        correlation_id: String,
        error: bool,
        payload: Value,
    },
    /// A record for the on-call engineer on the dead-letter exchange.
    DeadLetter(DeadLetter),
}

/// A dead letter: why, where it came from, and the body as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub reason: String,
    pub message: String,
    pub routing_key: String,
    /// Where the original was consumed; empty for records the orchestrator made.
    pub origin: Origin,
    pub client_id: Option<String>,
    pub task_id: Option<String>,
    pub failed_at: DateTime<Utc>,
    pub first_failed_at: Option<String>,
    pub attempts: u32,
    pub body: Vec<u8>,
}

/// Where a dead-lettered message was consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
}

/// Something the step wants counted (the runtime owns the counters).
#[derive(Debug, Clone, PartialEq)]
pub enum Tally {
    JourneyStarted,
    Refusal,
    DeadLetter {
        reason: String,
    },
    GatePassed,
    GateFailed,
    Promotion,
    RollbackStarted {
        reason: String,
        automatic: bool,
    },
    RollbackCompleted,
    RollbackFailed,
    Pause,
    Resume,
    TaskDispatched {
        intent: String,
        retry: bool,
    },
    TaskCompleted {
        intent: String,
    },
    TaskFailed {
        intent: String,
    },
    StaleReply,
    /// An attempt's reply came this long after its dispatch.
    RoundTrip {
        intent: String,
        micros: u64,
    },
}

/// What a step does besides changing the record.
// Effects live for one step in one Vec, and a snapshot (a whole record) is rare: boxing it
// would buy nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Publish(Message),
    /// A history line for the journey; the store numbers them in order.
    History {
        kind: String,
        detail: Value,
        cause: Option<String>,
    },
    /// A copy of the journey before a rollback.
    Snapshot(Snapshot),
    /// Wake the journey at this time (a deadline or a retry).
    Arm(DateTime<Utc>),
    Count(Tally),
}

/// The outcome of one step.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// The record to save; `None` when it did not change.
    pub record: Option<JourneyRecord>,
    pub effects: Vec<Effect>,
}

impl Step {
    /// Messages this step publishes, in order.
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Publish(m) => Some(m),
            _ => None,
        })
    }

    /// History lines this step appends: (kind, detail).
    pub fn history(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.effects.iter().filter_map(|e| match e {
            Effect::History { kind, detail, .. } => Some((kind.as_str(), detail)),
            _ => None,
        })
    }

    /// Names of the events this step publishes, in order.
    pub fn events(&self) -> Vec<&str> {
        self.messages()
            .filter_map(|m| match m {
                Message::Event { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The refusal code, when the step answered with an error.
    pub fn refusal(&self) -> Option<&str> {
        self.messages().find_map(|m| match m {
            Message::Reply {
                error: true,
                payload,
                ..
            } => payload["code"].as_str(),
            _ => None,
        })
    }
}

/// A refused journey command: answered with an `error` when it has `reply_to`, else
/// dead-lettered (nobody can be told).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl Refusal {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }
}

impl From<TransitionError> for Refusal {
    fn from(e: TransitionError) -> Self {
        let code = match e {
            TransitionError::InvalidRollbackTarget { .. } => "invalid_rollback_target",
            _ => "invalid_transition",
        };
        Refusal::new(code, e.to_string())
    }
}

/// Applies one input to one journey. `rec` is the journey as stored (`None`: the client
/// has none); `playbooks` resolves its playbook. Never fails: what cannot be done is a
/// refusal or an ignored reply, recorded as effects.
pub fn step(
    rec: Option<&JourneyRecord>,
    input: Input<'_>,
    playbooks: Playbooks<'_>,
    policy: &Policy,
    ctx: &mut Ctx,
) -> Step {
    let mut s = Stepper {
        playbooks,
        policy,
        ctx,
        effects: Vec::new(),
    };
    let record = match input {
        Input::Command {
            cmd,
            from,
            payload,
            replay,
        } => s.command(rec, cmd, &from, payload, replay),
        Input::Reply {
            correlation_id,
            outcome,
            message_id,
        } => s.reply(rec, correlation_id, outcome, message_id),
        Input::Timers => s.timers(rec),
        Input::Unroutable { correlation_id } => s.unroutable(rec, correlation_id),
    };
    // The journey's pending deadlines and retries, changed or not: a timer that fired
    // early, or a refused command, must not lose the wake-ups already due.
    if let Some(r) = record.as_ref().or(rec) {
        let playbook = playbooks.journey();
        for at in wakeups(r, playbook, policy, s.ctx.now) {
            s.effects.push(Effect::Arm(at));
        }
    }
    Step {
        record,
        effects: s.effects,
    }
}

impl DeadLetter {
    /// The dead letter of an input that could not be applied: undecodable, refused by
    /// authentication, or reusing a message id with another body.
    pub fn of_input(
        reason: &str,
        message: String,
        origin: Origin,
        message_id: String,
        correlation_id: Option<String>,
        body: Vec<u8>,
        now: DateTime<Utc>,
    ) -> DeadLetter {
        DeadLetter {
            message_id,
            correlation_id,
            reason: reason.to_string(),
            message,
            routing_key: origin.routing_key.clone(),
            origin,
            client_id: None,
            task_id: None,
            failed_at: now,
            first_failed_at: None,
            attempts: 1,
            body,
        }
    }

    /// A replayed message continues its failure history.
    pub fn continuing(mut self, replay: Option<&Replay>) -> Self {
        if let Some(r) = replay {
            self.first_failed_at = r.first_failed_at.clone();
            self.attempts = r.attempts.max(1);
        }
        self
    }
}

/// The task requests a journey has in flight, to publish again after a restart: the
/// store keeps no copy of them (the record says what is in flight), and their message ids
/// follow from their correlation ids, so agents see the same message twice, not two.
pub fn in_flight(rec: &JourneyRecord, playbooks: Playbooks<'_>) -> Vec<Message> {
    let Some(work) = &rec.work else {
        return Vec::new();
    };
    let spec = Stepper::spec_of(playbooks.journey(), work);
    let view = JourneyView {
        client_id: &rec.journey.client_id,
        context: &rec.context,
    };
    work.in_flight(&spec, &view)
        .into_iter()
        .map(|d| task_message(rec, &spec, d))
        .collect()
}

fn task_message(rec: &JourneyRecord, spec: &StageWork, d: super::work::Dispatch) -> Message {
    let agent = spec
        .task(&d.task_id)
        .and_then(|t| t.agent_id.clone())
        .unwrap_or_else(|| d.intent.clone());
    Message::Task {
        message_id: request_id(&d.correlation_id),
        client_id: rec.journey.client_id.clone(),
        task_id: d.task_id,
        intent: d.intent,
        agent,
        correlation_id: d.correlation_id,
        attempt: d.attempt,
        input: d.input,
        trace_id: rec.trace_id.clone(),
    }
}

/// A task request's message id: the UUID of its correlation id (`<client>/<uuid>`), so a
/// request published again after a restart carries the id it had the first time.
pub fn request_id(correlation_id: &str) -> Uuid {
    let tail = correlation_id
        .rsplit_once('/')
        .map_or(correlation_id, |(_, u)| u);
    Uuid::parse_str(tail).unwrap_or_else(|_| {
        // Ids from before correlation ids named their journey: a stable digest instead.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in correlation_id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let bytes = ((u128::from(splitmix(h)) << 64) | u128::from(h)).to_be_bytes();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    })
}

/// Every moment the journey wants to be woken at: its task deadlines and retries, and the
/// next time one of its time-based gate criteria could change (see [`gate_wakeup`]). The
/// runtime arms these after each step and again from the store when it starts, which is
/// what makes them durable.
pub fn wakeups(
    rec: &JourneyRecord,
    playbook: &Playbook,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let mut at: Vec<DateTime<Utc>> = rec
        .work
        .as_ref()
        .map(|w| w.timers().into_iter().map(|(at, _, _)| at).collect())
        .unwrap_or_default();
    at.extend(gate_wakeup(rec, playbook, policy, now));
    at
}

/// When the journey's time-based criteria (`min_time_in_stage`, event windows) next may
/// change their verdict without new evidence, after `now`. Rollback triggers count while
/// the journey is in an active stage; exit criteria only while a gate verdict is what the
/// journey waits for (its stage work done, promoting itself, not held), since finishing
/// the work evaluates the gate anyway.
pub fn gate_wakeup(
    rec: &JourneyRecord,
    playbook: &Playbook,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let stage = rec.journey.stage;
    if !stage.is_active_stage() {
        return None;
    }
    let spec = playbook.stage(stage.as_str())?;
    let awaiting_gate = policy.auto_promote
        && matches!(stage, Stage::Sandbox | Stage::Pilot)
        && rec.hold.is_none()
        && stage_work_done(rec);
    let exit = spec.exit_criteria.iter().filter(|_| awaiting_gate);
    gate::next_change(
        spec.rollback_triggers.iter().chain(exit),
        &rec.evidence,
        rec.journey.stage_started_at,
        now,
    )
}

/// A time-based criterion may have changed its verdict since the journey's gates were
/// last judged (the last gate evaluation, else the stage's start).
fn gate_due(rec: &JourneyRecord, playbook: &Playbook, policy: &Policy, now: DateTime<Utc>) -> bool {
    let stage_start = rec.journey.stage_started_at;
    let last = rec
        .gate
        .as_ref()
        .map(|g| g.evaluated_at.max(stage_start))
        .unwrap_or(stage_start);
    gate_wakeup(rec, playbook, policy, last).is_some_and(|at| at <= now)
}

/// The stage's own unit of work is done: only its gate stands before the next stage.
fn stage_work_done(rec: &JourneyRecord) -> bool {
    rec.work.as_ref().is_some_and(|w| {
        w.kind == WorkKind::Stage
            && w.stage == rec.journey.stage
            && w.status == WorkStatus::Completed
    })
}

/// The journey a correlation id names (`<client>/<uuid>`; client ids never hold '/').
pub fn client_of_correlation(correlation_id: &str) -> Option<&str> {
    correlation_id.split_once('/').map(|(c, _)| c)
}

struct Stepper<'a, 'c> {
    playbooks: Playbooks<'a>,
    policy: &'a Policy,
    ctx: &'c mut Ctx,
    effects: Vec<Effect>,
}

type Outcome = Result<(), Refusal>;

impl<'a> Stepper<'a, '_> {
    fn now(&self) -> DateTime<Utc> {
        self.ctx.now
    }

    fn count(&mut self, t: Tally) {
        self.effects.push(Effect::Count(t));
    }

    fn history(&mut self, kind: &str, detail: Value, cause: Option<&str>) {
        self.effects.push(Effect::History {
            kind: kind.to_string(),
            detail,
            cause: cause.map(str::to_string),
        });
    }

    fn event(&mut self, rec: &JourneyRecord, name: &str, detail: Value) {
        let payload = event_payload(rec, name, detail, self.now());
        let message_id = self.ctx.ids.next_uuid();
        self.effects.push(Effect::Publish(Message::Event {
            message_id,
            name: name.to_string(),
            payload,
            trace_id: rec.trace_id.clone(),
        }));
    }

    fn answer(&mut self, from: &Sender<'_>, intent: &str, error: bool, payload: Value) {
        let Some(to) = from.reply_to else { return };
        let message_id = self.ctx.ids.next_uuid();
        self.effects.push(Effect::Publish(Message::Reply {
            message_id,
            to: to.to_string(),
            intent: intent.to_string(),
            target: (from.agent_id.to_string(), from.application.to_string()),
            correlation_id: from.correlation.to_string(),
            error,
            payload,
        }));
    }

    // ---- journey commands ----

    fn command(
        &mut self,
        existing: Option<&JourneyRecord>,
        cmd: Command,
        from: &Sender<'_>,
        payload: &Value,
        replay: Option<&Replay>,
    ) -> Option<JourneyRecord> {
        let now = self.now();
        let intent = cmd.intent();
        let client_id = cmd.client_id().to_string();
        let mid = from.message_id;
        let outcome: Result<JourneyRecord, Refusal> = match (cmd, existing) {
            (Command::Start(p), None) => Ok(self.start(client_id.clone(), p, from, None)),
            // A finished journey is archived and the client starts again: generation n+1.
            (Command::Start(p), Some(rec)) if rec.journey.stage.is_terminal() => {
                Ok(self.start(client_id.clone(), p, from, Some(rec)))
            }
            (Command::Start(_), Some(rec)) => Err(Refusal::new(
                "already_exists",
                format!(
                    "client {client_id} already has a journey in progress (stage {}, generation {}); \
                     there is one journey per client at a time: cancel it (journey.cancel) or let it \
                     complete, then start again",
                    rec.journey.stage, rec.generation
                ),
            )),
            (Command::Status(_), Some(rec)) => Ok(rec.clone()),
            (_, None) => Err(Refusal::new(
                "not_found",
                format!("no journey for client {client_id}; start one with journey.start"),
            )),
            (Command::Promote(_), Some(rec)) => {
                let mut rec = rec.clone();
                self.gated(&mut rec, &Event::Promote, mid).map(|_| rec)
            }
            (Command::Complete(_), Some(rec)) => {
                let mut rec = rec.clone();
                self.gated(&mut rec, &Event::Complete, mid).map(|_| rec)
            }
            (Command::Cancel(p), Some(rec)) => {
                let mut rec = rec.clone();
                let reason = p.reason.unwrap_or_else(|| "cancelled".into());
                self.transition_with(&mut rec, &Event::Cancel, mid, json!({"reason": reason}))
                    .map(|_| {
                        if let Some(w) = rec.work.as_mut() {
                            w.cancel(format!("journey cancelled: {reason}"), now);
                        }
                        rec.rollback = None;
                        rec.hold = None;
                        rec
                    })
            }
            (Command::Rollback(p), Some(rec)) => {
                let mut rec = rec.clone();
                let retry = rec.rollback.as_ref().is_some_and(|r| r.failed);
                if retry && p.rollback_to.is_none() {
                    // Retrying a failed rollback keeps the hold a manual rollback set.
                    self.resume(&mut rec, mid, false);
                    Ok(rec)
                } else {
                    // Held before the rollback runs: one with no undo work lands, and
                    // re-enters its target, within this step.
                    rec.hold = Some(Hold {
                        reason: p.reason.clone(),
                        since: now,
                    });
                    self.start_rollback(&mut rec, &p.reason, p.rollback_to, false, mid)
                        .map(|_| rec)
                }
            }
            (Command::Evidence(p), Some(rec)) => {
                if rec.journey.stage.is_terminal() {
                    Err(Refusal::new(
                        "invalid_transition",
                        format!(
                            "the journey is {}; it takes no more evidence",
                            rec.journey.stage
                        ),
                    ))
                } else {
                    let mut rec = rec.clone();
                    rec.evidence.record_report(&p, from.agent_id, mid, now);
                    if let Some(window) = self.playbooks.journey().longest_event_window() {
                        rec.evidence.prune_events_before(now - to_chrono(window));
                    }
                    self.history(
                        "evidence",
                        json!({"reported_by": from.agent_id, "evidence": p}),
                        Some(mid),
                    );
                    self.after_evidence(&mut rec, mid);
                    Ok(rec)
                }
            }
            (Command::Resume(_), Some(rec)) => {
                let failed = rec
                    .work
                    .as_ref()
                    .is_some_and(|w| w.status == WorkStatus::Failed);
                if !(failed || rec.hold.is_some()) || rec.journey.stage.is_terminal() {
                    Err(Refusal::new(
                        "invalid_transition",
                        format!(
                            "nothing to resume: the journey is {} ({}); resume redrives failed \
                             work or releases the hold of a manual rollback",
                            rec.status(),
                            rec.journey.stage
                        ),
                    ))
                } else {
                    let mut rec = rec.clone();
                    self.resume(&mut rec, mid, true);
                    Ok(rec)
                }
            }
        };
        match outcome {
            Ok(rec) => {
                if let Some(r) = replay {
                    let detail = json!({
                        "intent": intent,
                        "replay_of": r.replay_of,
                        "attempts": r.attempts,
                        "edited_at": r.edited_at,
                        "payload": if r.edited_at.is_some() { payload.clone() } else { Value::Null },
                    });
                    let kind = if r.edited_at.is_some() {
                        "replayed_with_edit"
                    } else {
                        "replayed"
                    };
                    self.history(kind, detail, Some(mid));
                }
                self.answer(from, intent, false, state_view(&rec));
                // A status query changes nothing; every other applied command is saved.
                if intent == "journey.status" && replay.is_none() {
                    None
                } else {
                    Some(rec)
                }
            }
            Err(r) => {
                self.count(Tally::Refusal);
                let error = serde_json::to_value(ErrorPayload {
                    code: r.code.into(),
                    message: r.message.clone(),
                    retryable: false,
                    details: r.details.clone(),
                })
                .unwrap_or(Value::Null);
                self.answer(from, intent, true, error);
                // A refusal its sender was told about is not a dead letter: the dead-letter
                // queue is for what nobody can be told about, or failed processing. A
                // refused state change with no `reply_to` is kept for the on-call engineer.
                if from.reply_to.is_none() && intent != "journey.status" {
                    self.count(Tally::DeadLetter {
                        reason: r.code.to_string(),
                    });
                    self.effects
                        .push(Effect::Publish(Message::DeadLetter(DeadLetter {
                            message_id: mid.to_string(),
                            correlation_id: None,
                            reason: r.code.to_string(),
                            message: r.message,
                            routing_key: intent.to_string(),
                            origin: Origin::default(),
                            client_id: Some(client_id),
                            task_id: None,
                            failed_at: now,
                            first_failed_at: replay.and_then(|r| r.first_failed_at.clone()),
                            attempts: replay.map_or(1, |r| r.attempts.max(1)),
                            // The runtime puts the original body and origin here.
                            body: Vec::new(),
                        })));
                }
                // Gate evaluations made on the way to a refusal are history worth keeping,
                // but the record itself stays as it was.
                None
            }
        }
    }

    // ---- gates ----

    fn evaluate_gate(&mut self, rec: &mut JourneyRecord, cause: &str) -> gate::ValidationResult {
        let playbook = self.playbooks.journey();
        let stage = rec.journey.stage;
        let criteria = playbook
            .stage(stage.as_str())
            .map(|s| s.exit_criteria.as_slice())
            .unwrap_or(&[]);
        let result = gate::evaluate(
            stage.as_str(),
            criteria,
            &rec.evidence,
            rec.journey.stage_started_at,
            self.now(),
        );
        self.count(if result.passed {
            Tally::GatePassed
        } else {
            Tally::GateFailed
        });
        self.history(
            "gate_evaluation",
            serde_json::to_value(&result).unwrap_or(Value::Null),
            Some(cause),
        );
        rec.gate = Some(result.clone());
        result
    }

    /// The gate before promotion or completion: the work is done and every check passes.
    fn gate_for(&mut self, rec: &mut JourneyRecord, cause: &str) -> Outcome {
        if !rec.journey.stage.is_active_stage() {
            return Err(Refusal::new(
                "invalid_transition",
                format!(
                    "a journey in stage {} has no gate to pass",
                    rec.journey.stage
                ),
            ));
        }
        if !stage_work_done(rec) {
            return Err(Refusal::new(
                "not_ready",
                format!(
                    "the {} unit of work is not complete ({})",
                    rec.journey.stage,
                    rec.status()
                ),
            ));
        }
        let result = self.evaluate_gate(rec, cause);
        if result.passed {
            Ok(())
        } else {
            Err(Refusal {
                code: "gate_failed",
                message: format!(
                    "the {} exit gate refused: {}",
                    rec.journey.stage,
                    result.summary()
                ),
                details: serde_json::to_value(&result).ok(),
            })
        }
    }

    /// A manual promote or complete: allowed by the state machine, then through the gate.
    fn gated(&mut self, rec: &mut JourneyRecord, event: &Event, cause: &str) -> Outcome {
        // The state machine says which stage may take the event; ask it first, so a
        // refusal names the real reason rather than a gate.
        rec.journey.apply(event, self.now())?;
        self.gate_for(rec, cause)?;
        // A person promoting a held journey releases it.
        rec.hold = None;
        self.transition(rec, event, cause)
    }

    /// Promotes automatically when the work is done and the gate passes; otherwise says
    /// why it waits (an event the dashboards and the demo see).
    fn try_auto_promote(&mut self, rec: &mut JourneyRecord, cause: &str) {
        if !self.policy.auto_promote
            || !matches!(rec.journey.stage, Stage::Sandbox | Stage::Pilot)
            || rec.hold.is_some()
            || !stage_work_done(rec)
        {
            return;
        }
        // `rec.gate` is this stage's last verdict (entering a stage clears it).
        let before: Option<Vec<String>> = rec
            .gate
            .as_ref()
            .filter(|g| g.stage == rec.journey.stage.as_str())
            .map(|g| g.failed_checks().map(|c| c.name.clone()).collect());
        let result = self.evaluate_gate(rec, cause);
        if result.passed {
            // The stage is sandbox or pilot: promotion is always a valid transition.
            let _ = self.transition(rec, &Event::Promote, cause);
        } else {
            let failed: Vec<String> = result.failed_checks().map(|c| c.name.clone()).collect();
            // Said once per change of the failing set, not on every report of evidence.
            if before.as_ref() != Some(&failed) {
                let detail = json!({"summary": result.summary(), "failed": failed});
                self.event(rec, "gate.failed", detail);
            }
        }
    }

    /// After new evidence: a rollback trigger that fires wins; else the gate may now pass.
    /// Returns whether a rollback started.
    fn after_evidence(&mut self, rec: &mut JourneyRecord, cause: &str) -> bool {
        let stage = rec.journey.stage;
        if !stage.is_active_stage() {
            return false;
        }
        let playbook = self.playbooks.journey();
        let triggers = playbook
            .stage(stage.as_str())
            .map(|s| s.rollback_triggers.as_slice())
            .unwrap_or(&[]);
        let hits = gate::triggered(
            triggers,
            &rec.evidence,
            rec.journey.stage_started_at,
            self.now(),
        );
        if !hits.is_empty() {
            let reason = hits
                .iter()
                .map(|h| format!("{}: {}", h.name, h.message))
                .collect::<Vec<_>>()
                .join("; ");
            // From an active stage a rollback is always a valid transition.
            let _ = self.start_rollback(rec, &reason, None, true, cause);
            return true;
        }
        self.try_auto_promote(rec, cause);
        false
    }

    // ---- rollback, resume, transitions ----

    /// DES-002 §5: pause the stage, snapshot, run the stage's rollback work, then land on
    /// the stage before (or `to`).
    fn start_rollback(
        &mut self,
        rec: &mut JourneyRecord,
        reason: &str,
        to: Option<Stage>,
        automatic: bool,
        cause: &str,
    ) -> Outcome {
        let now = self.now();
        let from = rec.journey.stage;
        let event = Event::InitiateRollback { to };
        // Validate before touching anything.
        let next = rec.journey.apply(&event, now)?;
        let target = next.rollback_target.unwrap_or(Stage::Sandbox);
        self.effects.push(Effect::Snapshot(Snapshot {
            at: now,
            reason: reason.to_string(),
            record: rec.clone(),
        }));
        if let Some(w) = rec.work.as_mut() {
            w.cancel(format!("rollback: {reason}"), now);
        }
        rec.rollback = Some(RollbackInfo {
            reason: reason.to_string(),
            automatic,
            from,
            to: target,
            started_at: now,
            failed: false,
        });
        self.count(Tally::RollbackStarted {
            reason: reason.to_string(),
            automatic,
        });
        self.transition_with(
            rec,
            &event,
            cause,
            json!({"reason": reason, "automatic": automatic, "target": target}),
        )?;
        self.undo(rec, Some(from), cause)
    }

    /// Saga compensation: runs the rollback work of `stage`, then of each stage before it
    /// down to (not including) the rollback's target, latest first; a stage with no
    /// rollback tasks has nothing to undo. Production -> sandbox undoes production, then
    /// pilot; sandbox -> sandbox undoes sandbox. Lands once nothing is left to undo.
    fn undo(&mut self, rec: &mut JourneyRecord, mut stage: Option<Stage>, cause: &str) -> Outcome {
        let now = self.now();
        let target = rec.rollback.as_ref().map(|r| r.to);
        while let Some(s) = stage {
            let tasks = self
                .playbooks
                .journey()
                .stage(s.as_str())
                .map(|st| st.rollback.tasks.clone())
                .unwrap_or_default();
            if tasks.is_empty() {
                stage = Self::undone_next(s, target);
                continue;
            }
            rec.work_seq += 1;
            let spec = StageWork {
                tasks,
                ..Default::default()
            };
            let mut work = UnitOfWork::new(
                format!(
                    "uow-{}-rollback-{}-{}",
                    rec.journey.client_id, s, rec.work_seq
                ),
                s,
                &spec,
                now,
            );
            work.kind = WorkKind::Rollback;
            rec.work = Some(work);
            self.advance(rec);
            return Ok(());
        }
        self.complete_rollback(rec, cause)
    }

    /// The stage to undo after `undone`: the one before it, if the rollback leaves it too.
    fn undone_next(undone: Stage, target: Option<Stage>) -> Option<Stage> {
        undone.before().filter(|b| target.is_some_and(|t| *b > t))
    }

    fn complete_rollback(&mut self, rec: &mut JourneyRecord, cause: &str) -> Outcome {
        let info = rec.rollback.clone();
        self.transition_with(
            rec,
            &Event::CompleteRollback,
            cause,
            json!({"rollback": info}),
        )?;
        self.count(Tally::RollbackCompleted);
        rec.rollback = None;
        Ok(())
    }

    /// Restarts failed work from its failed tasks, keeping completed ones (a redrive), and
    /// with `release`, lets a journey held by a manual rollback promote itself again.
    fn resume(&mut self, rec: &mut JourneyRecord, cause: &str, release: bool) {
        let released = release && rec.hold.take().is_some();
        let failed = rec
            .work
            .as_ref()
            .is_some_and(|w| w.status == WorkStatus::Failed);
        if failed {
            if let Some(w) = rec.work.as_mut() {
                w.resume();
            }
            if let Some(r) = rec.rollback.as_mut() {
                r.failed = false;
            }
        }
        self.count(Tally::Resume);
        self.history(
            "resumed",
            json!({"status": rec.status(), "released_hold": released, "redrive": failed}),
            Some(cause),
        );
        self.event(
            rec,
            "journey.resumed",
            json!({"released_hold": released, "redrive": failed}),
        );
        self.advance(rec);
        if !failed {
            // Released with its work done: the gate decides now, on this stage's evidence.
            self.try_auto_promote(rec, cause);
        }
    }

    /// A new journey for the client; with `prior` (a finished one), generation n+1. The
    /// prior generation's summary is kept in the record and its history lines stay under
    /// the client's key, so `journey status` and `journey history` show both.
    fn start(
        &mut self,
        client_id: String,
        p: super::command::StartPayload,
        from: &Sender<'_>,
        prior: Option<&JourneyRecord>,
    ) -> JourneyRecord {
        let now = self.now();
        let mid = from.message_id;
        let (generation, past, work_seq) = match prior {
            None => (1, Vec::new(), 0),
            Some(old) => {
                let mut past = old.past.clone();
                past.push(PastGeneration {
                    generation: old.generation,
                    outcome: old.journey.stage,
                    started_at: old.journey.started_at,
                    ended_at: old.journey.stage_started_at,
                    completed_stages: old.journey.completed_stages.clone(),
                    playbook: old.playbook.clone(),
                });
                self.history(
                    "generation_archived",
                    serde_json::to_value(past.last()).unwrap_or(Value::Null),
                    Some(mid),
                );
                // Work ids stay unique across generations.
                (old.generation + 1, past, old.work_seq)
            }
        };
        let mut rec = JourneyRecord {
            journey: Journey::start(client_id, now),
            playbook: self.playbooks.current_hash.to_string(),
            context: Value::Object(p.context.unwrap_or_default()),
            work: None,
            work_seq,
            evidence: Default::default(),
            gate: None,
            rollback: None,
            trace_id: Some(
                from.trace_id
                    .map(str::to_string)
                    .unwrap_or_else(|| self.ctx.ids.next_uuid().simple().to_string()),
            ),
            hold: None,
            generation,
            past,
            partition: None,
        };
        self.count(Tally::JourneyStarted);
        self.history(
            "started",
            json!({"stage": "sandbox", "playbook": rec.playbook, "generation": generation}),
            Some(mid),
        );
        self.event(&rec, "journey.started", json!({"generation": generation}));
        self.enter_stage(&mut rec);
        rec
    }

    fn transition(&mut self, rec: &mut JourneyRecord, event: &Event, cause: &str) -> Outcome {
        self.transition_with(rec, event, cause, json!({}))
    }

    /// Applies a state-machine event, recording history and an event message; entering an
    /// active stage runs its unit of work (again, after a rollback).
    fn transition_with(
        &mut self,
        rec: &mut JourneyRecord,
        event: &Event,
        cause: &str,
        extra: Value,
    ) -> Outcome {
        let from = rec.journey.stage;
        rec.journey = rec.journey.apply(event, self.now())?;
        let to = rec.journey.stage;
        let name = match event {
            Event::Promote => {
                self.count(Tally::Promotion);
                "journey.promoted"
            }
            Event::InitiateRollback { .. } => "journey.rollback_started",
            Event::CompleteRollback => "journey.rollback_completed",
            Event::Cancel => "journey.cancelled",
            Event::Complete => "journey.completed",
        };
        let mut detail = json!({"from": from, "to": to, "event": event.name()});
        if let (Some(d), Value::Object(x)) = (detail.as_object_mut(), extra) {
            d.extend(x);
        }
        self.history("transition", detail.clone(), Some(cause));
        self.event(rec, name, detail);
        if to.is_active_stage() && matches!(event, Event::Promote | Event::CompleteRollback) {
            rec.gate = None;
            self.enter_stage(rec);
        }
        Ok(())
    }

    fn enter_stage(&mut self, rec: &mut JourneyRecord) {
        let stage = rec.journey.stage;
        let spec = self
            .playbooks
            .journey()
            .stage(stage.as_str())
            .cloned()
            .unwrap_or_default();
        rec.work_seq += 1;
        let work_id = format!("uow-{}-{}-{}", rec.journey.client_id, stage, rec.work_seq);
        // A stage without tasks has an empty unit of work, done at once: only its gate
        // stands between the journey and the next stage.
        rec.work = Some(UnitOfWork::new(work_id, stage, &spec, self.now()));
        self.advance(rec);
    }

    /// The spec a unit of work runs: its stage's tasks, or its stage's rollback tasks.
    fn spec_of<'p>(playbook: &'p Playbook, work: &UnitOfWork) -> Cow<'p, StageWork> {
        let stage = playbook.stage(work.stage.as_str());
        match work.kind {
            WorkKind::Stage => stage.map(Cow::Borrowed).unwrap_or_default(),
            WorkKind::Rollback => Cow::Owned(StageWork {
                tasks: stage.map(|s| s.rollback.tasks.clone()).unwrap_or_default(),
                ..Default::default()
            }),
        }
    }

    /// Dispatches what is ready, then reacts to the work finishing.
    fn advance(&mut self, rec: &mut JourneyRecord) {
        let now = self.now();
        let playbook = self.playbooks.journey();
        let Some(work) = rec.work.as_mut() else {
            return;
        };
        let spec = Self::spec_of(playbook, work);
        let view = JourneyView {
            client_id: &rec.journey.client_id,
            context: &rec.context,
        };
        let was_running = work.status == WorkStatus::Running;
        // The correlation id names its journey (client ids never contain '/'), so a reply
        // finds its journey without a lookup entry per dispatch.
        let client_id = rec.journey.client_id.clone();
        let ids = &mut self.ctx.ids;
        let mut new_id = || format!("{client_id}/{}", ids.next_uuid());
        let dispatches = work.advance(&spec, &view, now, &mut new_id);
        let (status, kind) = (work.status, work.kind);
        for d in dispatches {
            self.count(Tally::TaskDispatched {
                intent: d.intent.clone(),
                retry: d.attempt > 1,
            });
            let msg = task_message(rec, &spec, d);
            self.effects.push(Effect::Publish(msg));
        }
        if !was_running {
            return;
        }
        let stage = rec.journey.stage;
        match (status, kind) {
            (WorkStatus::Failed, _) => self.work_failed(rec),
            (WorkStatus::Completed, WorkKind::Stage) => {
                let detail = json!({"stage": stage, "kind": "stage"});
                self.history("work_completed", detail.clone(), None);
                self.event(rec, "work.completed", detail);
                self.try_auto_promote(rec, "work.completed");
            }
            (WorkStatus::Completed, WorkKind::Rollback) => {
                // Validated: every rollback task reported success. Reported like stage
                // work, naming the stage it undid.
                let undone = rec.work.as_ref().map(|w| w.stage);
                let detail = json!({"stage": undone, "kind": "rollback"});
                self.history("rollback_work_completed", json!({"undone": undone}), None);
                self.event(rec, "work.completed", detail);
                let target = rec.rollback.as_ref().map(|r| r.to);
                let next = undone.and_then(|u| Self::undone_next(u, target));
                // Undoes the next stage left, or lands on the target: always valid.
                let _ = self.undo(rec, next, "rollback.work.completed");
            }
            _ => {}
        }
    }

    /// Work that failed after retries pauses the journey (or fails its rollback); a
    /// dead-letter record keeps it in front of the on-call engineer.
    fn work_failed(&mut self, rec: &mut JourneyRecord) {
        let stage = rec.journey.stage;
        let work = rec.work.as_ref();
        let failure = work.and_then(|w| w.failure.clone()).unwrap_or_default();
        let failed = work.and_then(|w| w.tasks.iter().find(|t| t.status == TaskStatus::Failed));
        let task_id = failed.map(|t| t.task_id.clone());
        let failed_intent = failed.map(|t| t.intent.clone());
        let rollback = work.is_some_and(|w| w.kind == WorkKind::Rollback);
        let (reason, event) = if rollback {
            self.count(Tally::RollbackFailed);
            if let Some(r) = rec.rollback.as_mut() {
                r.failed = true;
            }
            ("rollback_failed", "rollback.failed")
        } else {
            self.count(Tally::Pause);
            let reason = if failure.contains("no_agent") {
                "no_agent"
            } else {
                "task_failed"
            };
            (reason, "journey.paused")
        };
        self.count(Tally::DeadLetter {
            reason: reason.to_string(),
        });
        if let Some(intent) = failed_intent {
            self.count(Tally::TaskFailed { intent });
        }
        let detail = json!({"stage": stage, "failure": failure, "task_id": task_id});
        self.history("work_failed", detail.clone(), None);
        self.event(rec, event, detail.clone());
        // Kept for compatibility with consumers of issue 2's event.
        self.event(rec, "work.failed", detail);
        let body = serde_json::to_vec(&json!({
            "client_id": rec.journey.client_id,
            "stage": stage,
            "work": rec.work,
        }))
        .unwrap_or_default();
        let message_id = self.ctx.ids.next_uuid().to_string();
        self.effects
            .push(Effect::Publish(Message::DeadLetter(DeadLetter {
                message_id,
                correlation_id: None,
                reason: reason.to_string(),
                message: failure,
                routing_key: format!("work.failed.{stage}"),
                origin: Origin::default(),
                client_id: Some(rec.journey.client_id.clone()),
                task_id,
                failed_at: self.now(),
                first_failed_at: None,
                attempts: 1,
                body,
            })));
    }

    // ---- task replies, timers, returns ----

    fn reply(
        &mut self,
        rec: Option<&JourneyRecord>,
        corr: &str,
        outcome: TaskOutcome,
        mid: &str,
    ) -> Option<JourneyRecord> {
        let now = self.now();
        let Some(rec) = rec else {
            self.count(Tally::StaleReply);
            return None;
        };
        let mut rec = rec.clone();
        let playbook = self.playbooks.journey();
        let result = match outcome {
            TaskOutcome::Completed(o) => Ok(Value::Object(o)),
            TaskOutcome::Failed(e) => Err(e),
        };
        let sent = rec
            .work
            .as_ref()
            .and_then(|w| {
                w.tasks
                    .iter()
                    .find(|t| t.correlation_id.as_deref() == Some(corr))
            })
            .and_then(|t| Some((t.intent.clone(), t.dispatched_at?)));
        let effect = match rec.work.as_mut() {
            None => ReplyEffect::Unknown,
            Some(work) => {
                let spec = Self::spec_of(playbook, work);
                work.on_reply(&spec, corr, result.clone(), now, self.ctx.jitter)
            }
        };
        // A reply to an attempt that is over (a duplicate, or late after a retry) changes
        // nothing: not even a history line, so a redelivery leaves no trace.
        if matches!(effect, ReplyEffect::Stale { .. } | ReplyEffect::Unknown) {
            self.count(Tally::StaleReply);
            return None;
        }
        if let Some((intent, at)) = sent {
            let micros = (now - at).num_microseconds().unwrap_or(0).max(0) as u64;
            self.count(Tally::RoundTrip { intent, micros });
        }
        // Task outputs feed evidence through the playbook's mapping.
        if let (ReplyEffect::Completed { task_id }, Ok(output)) = (&effect, &result)
            && let Some(work) = rec.work.as_ref()
            && work.kind == WorkKind::Stage
            && let Some(spec) = playbook
                .stage(work.stage.as_str())
                .and_then(|s| s.task(task_id))
            && !spec.evidence.is_empty()
        {
            let problems =
                rec.evidence
                    .record_task_output(&spec.evidence, output, task_id, Some(mid), now);
            for p in problems {
                self.history(
                    "evidence_not_recorded",
                    json!({"task_id": task_id, "problem": p}),
                    Some(mid),
                );
            }
        }
        self.record_effect(&mut rec, &effect, Some(mid));
        Some(rec)
    }

    fn record_effect(
        &mut self,
        rec: &mut JourneyRecord,
        effect: &ReplyEffect,
        cause: Option<&str>,
    ) {
        match effect {
            ReplyEffect::Completed { task_id } => {
                if let Some(t) = rec
                    .work
                    .as_ref()
                    .and_then(|w| w.tasks.iter().find(|t| &t.task_id == task_id))
                {
                    let intent = t.intent.clone();
                    self.count(Tally::TaskCompleted { intent });
                }
                self.history("task_completed", json!({"task_id": task_id}), cause);
                let is_stage_work = rec.work.as_ref().is_some_and(|w| w.kind == WorkKind::Stage);
                // New evidence from the output may fire a rollback trigger first.
                if is_stage_work && self.after_evidence(rec, cause.unwrap_or("task")) {
                    return;
                }
                self.advance(rec);
            }
            ReplyEffect::RetryScheduled {
                task_id,
                attempt,
                retry_at,
                error,
            } => {
                let detail = json!({"task_id": task_id, "attempt": attempt, "retry_at": retry_at, "error": error});
                self.history("task_retry", detail, cause);
            }
            ReplyEffect::TaskFailed { .. } => self.work_failed(rec),
            ReplyEffect::Stale { task_id, why } => {
                self.count(Tally::StaleReply);
                self.history(
                    "reply_ignored",
                    json!({"task_id": task_id, "why": why}),
                    cause,
                );
            }
            ReplyEffect::Unknown => {
                self.count(Tally::StaleReply);
                self.history(
                    "reply_ignored",
                    json!({"why": "unknown correlation id"}),
                    cause,
                );
            }
        }
    }

    fn unroutable(&mut self, rec: Option<&JourneyRecord>, corr: &str) -> Option<JourneyRecord> {
        let mut rec = rec?.clone();
        let playbook = self.playbooks.journey();
        let (now, jitter) = (self.now(), self.ctx.jitter);
        let effect = rec.work.as_mut().and_then(|w| {
            let spec = Self::spec_of(playbook, w).into_owned();
            w.on_unroutable(&spec, corr, now, jitter)
        })?;
        self.record_effect(&mut rec, &effect, None);
        Some(rec)
    }

    fn timers(&mut self, rec: Option<&JourneyRecord>) -> Option<JourneyRecord> {
        let rec = rec?;
        if rec.journey.stage.is_terminal() {
            return None;
        }
        let mut rec = rec.clone();
        let playbook = self.playbooks.journey();
        let (now, jitter) = (self.now(), self.ctx.jitter);
        let stage_before = rec.journey.stage;
        let mut effects = Vec::new();
        if let Some(w) = rec.work.as_mut() {
            let spec = Self::spec_of(playbook, w).into_owned();
            for (at, task_id, attempt) in w.timers() {
                if at <= now
                    && let Some(e) = w.on_timeout(&spec, &task_id, attempt, now, jitter)
                {
                    effects.push(e);
                }
            }
        }
        let before = self.effects.len();
        for e in &effects {
            self.record_effect(&mut rec, e, None);
        }
        // Retries that are due are dispatched here.
        self.advance(&mut rec);
        // A time-based criterion may have changed its verdict: judge triggers and gate
        // again, as new evidence would (unless the stage was just left).
        if rec.journey.stage == stage_before && gate_due(&rec, playbook, self.policy, now) {
            self.after_evidence(&mut rec, "timer");
        }
        if effects.is_empty() && self.effects.len() == before {
            // Nothing was due after all: the journey stays as it is.
            return None;
        }
        Some(rec)
    }
}

fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}
