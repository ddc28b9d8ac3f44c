//! The orchestrator's decisions turned into store changes: one inbound message (or timer,
//! or returned publish) in, one atomic [`Change`] with its outbox out.
//!
//! No broker here: the run loop in `mod.rs` feeds inputs as plain data and publishes what
//! comes back. The pure rules live in `journey` (transitions), `work` (the DAG), `gate`
//! (exit criteria and rollback triggers) and `evidence`.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, info, info_span, warn};
use uuid::Uuid;

use super::record::{
    HistoryEntry, JourneyRecord, RollbackInfo, Snapshot, event_payload, state_view, status_card,
};
use super::{OrchestratorError, Stats};
use crate::broker::Names;
use crate::gate;
use crate::journey::{Event, Journey, Stage, TransitionError};
use crate::playbook::{Playbook, StageWork};
use crate::protocol::{
    AgentRef, Command, Decoder, Envelope, ErrorPayload, MessageType, ProtocolError, TaskOutcome,
};
use crate::store::{Change, OutboxEntry, Purpose, Store};
use crate::trace::{self, TraceParent};
use crate::work::{JourneyView, ReplyEffect, TaskStatus, UnitOfWork, WorkKind, WorkStatus};

/// How many history lines a status card shows.
const RECENT_ACTIVITIES: usize = 5;

/// Which queue a delivery came from decides how it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Command,
    Reply,
}

/// A delivery as plain data: what the core needs of it.
pub struct Inbound<'a> {
    pub source: Source,
    pub data: &'a [u8],
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub queue: &'a str,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// W3C `traceparent` header, when the sender gave one.
    pub traceparent: Option<String>,
    /// Set when `journeyman dlq replay` republished this message.
    pub replay: Option<Replay>,
}

/// What a replayed dead letter says about its past (headers set by `journeyman dlq`).
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// The dead letter's message id, when the replay carries a new one.
    pub replay_of: Option<String>,
    /// Failures so far, this replay included.
    pub attempts: u32,
    pub first_failed_at: Option<String>,
    /// When the payload was replaced by `--edit`.
    pub edited_at: Option<String>,
}

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

/// What a dedup mark remembers: when, and a digest of the body, so a different message
/// reusing an id is caught as a conflict instead of silently dropped as a duplicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    at: DateTime<Utc>,
    #[serde(default)]
    digest: Option<String>,
}

impl Seen {
    fn of(data: &[u8], at: DateTime<Utc>) -> Self {
        use sha2::Digest;
        let d = sha2::Sha256::digest(data);
        Self {
            at,
            digest: Some(hex::encode(&d[..16])),
        }
    }
}

/// What one housekeeping pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub dedup_marks: usize,
    pub snapshots: usize,
    pub correlations: usize,
    /// Finished journeys whose last unit of work was compacted.
    pub compacted: usize,
}

/// A refusal of a journey command: answered with an `error`, and dead-lettered.
struct Refusal {
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
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

impl From<OrchestratorError> for Refusal {
    fn from(e: OrchestratorError) -> Self {
        Refusal::new("internal", e.to_string())
    }
}

struct DeadLetter<'a> {
    reason: &'a str,
    message: String,
    exchange: &'a str,
    routing_key: &'a str,
    queue: &'a str,
    client_id: Option<&'a str>,
    task_id: Option<&'a str>,
    /// The failure history a replayed message brings along, so counts continue.
    replay: Option<&'a Replay>,
}

/// The orchestrator's state between inputs: the store, the timers, the playbooks.
pub struct Core {
    pub(super) store: Store,
    names: Names,
    reply_queue: String,
    decoder: Decoder,
    current_playbook: String,
    playbooks: HashMap<String, Arc<Playbook>>,
    /// (due, client): wake-ups for task deadlines and retries. Duplicates are harmless:
    /// firing re-reads the journey and only acts on what is due.
    timers: BTreeSet<(DateTime<Utc>, String)>,
    pub(super) stats: Arc<Stats>,
    policy: Policy,
    /// Wakes the webhook delivery task once queued cards are durable.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// Checks inputs and signs outputs; `None` when authentication is off.
    auth: Option<(crate::auth::Guard, crate::auth::Signer)>,
    /// Some journey's status card may be due (see [`Core::publish_cards`]).
    cards_due: bool,
    /// Journeys whose work is running, for admission of new ones.
    active: HashSet<String>,
    admission: Arc<super::admission::Admission>,
}

impl Core {
    pub fn new(
        store: Store,
        names: Names,
        reply_queue: String,
        decoder: Decoder,
        playbook: &Playbook,
        stats: Arc<Stats>,
        policy: Policy,
    ) -> Result<Self, OrchestratorError> {
        let hash = playbook.content_hash();
        let mut change = Change::new();
        change.put_playbook(&hash, playbook);
        store.commit(change)?;
        let mut playbooks = HashMap::new();
        playbooks.insert(hash.clone(), Arc::new(playbook.clone()));
        let mut core = Self {
            store,
            names,
            reply_queue,
            decoder,
            current_playbook: hash,
            playbooks,
            timers: BTreeSet::new(),
            stats,
            policy,
            wake: None,
            auth: None,
            // Marks left by an earlier process are picked up by the first round.
            cards_due: true,
            active: HashSet::new(),
            admission: Arc::new(super::admission::Admission::new(0)),
        };
        core.load_timers()?;
        Ok(core)
    }

    /// Every change goes through here: the `before_commit` crash point.
    fn commit(&self, change: Change) -> Result<Vec<OutboxEntry>, crate::store::StoreError> {
        crate::failpoint::hit("before_commit");
        self.store.commit(change)
    }

    pub fn set_auth(&mut self, auth: Option<(crate::auth::Guard, crate::auth::Signer)>) {
        self.auth = auth;
    }

    /// Puts the orchestrator's token on what it sends, when authentication is on.
    fn sign(&self, env: Envelope) -> Envelope {
        match &self.auth {
            Some((_, signer)) => signer.sign(env, Utc::now()),
            None => env,
        }
    }

    pub fn set_wake(&mut self, wake: Arc<tokio::sync::Notify>) {
        self.wake = Some(wake);
    }

    /// Called after a flush: queued cards are durable and may be delivered.
    pub fn wake_webhook(&self) {
        if let Some(w) = &self.wake {
            w.notify_one();
        }
    }

    pub fn playbook_hash(&self) -> &str {
        &self.current_playbook
    }

    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    pub fn next_timer(&self) -> Option<DateTime<Utc>> {
        self.timers.first().map(|(at, _)| *at)
    }

    fn playbook(&mut self, hash: &str) -> Result<Arc<Playbook>, OrchestratorError> {
        if let Some(p) = self.playbooks.get(hash) {
            return Ok(p.clone());
        }
        let p: Playbook = self
            .store
            .playbook(hash)?
            .ok_or_else(|| OrchestratorError::MissingPlaybook(hash.to_string()))?;
        let p = Arc::new(p);
        self.playbooks.insert(hash.to_string(), p.clone());
        Ok(p)
    }

    /// At most `limit` journeys run their work at once (0: no limit); see `admission`.
    pub fn limit_admission(&mut self, limit: usize) -> Arc<super::admission::Admission> {
        self.admission = Arc::new(super::admission::Admission::new(limit));
        self.admission.set_active(self.active.len());
        self.admission.clone()
    }

    pub fn admission(&self) -> Arc<super::admission::Admission> {
        self.admission.clone()
    }

    fn load_timers(&mut self) -> Result<(), OrchestratorError> {
        let mut timers = BTreeSet::new();
        for rec in self.store.journeys::<JourneyRecord>() {
            let rec = rec?;
            if rec.is_active() {
                self.active.insert(rec.journey.client_id.clone());
            }
            if let Some(w) = &rec.work {
                for (at, _, _) in w.timers() {
                    timers.insert((at, rec.journey.client_id.clone()));
                }
            }
        }
        self.timers = timers;
        Ok(())
    }

    /// Keeps the store's size per journey bounded: drops old dedup marks, expired rollback
    /// snapshots, correlation entries no unit of work knows any more, and the bulk of
    /// finished journeys' last unit of work. History is never pruned. Not on the hot path.
    pub fn housekeeping(&self, now: DateTime<Utc>) -> Result<Pruned, OrchestratorError> {
        let dedup_before = now - self.policy.dedup_retention;
        let snap_before = now - self.policy.snapshot_retention;
        let finished_before = now - self.policy.finished_retention;
        let dedup_marks = self.store.prune_dedup(|s: &Seen| s.at < dedup_before)?;
        let snapshots = self
            .store
            .prune_snapshots(|s: &Snapshot| s.at < snap_before)?;
        let mut compacted = 0;
        let mut change = Change::new();
        for rec in self.store.journeys::<JourneyRecord>() {
            let mut rec = rec?;
            if rec.journey.stage.is_terminal()
                && rec.journey.stage_started_at < finished_before
                && rec.work.as_mut().is_some_and(UnitOfWork::compact)
            {
                change.put_journey(&rec.journey.client_id, &rec);
                compacted += 1;
            }
        }
        self.store.commit(change)?;
        // A correlation entry outlives its use once the unit of work that dispatched it
        // was replaced or compacted: a reply to it could only be reported as unknown.
        let correlations = self.store.prune_inflight(|corr, client| {
            let rec: Option<JourneyRecord> = self.store.journey(client).ok().flatten();
            rec.and_then(|r| r.work)
                .is_some_and(|w| w.knows_correlation(corr))
        })?;
        Ok(Pruned {
            dedup_marks,
            snapshots,
            correlations,
            compacted,
        })
    }

    /// Handles one delivery: decode, dedup, apply. Returns what to publish once durable.
    pub fn handle(&mut self, m: &Inbound) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        Stats::inc(&self.stats.inputs);
        let env = match self.decoder.envelope(m.data) {
            Ok(env) => env,
            Err(e) => return self.refuse_input(m, None, &e),
        };
        let trace_id = m
            .traceparent
            .as_deref()
            .and_then(TraceParent::parse)
            .map(|t| t.trace_id)
            .unwrap_or_default();
        let span = info_span!("message", intent = %env.intent, message_id = %env.message_id,
            correlation_id = env.correlation_id.as_deref().unwrap_or(""), trace_id = %trace_id);
        let _g = span.enter();
        let mid = env.message_id.to_string();
        if let Some(seen) = self.store.dedup::<Seen>(&mid)? {
            if seen.digest.is_some() && seen.digest != Seen::of(m.data, now()).digest {
                return self.conflict(m, &env);
            }
            Stats::inc(&self.stats.duplicates);
            debug!("duplicate message; already applied");
            return Ok(Vec::new());
        }
        // Authentication comes after the schema: a well-formed message from the wrong
        // sender is `unauthenticated` (or `forbidden`), not `schema_invalid`.
        let now = Utc::now();
        match m.source {
            Source::Command => match self.decoder.command(&env) {
                Ok(cmd) => match self.auth.as_ref().map(|(g, _)| g.command(&env, now)) {
                    Some(Err(e)) => self.refuse_input(m, Some(&env), &e),
                    _ => self.apply_command(m, &env, cmd),
                },
                Err(e) => self.refuse_input(m, Some(&env), &e),
            },
            Source::Reply => match self.decoder.task_reply(&env) {
                Ok(outcome) => match self.auth.as_ref().map(|(g, _)| g.reply(&env, now)) {
                    Some(Err(e)) => self.refuse_input(m, Some(&env), &e),
                    _ => self.apply_reply(m, &env, outcome),
                },
                Err(e) => self.refuse_input(m, Some(&env), &e),
            },
        }
    }

    /// A message id already applied, with another body: never applied, kept for a person.
    fn conflict(
        &mut self,
        m: &Inbound,
        env: &Envelope,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        warn!(queue = m.queue, message_id = %env.message_id, "message id reused with a different body; dead-lettering it");
        Stats::inc(&self.stats.dead_letters);
        Stats::inc(&self.stats.conflicts);
        self.stats.metrics.dead_letter("conflict");
        let mut change = Change::new();
        change.push_outbox(self.dead_letter(
            DeadLetter {
                reason: "conflict",
                message: format!(
                    "message id {} was already applied with a different body; not applied",
                    env.message_id
                ),
                exchange: m.exchange,
                routing_key: m.routing_key,
                queue: m.queue,
                client_id: None,
                task_id: None,
                replay: m.replay.as_ref(),
            },
            Uuid::new_v4().to_string(),
            m.correlation_id.clone(),
            m.data.to_vec(),
        ));
        Ok(self.commit(change)?)
    }

    /// Dead-letters an input that failed decoding, with its reason, and marks it seen.
    fn refuse_input(
        &mut self,
        m: &Inbound,
        env: Option<&Envelope>,
        e: &ProtocolError,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        warn!(queue = m.queue, reason = e.reason_code(), error = %e, "refused message; dead-lettering it");
        let mut change = Change::new();
        let mid = env
            .map(|e| e.message_id.to_string())
            .or_else(|| m.message_id.clone());
        if let Some(mid) = &mid {
            if self.store.dedup::<Seen>(mid)?.is_some() {
                return Ok(Vec::new());
            }
            change.put_dedup(mid, &Seen::of(m.data, Utc::now()));
        }
        change.push_outbox(self.dead_letter(
            DeadLetter {
                reason: e.reason_code(),
                message: e.to_string(),
                exchange: m.exchange,
                routing_key: m.routing_key,
                queue: m.queue,
                client_id: None,
                task_id: None,
                replay: m.replay.as_ref(),
            },
            mid.unwrap_or_else(|| Uuid::new_v4().to_string()),
            m.correlation_id.clone(),
            m.data.to_vec(),
        ));
        Stats::inc(&self.stats.dead_letters);
        self.stats.metrics.dead_letter(e.reason_code());
        Ok(self.commit(change)?)
    }

    fn dead_letter(
        &self,
        dl: DeadLetter<'_>,
        message_id: String,
        correlation_id: Option<String>,
        body: Vec<u8>,
    ) -> OutboxEntry {
        let now = Utc::now().to_rfc3339();
        // A replayed message continues its failure history.
        let first = dl
            .replay
            .and_then(|r| r.first_failed_at.clone())
            .unwrap_or_else(|| now.clone());
        let attempts = dl.replay.map_or(1, |r| r.attempts.max(1));
        let mut headers = vec![
            ("x-journeyman-reason".to_string(), dl.reason.to_string()),
            ("x-journeyman-reason-message".to_string(), dl.message),
            (
                "x-journeyman-original-exchange".to_string(),
                dl.exchange.to_string(),
            ),
            (
                "x-journeyman-original-routing-key".to_string(),
                dl.routing_key.to_string(),
            ),
            (
                "x-journeyman-original-queue".to_string(),
                dl.queue.to_string(),
            ),
            ("x-journeyman-failed-at".to_string(), now),
            ("x-journeyman-first-failed-at".to_string(), first),
            ("x-journeyman-attempts".to_string(), attempts.to_string()),
        ];
        if let Some(c) = dl.client_id {
            headers.push(("x-journeyman-client-id".into(), c.to_string()));
        }
        if let Some(t) = dl.task_id {
            headers.push(("x-journeyman-task-id".into(), t.to_string()));
        }
        OutboxEntry {
            id: 0,
            exchange: self.names.dlx(),
            routing_key: dl.routing_key.to_string(),
            mandatory: false,
            message_id,
            correlation_id,
            reply_to: None,
            message_type: "dead_letter".into(),
            headers,
            purpose: Purpose::DeadLetter,
            body,
        }
    }

    fn reply(
        &self,
        to: &str,
        request: &Envelope,
        message_type: MessageType,
        payload: Value,
    ) -> OutboxEntry {
        let env = Envelope::new(
            AgentRef::orchestrator(),
            request.source_agent.clone(),
            message_type,
            request.intent.clone(),
            payload,
            Utc::now(),
        )
        .with_correlation(request.reply_correlation());
        let env = self.sign(env);
        OutboxEntry {
            id: 0,
            exchange: String::new(),
            routing_key: to.to_string(),
            mandatory: false,
            message_id: env.message_id.to_string(),
            correlation_id: env.correlation_id.clone(),
            reply_to: None,
            message_type: message_type.as_str().into(),
            headers: Vec::new(),
            purpose: Purpose::Reply,
            body: env.to_bytes(),
        }
    }

    fn event(&self, rec: &JourneyRecord, name: &str, detail: Value) -> OutboxEntry {
        let payload = event_payload(rec, name, detail, Utc::now());
        let env = Envelope::new(
            AgentRef::orchestrator(),
            AgentRef::new("*", "journeyman"),
            MessageType::Event,
            name,
            payload,
            Utc::now(),
        );
        let env = self.sign(env);
        OutboxEntry {
            id: 0,
            exchange: self.names.events(),
            routing_key: name.to_string(),
            mandatory: false,
            message_id: env.message_id.to_string(),
            correlation_id: None,
            reply_to: None,
            message_type: "event".into(),
            headers: vec![(trace::HEADER.into(), journey_trace(rec).header())],
            purpose: Purpose::Event,
            body: env.to_bytes(),
        }
    }

    /// Records a history line. Ids come from the store's monotonic counter, so lines stay
    /// ordered even when a refused command's record is not saved.
    fn history(
        &self,
        change: &mut Change,
        rec: &JourneyRecord,
        kind: &str,
        detail: Value,
        cause: Option<&str>,
    ) {
        let seq = self.store.next_id().unwrap_or_default();
        change.push_history(
            &rec.journey.client_id,
            seq,
            &HistoryEntry {
                at: Utc::now(),
                kind: kind.to_string(),
                detail,
                cause: cause.map(str::to_string),
            },
        );
    }

    fn apply_command(
        &mut self,
        m: &Inbound,
        env: &Envelope,
        cmd: Command,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let client_id = cmd.client_id().to_string();
        let mid = env.message_id.to_string();
        let mut change = Change::new();
        change.put_dedup(&mid, &Seen::of(m.data, now));
        let existing: Option<JourneyRecord> = self.store.journey(&client_id)?;
        let outcome: Result<JourneyRecord, Refusal> = match (cmd, existing) {
            (Command::Start(p), None) => {
                let mut rec = JourneyRecord {
                    journey: Journey::start(client_id.clone(), now),
                    playbook: self.current_playbook.clone(),
                    context: Value::Object(p.context.unwrap_or_default()),
                    work: None,
                    work_seq: 0,
                    evidence: Default::default(),
                    gate: None,
                    rollback: None,
                    trace_id: Some(
                        m.traceparent
                            .as_deref()
                            .and_then(TraceParent::parse)
                            .unwrap_or_else(TraceParent::new_root)
                            .trace_id,
                    ),
                };
                Stats::inc(&self.stats.journeys_started);
                self.history(
                    &mut change,
                    &rec,
                    "started",
                    json!({"stage": "sandbox", "playbook": rec.playbook}),
                    Some(&mid),
                );
                change.push_outbox(self.event(&rec, "journey.started", json!({})));
                self.enter_stage(&mut change, &mut rec, now)?;
                Ok(rec)
            }
            (Command::Start(_), Some(rec)) => Err(Refusal::new(
                "already_exists",
                format!(
                    "client {client_id} already has a journey (stage {}); there is one journey per client",
                    rec.journey.stage
                ),
            )),
            (Command::Status(_), Some(rec)) => Ok(rec),
            (_, None) => Err(Refusal::new(
                "not_found",
                format!("no journey for client {client_id}; start one with journey.start"),
            )),
            (Command::Promote(_), Some(mut rec)) => self
                .gated(&mut change, &mut rec, &Event::Promote, now, &mid)
                .map(|_| rec),
            (Command::Complete(_), Some(mut rec)) => self
                .gated(&mut change, &mut rec, &Event::Complete, now, &mid)
                .map(|_| rec),
            (Command::Cancel(p), Some(mut rec)) => {
                let reason = p.reason.unwrap_or_else(|| "cancelled".into());
                self.transition_with(
                    &mut change,
                    &mut rec,
                    &Event::Cancel,
                    now,
                    &mid,
                    json!({"reason": reason}),
                )
                .map(|_| {
                    if let Some(w) = rec.work.as_mut() {
                        w.cancel(format!("journey cancelled: {reason}"), now);
                    }
                    rec.rollback = None;
                    rec
                })
            }
            (Command::Rollback(p), Some(mut rec)) => {
                let retry = rec.rollback.as_ref().is_some_and(|r| r.failed);
                if retry && p.rollback_to.is_none() {
                    self.resume(&mut change, &mut rec, now, &mid)
                        .map(|_| rec)
                        .map_err(Refusal::from)
                } else {
                    self.start_rollback(
                        &mut change,
                        &mut rec,
                        &p.reason,
                        p.rollback_to,
                        false,
                        now,
                        &mid,
                    )
                    .map(|_| rec)
                }
            }
            (Command::Evidence(p), Some(mut rec)) => {
                if rec.journey.stage.is_terminal() {
                    Err(Refusal::new(
                        "invalid_transition",
                        format!(
                            "the journey is {}; it takes no more evidence",
                            rec.journey.stage
                        ),
                    ))
                } else {
                    rec.evidence
                        .record_report(&p, &env.source_agent.agent_id, &mid, now);
                    let playbook = self.playbook(&rec.playbook)?;
                    if let Some(window) = playbook.longest_event_window() {
                        rec.evidence.prune_events_before(now - to_chrono(window));
                    }
                    self.history(
                        &mut change,
                        &rec,
                        "evidence",
                        json!({"reported_by": env.source_agent.agent_id, "evidence": p}),
                        Some(&mid),
                    );
                    self.after_evidence(&mut change, &mut rec, now, &mid)?;
                    Ok(rec)
                }
            }
            (Command::Resume(_), Some(mut rec)) => {
                let failed = rec
                    .work
                    .as_ref()
                    .is_some_and(|w| w.status == WorkStatus::Failed);
                if !failed || rec.journey.stage.is_terminal() {
                    Err(Refusal::new(
                        "invalid_transition",
                        format!(
                            "nothing to resume: the journey is {} ({})",
                            rec.status(),
                            rec.journey.stage
                        ),
                    ))
                } else {
                    self.resume(&mut change, &mut rec, now, &mid)?;
                    Ok(rec)
                }
            }
        };
        match outcome {
            Ok(rec) => {
                if let Some(r) = &m.replay {
                    let detail = json!({
                        "intent": env.intent,
                        "replay_of": r.replay_of,
                        "attempts": r.attempts,
                        "edited_at": r.edited_at,
                        "payload": if r.edited_at.is_some() { env.payload.clone() } else { Value::Null },
                    });
                    let kind = if r.edited_at.is_some() {
                        "replayed_with_edit"
                    } else {
                        "replayed"
                    };
                    self.history(&mut change, &rec, kind, detail, Some(&mid));
                }
                if let Some(to) = &m.reply_to {
                    change.push_outbox(self.reply(
                        to,
                        env,
                        MessageType::Response,
                        state_view(&rec),
                    ));
                }
                self.save(&mut change, &rec)?;
            }
            Err(r) => {
                Stats::inc(&self.stats.refusals);
                info!(client_id, code = r.code, reason = %r.message, "command refused");
                if let Some(to) = &m.reply_to {
                    let payload = serde_json::to_value(ErrorPayload {
                        code: r.code.into(),
                        message: r.message.clone(),
                        retryable: false,
                        details: r.details.clone(),
                    })
                    .unwrap_or(Value::Null);
                    change.push_outbox(self.reply(to, env, MessageType::Error, payload));
                }
                // Refused state changes are kept for the on-call engineer; refused status
                // queries are just answered.
                if env.intent != "journey.status" {
                    Stats::inc(&self.stats.dead_letters);
                    self.stats.metrics.dead_letter(r.code);
                    change.push_outbox(self.dead_letter(
                        DeadLetter {
                            reason: r.code,
                            message: r.message,
                            exchange: m.exchange,
                            routing_key: m.routing_key,
                            queue: m.queue,
                            client_id: Some(&client_id),
                            task_id: None,
                            replay: m.replay.as_ref(),
                        },
                        mid.clone(),
                        env.correlation_id.clone(),
                        m.data.to_vec(),
                    ));
                }
            }
        }
        Ok(self.commit(change)?)
    }

    /// Evaluates the current stage's exit gate and records the evaluation.
    fn evaluate_gate(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<gate::ValidationResult, OrchestratorError> {
        let playbook = self.playbook(&rec.playbook)?;
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
            now,
        );
        if result.passed {
            Stats::inc(&self.stats.gate_passed);
        } else {
            Stats::inc(&self.stats.gate_failed);
        }
        self.history(
            change,
            rec,
            "gate_evaluation",
            serde_json::to_value(&result).unwrap_or(Value::Null),
            Some(cause),
        );
        rec.gate = Some(result.clone());
        Ok(result)
    }

    fn stage_work_done(rec: &JourneyRecord) -> bool {
        rec.work.as_ref().is_some_and(|w| {
            w.kind == WorkKind::Stage
                && w.stage == rec.journey.stage
                && w.status == WorkStatus::Completed
        })
    }

    /// The gate before promotion or completion: the work is done and every check passes.
    fn gate_for(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        if !rec.journey.stage.is_active_stage() {
            return Err(Refusal::new(
                "invalid_transition",
                format!(
                    "a journey in stage {} has no gate to pass",
                    rec.journey.stage
                ),
            ));
        }
        if !Self::stage_work_done(rec) {
            return Err(Refusal::new(
                "not_ready",
                format!(
                    "the {} unit of work is not complete ({})",
                    rec.journey.stage,
                    rec.status()
                ),
            ));
        }
        let result = self.evaluate_gate(change, rec, now, cause)?;
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
    fn gated(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        event: &Event,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        // The state machine says which stage may take the event; ask it first, so a
        // refusal names the real reason rather than a gate.
        rec.journey.apply(event, now)?;
        self.gate_for(change, rec, now, cause)?;
        self.transition(change, rec, event, now, cause)
    }

    /// Promotes automatically when the work is done and the gate passes; otherwise says
    /// why it waits (an event the dashboards and the demo see).
    fn try_auto_promote(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), OrchestratorError> {
        if !self.policy.auto_promote
            || !matches!(rec.journey.stage, Stage::Sandbox | Stage::Pilot)
            || !Self::stage_work_done(rec)
        {
            return Ok(());
        }
        let result = self.evaluate_gate(change, rec, now, cause)?;
        if result.passed {
            if let Err(r) = self.transition(change, rec, &Event::Promote, now, cause) {
                warn!(client_id = %rec.journey.client_id, error = %r.message, "promotion failed");
            }
        } else {
            let failed: Vec<&str> = result.failed_checks().map(|c| c.name.as_str()).collect();
            change.push_outbox(self.event(
                rec,
                "gate.failed",
                json!({"summary": result.summary(), "failed": failed}),
            ));
        }
        Ok(())
    }

    /// After new evidence: a rollback trigger that fires wins; else the gate may now pass.
    fn after_evidence(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<bool, OrchestratorError> {
        let stage = rec.journey.stage;
        if !stage.is_active_stage() {
            return Ok(false);
        }
        let playbook = self.playbook(&rec.playbook)?;
        let triggers = playbook
            .stage(stage.as_str())
            .map(|s| s.rollback_triggers.as_slice())
            .unwrap_or(&[]);
        let hits = gate::triggered(triggers, &rec.evidence, rec.journey.stage_started_at, now);
        if !hits.is_empty() {
            let reason = hits
                .iter()
                .map(|h| format!("{}: {}", h.name, h.message))
                .collect::<Vec<_>>()
                .join("; ");
            info!(client_id = %rec.journey.client_id, %stage, %reason, "rollback trigger fired");
            if let Err(r) = self.start_rollback(change, rec, &reason, None, true, now, cause) {
                warn!(client_id = %rec.journey.client_id, error = %r.message, "automatic rollback refused");
            }
            return Ok(true);
        }
        self.try_auto_promote(change, rec, now, cause)?;
        Ok(false)
    }

    /// DES-002 §5: pause the stage, snapshot, run the stage's rollback work, then land on
    /// the stage before (or `to`).
    #[allow(clippy::too_many_arguments)]
    fn start_rollback(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        reason: &str,
        to: Option<Stage>,
        automatic: bool,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        let from = rec.journey.stage;
        let snapshot = Snapshot {
            at: now,
            reason: reason.to_string(),
            record: rec.clone(),
        };
        let event = Event::InitiateRollback { to };
        // Validate before touching anything.
        let next = rec.journey.apply(&event, now)?;
        let target = next.rollback_target.unwrap_or(Stage::Sandbox);
        if let Some(w) = rec.work.as_mut() {
            w.cancel(format!("rollback: {reason}"), now);
        }
        change.put_snapshot(
            &rec.journey.client_id,
            self.store.next_id().map_err(OrchestratorError::from)?,
            &snapshot,
        );
        rec.rollback = Some(RollbackInfo {
            reason: reason.to_string(),
            automatic,
            from,
            to: target,
            started_at: now,
            failed: false,
        });
        Stats::inc(&self.stats.rollbacks_started);
        self.stats.metrics.rollback_started(reason, automatic);
        if automatic {
            Stats::inc(&self.stats.rollbacks_automatic);
        }
        self.transition_with(
            change,
            rec,
            &event,
            now,
            cause,
            json!({"reason": reason, "automatic": automatic, "target": target}),
        )?;
        // Run the stage's rollback work; none means there is nothing to undo.
        let playbook = self.playbook(&rec.playbook)?;
        let rollback = playbook
            .stage(from.as_str())
            .map(|s| s.rollback.tasks.clone())
            .unwrap_or_default();
        if rollback.is_empty() {
            return self.complete_rollback(change, rec, now, cause);
        }
        rec.work_seq += 1;
        let spec = StageWork {
            tasks: rollback,
            ..Default::default()
        };
        let mut work = UnitOfWork::new(
            format!(
                "uow-{}-rollback-{}-{}",
                rec.journey.client_id, from, rec.work_seq
            ),
            from,
            &spec,
            now,
        );
        work.kind = WorkKind::Rollback;
        rec.work = Some(work);
        self.advance(change, rec, now).map_err(Refusal::from)
    }

    fn complete_rollback(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        let info = rec.rollback.clone();
        self.transition_with(
            change,
            rec,
            &Event::CompleteRollback,
            now,
            cause,
            json!({"rollback": info}),
        )?;
        Stats::inc(&self.stats.rollbacks_completed);
        rec.rollback = None;
        Ok(())
    }

    /// Restarts failed work from its failed tasks, keeping completed ones (a redrive).
    fn resume(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), OrchestratorError> {
        if let Some(w) = rec.work.as_mut() {
            w.resume();
        }
        if let Some(r) = rec.rollback.as_mut() {
            r.failed = false;
        }
        Stats::inc(&self.stats.resumes);
        self.history(
            change,
            rec,
            "resumed",
            json!({"status": rec.status()}),
            Some(cause),
        );
        change.push_outbox(self.event(rec, "journey.resumed", json!({})));
        self.advance(change, rec, now)
    }

    fn transition(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        event: &Event,
        now: DateTime<Utc>,
        cause: &str,
    ) -> Result<(), Refusal> {
        self.transition_with(change, rec, event, now, cause, json!({}))
    }

    /// Applies a state-machine event, recording history and an event message; entering an
    /// active stage runs its unit of work (again, after a rollback).
    fn transition_with(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        event: &Event,
        now: DateTime<Utc>,
        cause: &str,
        extra: Value,
    ) -> Result<(), Refusal> {
        let from = rec.journey.stage;
        rec.journey = rec.journey.apply(event, now)?;
        let to = rec.journey.stage;
        let name = match event {
            Event::Promote => {
                Stats::inc(&self.stats.promotions);
                "journey.promoted"
            }
            Event::InitiateRollback { .. } => "journey.rollback_started",
            Event::CompleteRollback => "journey.rollback_completed",
            Event::Cancel => "journey.cancelled",
            Event::Complete => "journey.completed",
        };
        info!(client_id = %rec.journey.client_id, %from, %to, event = event.name(), "transition");
        let mut detail = json!({"from": from, "to": to, "event": event.name()});
        if let (Some(d), Value::Object(x)) = (detail.as_object_mut(), extra) {
            d.extend(x);
        }
        self.history(change, rec, "transition", detail.clone(), Some(cause));
        change.push_outbox(self.event(rec, name, detail));
        if to.is_active_stage() && matches!(event, Event::Promote | Event::CompleteRollback) {
            rec.gate = None;
            self.enter_stage(change, rec, now)?;
        }
        Ok(())
    }

    fn enter_stage(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        let playbook = self.playbook(&rec.playbook)?;
        let stage = rec.journey.stage;
        let spec = playbook.stage(stage.as_str()).cloned().unwrap_or_default();
        rec.work_seq += 1;
        let work_id = format!("uow-{}-{}-{}", rec.journey.client_id, stage, rec.work_seq);
        // A stage without tasks has an empty unit of work, done at once: only its gate
        // stands between the journey and the next stage.
        rec.work = Some(UnitOfWork::new(work_id, stage, &spec, now));
        self.advance(change, rec, now)
    }

    /// The spec a unit of work runs: its stage's tasks, or its stage's rollback tasks.
    fn spec_of<'a>(playbook: &'a Playbook, work: &UnitOfWork) -> Cow<'a, StageWork> {
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
    fn advance(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        let playbook = self.playbook(&rec.playbook)?;
        let Some(work) = rec.work.as_mut() else {
            return Ok(());
        };
        let spec = Self::spec_of(&playbook, work);
        let view = JourneyView {
            client_id: &rec.journey.client_id,
            context: &rec.context,
        };
        let was_running = work.status == WorkStatus::Running;
        // The correlation id names its journey (client ids never contain '/'), so a reply
        // finds its journey without a lookup entry per dispatch.
        let client_id = rec.journey.client_id.clone();
        let mut new_id = || format!("{client_id}/{}", Uuid::new_v4());
        let dispatches = work.advance(&spec, &view, now, &mut new_id);
        let (status, kind) = (work.status, work.kind);
        for d in dispatches {
            Stats::inc(&self.stats.tasks_dispatched);
            self.stats.metrics.task_dispatched(&d.intent);
            if d.attempt > 1 {
                Stats::inc(&self.stats.retries);
                self.stats.metrics.task_retried(&d.intent);
            }
            let agent = spec
                .task(&d.task_id)
                .and_then(|t| t.agent_id.clone())
                .unwrap_or_else(|| d.intent.clone());
            let env = Envelope::new(
                AgentRef::orchestrator(),
                AgentRef::new(agent, "journeyman"),
                MessageType::Request,
                d.intent.clone(),
                d.input,
                now,
            )
            .with_correlation(d.correlation_id.clone());
            let env = self.sign(env);
            debug!(client_id = %rec.journey.client_id, task = %d.task_id, attempt = d.attempt, "dispatch");
            change.push_outbox(OutboxEntry {
                id: 0,
                exchange: self.names.intents(),
                routing_key: d.intent.clone(),
                mandatory: true,
                message_id: env.message_id.to_string(),
                correlation_id: Some(d.correlation_id.clone()),
                reply_to: Some(self.reply_queue.clone()),
                message_type: "request".into(),
                headers: vec![
                    (
                        "x-journeyman-client-id".into(),
                        rec.journey.client_id.clone(),
                    ),
                    ("x-journeyman-task-id".into(), d.task_id.clone()),
                    ("x-journeyman-attempt".into(), d.attempt.to_string()),
                    (trace::HEADER.into(), journey_trace(rec).header()),
                ],
                purpose: Purpose::TaskRequest {
                    client_id: rec.journey.client_id.clone(),
                    correlation_id: d.correlation_id,
                },
                body: env.to_bytes(),
            });
        }
        if !was_running {
            return Ok(());
        }
        let stage = rec.journey.stage;
        match (status, kind) {
            (WorkStatus::Failed, _) => self.work_failed(change, rec),
            (WorkStatus::Completed, WorkKind::Stage) => {
                self.history(change, rec, "work_completed", json!({"stage": stage}), None);
                change.push_outbox(self.event(rec, "work.completed", json!({"stage": stage})));
                self.try_auto_promote(change, rec, now, "work.completed")?;
            }
            (WorkStatus::Completed, WorkKind::Rollback) => {
                // Validated: every rollback task reported success.
                self.history(
                    change,
                    rec,
                    "rollback_work_completed",
                    json!({"undone": rec.rollback.as_ref().map(|r| r.from)}),
                    None,
                );
                if let Err(r) = self.complete_rollback(change, rec, now, "rollback.work.completed")
                {
                    warn!(client_id = %rec.journey.client_id, error = %r.message, "completing the rollback failed");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Work that failed after retries pauses the journey (or fails its rollback); a
    /// dead-letter record keeps it in front of the on-call engineer.
    fn work_failed(&mut self, change: &mut Change, rec: &mut JourneyRecord) {
        Stats::inc(&self.stats.dead_letters);
        let stage = rec.journey.stage;
        let work = rec.work.as_ref();
        let failure = work.and_then(|w| w.failure.clone()).unwrap_or_default();
        let task_id = work
            .and_then(|w| w.tasks.iter().find(|t| t.status == TaskStatus::Failed))
            .map(|t| t.task_id.clone());
        let failed_intent = work
            .and_then(|w| w.tasks.iter().find(|t| t.status == TaskStatus::Failed))
            .map(|t| t.intent.clone());
        let rollback = work.is_some_and(|w| w.kind == WorkKind::Rollback);
        let (reason, event) = if rollback {
            Stats::inc(&self.stats.rollbacks_failed);
            if let Some(r) = rec.rollback.as_mut() {
                r.failed = true;
            }
            ("rollback_failed", "rollback.failed")
        } else {
            Stats::inc(&self.stats.pauses);
            let reason = if failure.contains("no_agent") {
                "no_agent"
            } else {
                "task_failed"
            };
            (reason, "journey.paused")
        };
        self.stats.metrics.dead_letter(reason);
        if let Some(intent) = &failed_intent {
            self.stats.metrics.task_failed(intent);
        }
        warn!(client_id = %rec.journey.client_id, %stage, %failure, "unit of work failed");
        let detail = json!({"stage": stage, "failure": failure, "task_id": task_id});
        self.history(change, rec, "work_failed", detail.clone(), None);
        change.push_outbox(self.event(rec, event, detail.clone()));
        // Kept for compatibility with consumers of issue 2's event.
        change.push_outbox(self.event(rec, "work.failed", detail));
        let body = serde_json::to_vec(&json!({
            "client_id": rec.journey.client_id,
            "stage": stage,
            "work": rec.work,
        }))
        .unwrap_or_default();
        let routing_key = format!("work.failed.{stage}");
        let dl = self.dead_letter(
            DeadLetter {
                reason,
                message: failure,
                exchange: "",
                routing_key: &routing_key,
                queue: "",
                client_id: Some(&rec.journey.client_id),
                task_id: task_id.as_deref(),
                replay: None,
            },
            Uuid::new_v4().to_string(),
            None,
            body,
        );
        change.push_outbox(dl);
    }

    fn apply_reply(
        &mut self,
        m: &Inbound,
        env: &Envelope,
        outcome: TaskOutcome,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let mid = env.message_id.to_string();
        let mut change = Change::new();
        change.put_dedup(&mid, &Seen::of(m.data, now));
        let corr = env.correlation_id.clone().unwrap_or_default();
        let client = match corr.split_once('/') {
            Some((client, _)) => Some(client.to_string()),
            // Dispatched by an earlier version, which kept a lookup entry.
            None => self.store.inflight(&corr)?,
        };
        let rec: Option<JourneyRecord> = match &client {
            Some(c) => self.store.journey(c)?,
            None => None,
        };
        let Some(mut rec) = rec else {
            Stats::inc(&self.stats.stale_replies);
            warn!(correlation_id = %corr, "reply with an unknown correlation id; recorded and ignored");
            return Ok(self.commit(change)?);
        };
        let playbook = self.playbook(&rec.playbook)?;
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
                    .find(|t| t.correlation_id.as_deref() == Some(corr.as_str()))
            })
            .and_then(|t| Some((t.intent.clone(), t.dispatched_at?)));
        if let Some((intent, at)) = sent {
            self.stats
                .metrics
                .observe_round_trip(&intent, (now - at).to_std().unwrap_or_default());
        }
        let effect = match rec.work.as_mut() {
            None => ReplyEffect::Unknown,
            Some(work) => {
                let spec = Self::spec_of(&playbook, work);
                work.on_reply(&spec, &corr, result.clone(), now, rand::random::<f64>())
            }
        };
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
                    .record_task_output(&spec.evidence, output, task_id, Some(&mid), now);
            for p in problems {
                warn!(client_id = %rec.journey.client_id, problem = %p, "task output evidence not recorded");
            }
        }
        self.record_effect(&mut change, &mut rec, &effect, Some(&mid), now)?;
        self.save(&mut change, &rec)?;
        Ok(self.commit(change)?)
    }

    fn record_effect(
        &mut self,
        change: &mut Change,
        rec: &mut JourneyRecord,
        effect: &ReplyEffect,
        cause: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        match effect {
            ReplyEffect::Completed { task_id } => {
                Stats::inc(&self.stats.tasks_completed);
                if let Some(t) = rec
                    .work
                    .as_ref()
                    .and_then(|w| w.tasks.iter().find(|t| &t.task_id == task_id))
                {
                    self.stats.metrics.task_completed(&t.intent);
                }
                debug!(client_id = %rec.journey.client_id, task_id, "task completed");
                self.history(
                    change,
                    rec,
                    "task_completed",
                    json!({"task_id": task_id}),
                    cause,
                );
                let is_stage_work = rec.work.as_ref().is_some_and(|w| w.kind == WorkKind::Stage);
                // New evidence from the output may fire a rollback trigger first.
                if is_stage_work
                    && self.after_evidence(change, rec, now, cause.unwrap_or("task"))?
                {
                    return Ok(());
                }
                self.advance(change, rec, now)?;
            }
            ReplyEffect::RetryScheduled {
                task_id,
                attempt,
                retry_at,
                error,
            } => {
                info!(client_id = %rec.journey.client_id, task_id, attempt, %retry_at, error, "task attempt failed; retry scheduled");
                let detail = json!({"task_id": task_id, "attempt": attempt, "retry_at": retry_at, "error": error});
                self.history(change, rec, "task_retry", detail, cause);
            }
            ReplyEffect::TaskFailed { .. } => self.work_failed(change, rec),
            ReplyEffect::Stale { task_id, why } => {
                Stats::inc(&self.stats.stale_replies);
                debug!(client_id = %rec.journey.client_id, task_id, why, "stale reply ignored");
                self.history(
                    change,
                    rec,
                    "reply_ignored",
                    json!({"task_id": task_id, "why": why}),
                    cause,
                );
            }
            ReplyEffect::Unknown => {
                Stats::inc(&self.stats.stale_replies);
                self.history(
                    change,
                    rec,
                    "reply_ignored",
                    json!({"why": "unknown correlation id"}),
                    cause,
                );
            }
        }
        Ok(())
    }

    /// A task request came back unroutable: no queue serves its intent (yet).
    pub fn handle_unroutable(
        &mut self,
        outbox_id: u64,
        client_id: &str,
        correlation_id: &str,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let mut change = Change::new();
        change.remove_outbox(outbox_id);
        if let Some(mut rec) = self.store.journey::<JourneyRecord>(client_id)? {
            let playbook = self.playbook(&rec.playbook)?;
            let effect = rec.work.as_mut().and_then(|w| {
                let spec = Self::spec_of(&playbook, w).into_owned();
                w.on_unroutable(&spec, correlation_id, now, rand::random::<f64>())
            });
            if let Some(effect) = effect {
                self.record_effect(&mut change, &mut rec, &effect, None, now)?;
                self.save(&mut change, &rec)?;
            }
        }
        Ok(self.commit(change)?)
    }

    /// Handles every journey with a due deadline or retry.
    pub fn fire_timers(
        &mut self,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let mut due = BTreeSet::new();
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            if let Some((_, c)) = self.timers.pop_first() {
                due.insert(c);
            }
        }
        let mut out = Vec::new();
        for client_id in due {
            let Some(mut rec) = self.store.journey::<JourneyRecord>(&client_id)? else {
                continue;
            };
            if rec.journey.stage.is_terminal() {
                continue;
            }
            let playbook = self.playbook(&rec.playbook)?;
            let mut change = Change::new();
            let mut effects = Vec::new();
            if let Some(w) = rec.work.as_mut() {
                let spec = Self::spec_of(&playbook, w).into_owned();
                for (at, task_id, attempt) in w.timers() {
                    if at <= now
                        && let Some(e) =
                            w.on_timeout(&spec, &task_id, attempt, now, rand::random::<f64>())
                    {
                        effects.push(e);
                    }
                }
            }
            for e in &effects {
                self.record_effect(&mut change, &mut rec, e, None, now)?;
            }
            // Retries that are due are dispatched here.
            self.advance(&mut change, &mut rec, now)?;
            if change.empty {
                // Nothing changed, but a timer is still pending (save arms otherwise).
                self.arm(&rec);
            } else {
                self.save(&mut change, &rec)?;
                out.extend(self.commit(change)?);
            }
        }
        Ok(out)
    }

    /// Stores the journey and marks its status card due. Cards go to `<ns>.events` in
    /// rounds ([`Core::publish_cards`]), one per changed journey, so a burst of task
    /// replies costs one card, built off the per-message path. With a dashboard webhook,
    /// every card is also queued here, in order, for delivery.
    fn save(&mut self, change: &mut Change, rec: &JourneyRecord) -> Result<(), OrchestratorError> {
        let client = rec.journey.client_id.as_str();
        change.put_journey(client, rec);
        change.mark_card_due(client);
        self.cards_due = true;
        let changed = if rec.is_active() {
            !self.active.contains(client) && self.active.insert(client.to_string())
        } else {
            self.active.remove(client)
        };
        if changed {
            self.admission.set_active(self.active.len());
        }
        if self.policy.webhook {
            let mut recent = self.store.recent_history(client, RECENT_ACTIVITIES)?;
            recent.extend(change.history_of(client));
            let skip = recent.len().saturating_sub(RECENT_ACTIVITIES);
            let recent: Vec<Value> = recent.into_iter().skip(skip).collect();
            let card_id = self.store.next_id()?;
            change.push_card(card_id, &status_card(rec, &recent, card_id, Utc::now()));
        }
        self.arm(rec);
        Ok(())
    }

    /// Whether some journey changed since its last status card.
    pub fn cards_due(&self) -> bool {
        self.cards_due
    }

    /// Builds the status cards that are due (up to `limit`) and queues them in the outbox
    /// in the same batch that clears their marks: a crash either keeps the mark or the
    /// queued card, never neither.
    pub fn publish_cards(&mut self, limit: usize) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let due = self.store.cards_due(limit)?;
        self.cards_due = due.len() == limit;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut change = Change::new();
        let now = Utc::now();
        for client in &due {
            change.clear_card_due(client);
            let Some(rec) = self.store.journey::<JourneyRecord>(client)? else {
                continue;
            };
            let recent = self.store.recent_history(client, RECENT_ACTIVITIES)?;
            let card_id = self.store.next_id()?;
            let card = status_card(&rec, &recent, card_id, now);
            change.push_outbox(self.event(&rec, "journey.status_card", card));
        }
        Ok(self.commit(change)?)
    }

    fn arm(&mut self, rec: &JourneyRecord) {
        if let Some(w) = &rec.work {
            for (at, _, _) in w.timers() {
                self.timers.insert((at, rec.journey.client_id.clone()));
            }
        }
    }
}

/// A new span in the journey's trace (journeys from before tracing get a fresh trace).
fn journey_trace(rec: &JourneyRecord) -> TraceParent {
    match &rec.trace_id {
        Some(t) => TraceParent::child_of(t),
        None => TraceParent::new_root(),
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskResponse;

    fn core(dir: &std::path::Path, policy: Policy) -> Core {
        let store = Store::open(dir).unwrap();
        let names = Names::new("unit");
        Core::new(
            store,
            names.clone(),
            names.replies("0"),
            Decoder::new(crate::protocol::DEFAULT_MAX_MESSAGE_BYTES),
            &Playbook::default_playbook(),
            Arc::new(Stats::default()),
            policy,
        )
        .unwrap()
    }

    fn inbound<'a>(source: Source, data: &'a [u8], env: &'a Envelope) -> Inbound<'a> {
        Inbound {
            source,
            data,
            exchange: "",
            routing_key: &env.intent,
            queue: "q",
            message_id: Some(env.message_id.to_string()),
            correlation_id: env.correlation_id.clone(),
            reply_to: None,
            traceparent: None,
            replay: None,
        }
    }

    /// Answers every task request in `out` with success; returns what that published.
    fn answer_all(core: &mut Core, out: Vec<OutboxEntry>) -> Vec<OutboxEntry> {
        let mut next = Vec::new();
        for e in out {
            if !matches!(e.purpose, Purpose::TaskRequest { .. }) {
                continue;
            }
            let req: Envelope = serde_json::from_slice(&e.body).unwrap();
            let mut reply = Envelope::new(
                AgentRef::new("sim", "journeyman"),
                req.source_agent.clone(),
                MessageType::Response,
                req.intent.clone(),
                {
                    let out = crate::sim::simulated_output(&req.intent, "acme", &json!({}));
                    let Value::Object(out) = out else {
                        panic!("{out}")
                    };
                    serde_json::to_value(TaskResponse::completed(out)).unwrap()
                },
                Utc::now(),
            );
            reply.correlation_id = Some(req.reply_correlation());
            let data = reply.to_bytes();
            next.extend(core.handle(&inbound(Source::Reply, &data, &reply)).unwrap());
        }
        next
    }

    #[test]
    fn housekeeping_bounds_a_finished_journey_and_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            auto_promote: false,
            finished_retention: ChronoDuration::zero(),
            dedup_retention: ChronoDuration::zero(),
            ..Policy::default()
        };
        let mut core = core(dir.path(), policy);
        let start = Envelope::new(
            AgentRef::new("cli", "journeyman"),
            AgentRef::orchestrator(),
            MessageType::Request,
            "journey.start",
            json!({"client_id": "acme", "context": {"data_sources": ["drive"], "connectors": ["drive"]}}),
            Utc::now(),
        );
        let data = start.to_bytes();
        let mut out = core
            .handle(&inbound(Source::Command, &data, &start))
            .unwrap();
        while out
            .iter()
            .any(|e| matches!(e.purpose, Purpose::TaskRequest { .. }))
        {
            out = answer_all(&mut core, out);
        }
        let before = core.store.census().unwrap();
        assert_eq!(
            before.correlations.0, 0,
            "no lookup entry per dispatch: {before:?}"
        );
        assert_eq!(before.dedup_marks.0, 5, "{before:?}");

        // Still running (awaiting its gate): its correlations are kept, dedup marks go.
        let now = Utc::now() + ChronoDuration::seconds(1);
        let p = core.housekeeping(now).unwrap();
        assert_eq!((p.dedup_marks, p.correlations, p.compacted), (5, 0, 0));

        let cancel = Envelope::new(
            AgentRef::new("cli", "journeyman"),
            AgentRef::orchestrator(),
            MessageType::Request,
            "journey.cancel",
            json!({"client_id": "acme", "reason": "test"}),
            Utc::now(),
        );
        let data = cancel.to_bytes();
        core.handle(&inbound(Source::Command, &data, &cancel))
            .unwrap();
        let history_before = core.store.history::<HistoryEntry>("acme").unwrap().len();
        let p = core
            .housekeeping(Utc::now() + ChronoDuration::seconds(1))
            .unwrap();
        assert_eq!((p.correlations, p.compacted), (0, 1), "{p:?}");
        let after = core.store.census().unwrap();
        assert_eq!(after.correlations.0, 0);
        assert_eq!(after.dedup_marks.0, 0);
        assert!(
            after.journeys.1 < before.journeys.1,
            "{before:?} -> {after:?}"
        );
        assert_eq!(
            core.store.history::<HistoryEntry>("acme").unwrap().len(),
            history_before,
            "history is kept"
        );
        let rec: JourneyRecord = core.store.journey("acme").unwrap().unwrap();
        assert_eq!(rec.status(), "cancelled");
        // A second pass finds nothing more to do.
        let p = core
            .housekeeping(Utc::now() + ChronoDuration::seconds(1))
            .unwrap();
        assert_eq!(p, Pruned::default());
    }
}
