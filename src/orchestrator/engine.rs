//! The runtime around the heart: one inbound message (or timer, or returned publish) in,
//! one atomic [`Change`] with its outbox out.
//!
//! It decodes and authenticates (the wire floor), deduplicates commands, reads the
//! journey's record, asks [`step`] what to do, and turns the step's effects into store
//! writes, counters and signed messages. The decisions themselves are all in
//! `domain::step`; nothing here chooses what happens to a journey.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, info_span, warn};
use uuid::Uuid;

use super::{OrchestratorError, Stats};
use crate::broker::Names;
use crate::domain::playbook::Playbook;
use crate::domain::record::{JourneyRecord, Snapshot, status_card};
use crate::domain::step::{
    self, Ctx, DeadLetter, Effect, Input, Message, Origin, Playbooks, Sender, Tally,
};
use crate::domain::work::UnitOfWork;
use crate::store::{Change, OutboxEntry, Purpose, Store};
use crate::wire::headers;
use crate::wire::outgoing::Outgoing;
use crate::wire::protocol::{AgentRef, Decoder, Envelope, MessageType, ProtocolError};
use crate::wire::trace::{self, TraceParent};

pub use crate::domain::step::{Policy, Replay};

/// Bytes of an oversize message kept in its dead letter (enough to see what it was).
const OVERSIZE_KEPT_BYTES: usize = 4096;
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
    /// The `x-journeyman-client-id` header, which the broker routed the command by.
    pub client_header: Option<String>,
}

impl Inbound<'_> {
    fn origin(&self) -> Origin {
        Origin {
            exchange: self.exchange.to_string(),
            routing_key: self.routing_key.to_string(),
            queue: self.queue.to_string(),
        }
    }
}

/// What a dedup mark remembers: when, and a digest of the body, so a different message
/// reusing an id is caught as a conflict instead of silently dropped as a duplicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Seen {
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

/// The orchestrator's state between inputs: the store, the timers, the playbooks.
pub struct Core {
    pub(super) store: Store,
    names: Names,
    /// This replica's partitions: set for each broker session.
    routing: super::routing::Routing,
    decoder: Decoder,
    current_playbook: String,
    /// The playbook new journeys start on, at hand for every step.
    current: Arc<Playbook>,
    playbooks: HashMap<String, Arc<Playbook>>,
    /// (due, client): wake-ups for task deadlines and retries. Duplicates are harmless:
    /// firing re-reads the journey and only acts on what is due.
    timers: BTreeSet<(DateTime<Utc>, String)>,
    pub(super) stats: Arc<Stats>,
    policy: Policy,
    /// Wakes the webhook delivery task once queued cards are durable.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// Checks inputs and signs outputs; `None` when authentication is off.
    auth: Option<(crate::wire::auth::Guard, crate::wire::auth::Signer)>,
    /// Some journey's status card may be due (see [`Core::publish_cards`]).
    cards_due: bool,
    /// Journeys whose work is running, for admission of new ones.
    active: HashSet<String>,
    /// The records of the journeys whose work runs, as last committed (the store is
    /// written through): the hot path reads them without decoding. Only running journeys,
    /// so it is bounded by admission, not by how many journeys the store holds.
    cache: HashMap<String, JourneyRecord>,
    admission: Arc<super::admission::Admission>,
    /// A journey was running when the store was opened that an older version dispatched
    /// (no partition recorded): its replies come to the old per-orchestrator queue.
    legacy_work: bool,
}

impl Core {
    pub fn new(
        store: Store,
        names: Names,
        routing: super::routing::Routing,
        decoder: Decoder,
        playbook: &Playbook,
        stats: Arc<Stats>,
        policy: Policy,
    ) -> Result<Self, OrchestratorError> {
        let hash = playbook.content_hash();
        let mut change = Change::new();
        change.put_playbook(&hash, playbook);
        store.commit(change)?;
        let current = Arc::new(playbook.clone());
        let mut playbooks = HashMap::new();
        playbooks.insert(hash.clone(), current.clone());
        let mut core = Self {
            store,
            names,
            routing,
            decoder,
            current_playbook: hash,
            current,
            playbooks,
            timers: BTreeSet::new(),
            stats,
            policy,
            wake: None,
            auth: None,
            // Marks left by an earlier process are picked up by the first round.
            cards_due: true,
            active: HashSet::new(),
            cache: HashMap::new(),
            admission: Arc::new(super::admission::Admission::new(0)),
            legacy_work: false,
        };
        core.load_timers()?;
        Ok(core)
    }

    /// Every change goes through here: the `before_commit` crash point.
    fn commit(&self, change: Change) -> Result<Vec<OutboxEntry>, crate::store::StoreError> {
        super::failpoint::hit("before_commit");
        self.store.commit(change)
    }

    /// The partitions of this session (the topology's count is known once connected).
    pub fn set_routing(&mut self, routing: super::routing::Routing) {
        self.routing = routing;
    }

    /// Whether replies may still come to the reply queue of before partitions.
    pub fn has_legacy_work(&self) -> bool {
        self.legacy_work
    }

    pub fn routing(&self) -> &super::routing::Routing {
        &self.routing
    }

    pub fn set_auth(
        &mut self,
        auth: Option<(crate::wire::auth::Guard, crate::wire::auth::Signer)>,
    ) {
        self.auth = auth;
    }

    /// Puts the orchestrator's token on what it sends, when authentication is on.
    fn sign(&self, env: Envelope, now: DateTime<Utc>) -> Envelope {
        match &self.auth {
            Some((_, signer)) => signer.sign(env, now),
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

    /// The playbook a journey is pinned to, when it is not the current one.
    fn pinned(
        &mut self,
        rec: Option<&JourneyRecord>,
    ) -> Result<Option<Arc<Playbook>>, OrchestratorError> {
        match rec {
            Some(r) if r.playbook != self.current_playbook => Ok(Some(self.playbook(&r.playbook)?)),
            _ => Ok(None),
        }
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
        let now = super::now();
        let records: Vec<JourneyRecord> = self
            .store
            .journeys::<JourneyRecord>()
            .collect::<Result<_, _>>()?;
        for rec in records {
            if rec.is_active() {
                self.active.insert(rec.journey.client_id.clone());
                if rec.partition.is_none() && rec.work.is_some() {
                    self.legacy_work = true;
                }
            }
            // Deadlines, retries and time-based gate criteria: armed again from the store,
            // which is what makes them survive a restart.
            let playbook = self.playbook(&rec.playbook)?;
            for at in step::wakeups(&rec, &playbook, &self.policy, now) {
                timers.insert((at, rec.journey.client_id.clone()));
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

    /// Everything the outbox holds, ready to publish: task requests it names by reference
    /// are rebuilt from their journey's record (with the message id they had). A reference
    /// whose attempt is no longer in flight (answered, timed out, cancelled) is cleared.
    pub fn outbox(&mut self) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = Utc::now();
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for e in self.store.outbox()? {
            if !e.is_reference() {
                out.push(e);
                continue;
            }
            let Purpose::TaskRequest {
                client_id,
                correlation_id,
            } = &e.purpose
            else {
                continue;
            };
            let rec: Option<JourneyRecord> = self.store.journey(client_id)?;
            let msg = match &rec {
                Some(rec) => {
                    let pinned = self.pinned(Some(rec))?;
                    let playbooks = Playbooks {
                        current: &self.current,
                        current_hash: &self.current_playbook,
                        pinned: pinned.as_deref(),
                    };
                    step::in_flight(rec, playbooks).into_iter().find(|m| {
                        matches!(m, Message::Task { correlation_id: c, .. } if c == correlation_id)
                    })
                }
                None => None,
            };
            match msg {
                Some(msg) => {
                    let partition = rec.as_ref().and_then(|r| r.partition);
                    let mut rebuilt = self.encode(msg, now, None, partition);
                    rebuilt.id = e.id;
                    out.push(rebuilt);
                }
                None => stale.push(e.id),
            }
        }
        self.store.clear_outbox(&stale)?;
        Ok(out)
    }

    /// A journey's record, from the cache when its work runs (taken out: the step's
    /// outcome puts it back), else from the store.
    fn journey(&mut self, client_id: &str) -> Result<Option<JourneyRecord>, OrchestratorError> {
        match self.cache.remove(client_id) {
            Some(rec) => Ok(Some(rec)),
            None => Ok(self.store.journey(client_id)?),
        }
    }

    /// A context for one step: the clock read once, ids and jitter from the OS generator.
    fn ctx(now: DateTime<Utc>) -> Ctx {
        Ctx::new(now, rand::random::<u64>(), rand::random::<f64>())
    }

    /// Handles one delivery: decode, dedup, apply. Returns what to publish once durable.
    pub fn handle(&mut self, m: &Inbound) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        Stats::inc(&self.stats.inputs);
        let now = super::now();
        let env = match self.decoder.envelope(m.data) {
            Ok(env) => env,
            Err(e) => return self.refuse_input(m, None, &e, now),
        };
        let parent = m.traceparent.as_deref().and_then(TraceParent::parse);
        let span = info_span!("message", intent = %env.intent, message_id = %env.message_id,
            correlation_id = env.correlation_id.as_deref().unwrap_or(""),
            trace_id = tracing::field::Empty);
        // The exported span continues the sender's; a journey started without a trace
        // takes this span's (when exported), so its trace begins here.
        let trace_id = match parent {
            Some(p) => {
                crate::telemetry::set_remote_parent(&span, &p);
                Some(p.trace_id)
            }
            None => crate::telemetry::trace_id_of(&span),
        };
        span.record("trace_id", trace_id.as_deref().unwrap_or(""));
        let _g = span.enter();
        // Authentication comes after the schema: a well-formed message from the wrong
        // sender is `unauthenticated` (or `forbidden`), not `schema_invalid`.
        match m.source {
            Source::Command => {
                let cmd = match self.decoder.command(&env) {
                    Ok(cmd) => cmd,
                    Err(e) => return self.refuse_input(m, Some(&env), &e, now),
                };
                if let Some(Err(e)) = self.auth.as_ref().map(|(g, _)| g.command(&env, now)) {
                    return self.refuse_input(m, Some(&env), &e, now);
                }
                if let Some(e) = self.misrouted(m, cmd.client_id()) {
                    return self.refuse_input(m, Some(&env), &e, now);
                }
                let mid = env.message_id.to_string();
                let mut change = Change::new();
                // Status queries change nothing and are answered again if redelivered.
                if env.intent != "journey.status" {
                    if let Some(seen) = self.store.dedup::<Seen>(&mid)? {
                        if seen.digest.is_some() && seen.digest != Seen::of(m.data, now).digest {
                            return self.conflict(m, &env, now);
                        }
                        Stats::inc(&self.stats.duplicates);
                        debug!("duplicate message; already applied");
                        return Ok(Vec::new());
                    }
                    change.put_dedup(&mid, &Seen::of(m.data, now));
                }
                let rec = self.journey(cmd.client_id())?;
                let correlation = env.reply_correlation();
                let from = Sender {
                    message_id: &mid,
                    agent_id: &env.source_agent.agent_id,
                    application: &env.source_agent.domain,
                    reply_to: m.reply_to.as_deref(),
                    correlation: &correlation,
                    trace_id: trace_id.as_deref(),
                };
                let input = Input::Command {
                    cmd,
                    from,
                    payload: &env.payload,
                    replay: m.replay.as_ref(),
                };
                self.run_step(change, rec, input, now, Some(m))
            }
            Source::Reply => {
                let outcome = match self.decoder.task_reply(&env) {
                    Ok(o) => o,
                    Err(e) => return self.refuse_input(m, Some(&env), &e, now),
                };
                if let Some(Err(e)) = self.auth.as_ref().map(|(g, _)| g.reply(&env, now)) {
                    return self.refuse_input(m, Some(&env), &e, now);
                }
                // No dedup mark: a redelivered reply finds its attempt already resolved,
                // and the step ignores it.
                let corr = env.correlation_id.clone().unwrap_or_default();
                let client = match step::client_of_correlation(&corr) {
                    Some(client) => Some(client.to_string()),
                    // Dispatched by an earlier version, which kept a lookup entry.
                    None => self.store.inflight(&corr)?,
                };
                let rec = match &client {
                    Some(c) => self.journey(c)?,
                    None => None,
                };
                if rec.is_none() {
                    warn!(correlation_id = %corr, "reply with an unknown correlation id; ignored");
                }
                let mid = env.message_id.to_string();
                let input = Input::Reply {
                    correlation_id: &corr,
                    outcome,
                    message_id: &mid,
                };
                self.run_step(Change::new(), rec, input, now, Some(m))
            }
        }
    }

    /// A command the broker could not have routed by its client: no client id header
    /// (it landed on an arbitrary partition) or one naming another client (it landed on
    /// that client's). Applying it here could split a journey across replicas.
    fn misrouted(&self, m: &Inbound, client_id: &str) -> Option<ProtocolError> {
        match m.client_header.as_deref() {
            Some(h) if h == client_id => None,
            None if !self.routing.requires_client_header() => None,
            header => Some(ProtocolError::ClientHeader {
                client_id: client_id.to_string(),
                header: header.map(str::to_string),
            }),
        }
    }

    /// Resolves the journey's playbook, takes the step, and writes what it decided.
    fn run_step(
        &mut self,
        mut change: Change,
        rec: Option<JourneyRecord>,
        input: Input<'_>,
        now: DateTime<Utc>,
        inbound: Option<&Inbound<'_>>,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let pinned = self.pinned(rec.as_ref())?;
        let current = self.current.clone();
        let playbooks = Playbooks {
            current: &current,
            current_hash: &self.current_playbook,
            pinned: pinned.as_deref(),
        };
        let mut ctx = Self::ctx(now);
        let client_id = match (&input, &rec) {
            (_, Some(r)) => Some(r.journey.client_id.clone()),
            (Input::Command { cmd, .. }, None) => Some(cmd.client_id().to_string()),
            _ => None,
        };
        // The partition the broker delivered this on; else the one the journey recorded.
        let partition = inbound
            .and_then(|m| self.routing.partition_of_queue(m.queue))
            .or_else(|| rec.as_ref().and_then(|r| r.partition));
        let mut out = step::step(rec.as_ref(), input, playbooks, &self.policy, &mut ctx);
        if let (Some(r), Some(p)) = (out.record.as_mut(), partition) {
            r.partition = Some(p);
        }
        // Unchanged, a running journey's record goes back to the cache as it was.
        if out.record.is_none()
            && let Some(rec) = rec
            && rec.is_active()
        {
            self.cache.insert(rec.journey.client_id.clone(), rec);
        }
        self.apply(
            &mut change,
            client_id.as_deref(),
            out,
            now,
            inbound,
            partition,
        )?;
        Ok(self.commit(change)?)
    }

    /// Turns a step's decisions into writes, counters, timers and signed messages.
    fn apply(
        &mut self,
        change: &mut Change,
        client_id: Option<&str>,
        out: step::Step,
        now: DateTime<Utc>,
        inbound: Option<&Inbound<'_>>,
        partition: Option<u16>,
    ) -> Result<(), OrchestratorError> {
        for e in out.effects {
            match e {
                Effect::Publish(msg) => {
                    let entry = self.encode(msg, now, inbound, partition);
                    change.push_outbox(entry);
                }
                Effect::History {
                    kind,
                    detail,
                    cause,
                } => {
                    if let Some(client) = client_id {
                        let seq = self.store.next_id()?;
                        change.push_history(
                            client,
                            seq,
                            &crate::domain::record::HistoryEntry {
                                at: now,
                                kind,
                                detail,
                                cause,
                            },
                        );
                    }
                }
                Effect::Snapshot(snap) => {
                    let seq = self.store.next_id()?;
                    change.put_snapshot(&snap.record.journey.client_id, seq, &snap);
                }
                Effect::Arm(at) => {
                    if let Some(client) = client_id {
                        self.timers.insert((at, client.to_string()));
                    }
                }
                Effect::Count(t) => self.count(t),
            }
        }
        if let Some(rec) = out.record {
            self.save(change, rec, now)?;
        }
        Ok(())
    }

    fn count(&self, t: Tally) {
        let s = &self.stats;
        match t {
            Tally::JourneyStarted => Stats::inc(&s.journeys_started),
            Tally::Refusal => Stats::inc(&s.refusals),
            Tally::DeadLetter { reason } => {
                Stats::inc(&s.dead_letters);
                s.metrics.dead_letter(&reason);
            }
            Tally::GatePassed => Stats::inc(&s.gate_passed),
            Tally::GateFailed => Stats::inc(&s.gate_failed),
            Tally::Promotion => Stats::inc(&s.promotions),
            Tally::RollbackStarted { reason, automatic } => {
                Stats::inc(&s.rollbacks_started);
                if automatic {
                    Stats::inc(&s.rollbacks_automatic);
                }
                s.metrics.rollback_started(&reason, automatic);
            }
            Tally::RollbackCompleted => Stats::inc(&s.rollbacks_completed),
            Tally::RollbackFailed => Stats::inc(&s.rollbacks_failed),
            Tally::Pause => Stats::inc(&s.pauses),
            Tally::Resume => Stats::inc(&s.resumes),
            Tally::TaskDispatched { intent, retry } => {
                Stats::inc(&s.tasks_dispatched);
                s.metrics.task_dispatched(&intent);
                if retry {
                    Stats::inc(&s.retries);
                    s.metrics.task_retried(&intent);
                }
            }
            Tally::TaskCompleted { intent } => {
                Stats::inc(&s.tasks_completed);
                s.metrics.task_completed(&intent);
            }
            Tally::TaskFailed { intent } => s.metrics.task_failed(&intent),
            Tally::StaleReply => Stats::inc(&s.stale_replies),
            Tally::RoundTrip { intent, micros } => s
                .metrics
                .observe_round_trip(&intent, std::time::Duration::from_micros(micros)),
        }
    }

    /// A message as the wire carries it: an envelope, signed, with its AMQP properties.
    fn encode(
        &self,
        msg: Message,
        now: DateTime<Utc>,
        inbound: Option<&Inbound<'_>>,
        partition: Option<u16>,
    ) -> OutboxEntry {
        let traceparent = |t: Option<&str>| match t {
            Some(t) => crate::telemetry::next_hop(t),
            None => TraceParent::new_root(),
        };
        match msg {
            Message::Task {
                message_id,
                client_id,
                task_id,
                intent,
                agent,
                correlation_id,
                attempt,
                input,
                trace_id,
            } => {
                let mut env = Envelope::new(
                    AgentRef::orchestrator(),
                    AgentRef::new(agent, "journeyman"),
                    MessageType::Request,
                    intent.clone(),
                    input,
                    now,
                )
                .with_correlation(correlation_id.clone());
                env.message_id = message_id;
                let env = self.sign(env, now);
                let purpose = Purpose::TaskRequest {
                    client_id: client_id.clone(),
                    correlation_id: correlation_id.clone(),
                };
                OutboxEntry::new(
                    purpose,
                    Outgoing {
                        exchange: self.names.intents(),
                        routing_key: intent,
                        mandatory: true,
                        message_id: message_id.to_string(),
                        correlation_id: Some(correlation_id.clone()),
                        reply_to: Some(self.routing.reply_queue(partition)),
                        message_type: "request".into(),
                        headers: vec![
                            (headers::CLIENT_ID.to_string(), client_id.clone()),
                            (headers::TASK_ID.to_string(), task_id),
                            (headers::ATTEMPT.to_string(), attempt.to_string()),
                            (
                                trace::HEADER.into(),
                                traceparent(trace_id.as_deref()).header(),
                            ),
                        ],
                        body: env.to_bytes(),
                    },
                )
            }
            Message::Event {
                message_id,
                name,
                payload,
                trace_id,
            } => {
                let mut env = Envelope::new(
                    AgentRef::orchestrator(),
                    AgentRef::new("*", "journeyman"),
                    MessageType::Event,
                    name.clone(),
                    payload,
                    now,
                );
                env.message_id = message_id;
                let env = self.sign(env, now);
                OutboxEntry::new(
                    Purpose::Event,
                    Outgoing {
                        exchange: self.names.events(),
                        routing_key: name,
                        mandatory: false,
                        message_id: message_id.to_string(),
                        correlation_id: None,
                        reply_to: None,
                        message_type: "event".into(),
                        headers: vec![(
                            trace::HEADER.into(),
                            traceparent(trace_id.as_deref()).header(),
                        )],
                        body: env.to_bytes(),
                    },
                )
            }
            Message::Reply {
                message_id,
                to,
                intent,
                target,
                correlation_id,
                error,
                payload,
            } => {
                let message_type = if error {
                    MessageType::Error
                } else {
                    MessageType::Response
                };
                let mut env = Envelope::new(
                    AgentRef::orchestrator(),
                    AgentRef::new(target.0, target.1),
                    message_type,
                    intent,
                    payload,
                    now,
                )
                .with_correlation(correlation_id);
                env.message_id = message_id;
                let env = self.sign(env, now);
                OutboxEntry::new(
                    Purpose::Reply,
                    Outgoing {
                        exchange: String::new(),
                        routing_key: to,
                        mandatory: false,
                        message_id: message_id.to_string(),
                        correlation_id: env.correlation_id.clone(),
                        reply_to: None,
                        message_type: message_type.as_str().into(),
                        headers: Vec::new(),
                        body: env.to_bytes(),
                    },
                )
            }
            Message::DeadLetter(mut dl) => {
                // A refused command is kept as it came, with where it came from.
                if dl.body.is_empty()
                    && dl.origin == Origin::default()
                    && let Some(m) = inbound
                    && m.source == Source::Command
                {
                    dl.body = m.data.to_vec();
                    dl.origin = m.origin();
                    dl.routing_key = m.routing_key.to_string();
                    dl.correlation_id = m.correlation_id.clone();
                }
                self.dead_letter(dl)
            }
        }
    }

    fn dead_letter(&self, dl: DeadLetter) -> OutboxEntry {
        let failed_at = dl
            .failed_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // A replayed message continues its failure history.
        let first = dl.first_failed_at.unwrap_or_else(|| failed_at.clone());
        let mut h = vec![
            (headers::REASON.to_string(), dl.reason),
            (headers::REASON_MESSAGE.to_string(), dl.message),
            (headers::ORIGINAL_EXCHANGE.to_string(), dl.origin.exchange),
            (
                headers::ORIGINAL_ROUTING_KEY.to_string(),
                dl.origin.routing_key,
            ),
            (headers::ORIGINAL_QUEUE.to_string(), dl.origin.queue),
            (headers::FAILED_AT.to_string(), failed_at),
            (headers::FIRST_FAILED_AT.to_string(), first),
            (headers::ATTEMPTS.to_string(), dl.attempts.to_string()),
        ];
        if let Some(c) = dl.client_id {
            h.push((headers::CLIENT_ID.to_string(), c));
        }
        if let Some(t) = dl.task_id {
            h.push((headers::TASK_ID.to_string(), t));
        }
        OutboxEntry::new(
            Purpose::DeadLetter,
            Outgoing {
                exchange: self.names.dlx(),
                routing_key: dl.routing_key,
                mandatory: false,
                message_id: dl.message_id,
                correlation_id: dl.correlation_id,
                reply_to: None,
                message_type: "dead_letter".into(),
                headers: h,
                body: dl.body,
            },
        )
    }

    /// A message id already applied, with another body: never applied, kept for a person.
    fn conflict(
        &mut self,
        m: &Inbound,
        env: &Envelope,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        warn!(queue = m.queue, message_id = %env.message_id, "message id reused with a different body; dead-lettering it");
        Stats::inc(&self.stats.conflicts);
        self.count(Tally::DeadLetter {
            reason: "conflict".into(),
        });
        let mut change = Change::new();
        let dl = DeadLetter::of_input(
            "conflict",
            format!(
                "message id {} was already applied with a different body; not applied",
                env.message_id
            ),
            m.origin(),
            Uuid::new_v4().to_string(),
            m.correlation_id.clone(),
            m.data.to_vec(),
            now,
        )
        .continuing(m.replay.as_ref());
        let mut dl = dl;
        dl.client_id = env.payload["client_id"].as_str().map(str::to_string);
        change.push_outbox(self.dead_letter(dl));
        Ok(self.commit(change)?)
    }

    /// Refuses an input that failed decoding or authentication, and marks it seen. With a
    /// `reply_to` the sender is told why and what to do (an `error` reply; its auth token is
    /// never echoed) and that is the end of it; without one nobody can be told, so it is
    /// dead-lettered for the on-call engineer.
    fn refuse_input(
        &mut self,
        m: &Inbound,
        env: Option<&Envelope>,
        e: &ProtocolError,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let mut change = Change::new();
        let mid = env
            .map(|e| e.message_id.to_string())
            .or_else(|| m.message_id.clone());
        if let Some(mid) = &mid {
            if self.store.dedup::<Seen>(mid)?.is_some() {
                return Ok(Vec::new());
            }
            change.put_dedup(mid, &Seen::of(m.data, now));
        }
        // The journey it is about, when the message says: a command's client, or the
        // journey a reply's correlation id names.
        let client_id = env.and_then(|env| match m.source {
            Source::Command => env.payload["client_id"].as_str().map(str::to_string),
            Source::Reply => env
                .correlation_id
                .as_deref()
                .and_then(step::client_of_correlation)
                .map(str::to_string),
        });
        Stats::inc(&self.stats.refusals);
        match (m.source, m.reply_to.as_deref()) {
            (Source::Command, Some(to)) => {
                debug!(queue = m.queue, reason = e.reason_code(), error = %crate::wire::redact::redact_text(&e.to_string()), "refused message; answered");
                let correlation = env
                    .map(Envelope::reply_correlation)
                    .or_else(|| m.correlation_id.clone())
                    .or_else(|| mid.clone())
                    .unwrap_or_default();
                let target = env
                    .map(|e| {
                        (
                            e.source_agent.agent_id.clone(),
                            e.source_agent.domain.clone(),
                        )
                    })
                    .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
                let intent = env
                    .map(|e| e.intent.clone())
                    .unwrap_or_else(|| m.routing_key.to_string());
                let payload = serde_json::to_value(crate::domain::command::ErrorPayload {
                    code: e.reason_code().into(),
                    message: e.reply_message(),
                    retryable: false,
                    details: None,
                })
                .unwrap_or(Value::Null);
                let reply = Message::Reply {
                    message_id: Uuid::new_v4(),
                    to: to.to_string(),
                    intent,
                    target,
                    correlation_id: correlation,
                    error: true,
                    payload,
                };
                change.push_outbox(self.encode(reply, now, None, None));
            }
            _ => {
                warn!(queue = m.queue, reason = e.reason_code(), error = %crate::wire::redact::redact_text(&e.to_string()), "refused message; dead-lettering it");
                // An oversize body is kept as its first bytes only: whoever can publish
                // must not be able to fill sled (the outbox entry) or memory with what
                // the cap refused. The reason message keeps its full size.
                let body = match e {
                    ProtocolError::Oversize { .. } => {
                        m.data[..m.data.len().min(OVERSIZE_KEPT_BYTES)].to_vec()
                    }
                    _ => m.data.to_vec(),
                };
                let mut dl = DeadLetter::of_input(
                    e.reason_code(),
                    e.to_string(),
                    m.origin(),
                    mid.unwrap_or_else(|| Uuid::new_v4().to_string()),
                    m.correlation_id.clone(),
                    body,
                    now,
                )
                .continuing(m.replay.as_ref());
                dl.client_id = client_id;
                change.push_outbox(self.dead_letter(dl));
                self.count(Tally::DeadLetter {
                    reason: e.reason_code().to_string(),
                });
            }
        }
        Ok(self.commit(change)?)
    }

    /// A task request came back unroutable: no queue serves its intent (yet).
    pub fn handle_unroutable(
        &mut self,
        outbox_id: u64,
        client_id: &str,
        correlation_id: &str,
    ) -> Result<Vec<OutboxEntry>, OrchestratorError> {
        let now = super::now();
        let mut change = Change::new();
        change.remove_outbox(outbox_id);
        let rec = self.journey(client_id)?;
        let input = Input::Unroutable { correlation_id };
        self.run_step(change, rec, input, now, None)
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
            let Some(rec) = self.journey(&client_id)? else {
                continue;
            };
            out.extend(self.run_step(Change::new(), Some(rec), Input::Timers, now, None)?);
        }
        Ok(out)
    }

    /// Stores the journey and marks its status card due. Cards go to `<ns>.events` in
    /// rounds ([`Core::publish_cards`]), one per changed journey, so a burst of task
    /// replies costs one card, built off the per-message path. With a dashboard webhook,
    /// every card is also queued here, in order, for delivery.
    fn save(
        &mut self,
        change: &mut Change,
        rec: JourneyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), OrchestratorError> {
        let client = rec.journey.client_id.as_str();
        change.put_journey(client, &rec);
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
            change.push_card(card_id, &status_card(&rec, &recent, card_id, now));
        }
        if rec.is_active() {
            self.cache.insert(rec.journey.client_id.clone(), rec);
        }
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
        let now = super::now();
        for client in &due {
            change.clear_card_due(client);
            let Some(rec) = self.store.journey::<JourneyRecord>(client)? else {
                continue;
            };
            let recent = self.store.recent_history(client, RECENT_ACTIVITIES)?;
            let card_id = self.store.next_id()?;
            let card = status_card(&rec, &recent, card_id, now);
            let msg = Message::Event {
                message_id: Uuid::new_v4(),
                name: "dashboard.status_card".into(),
                payload: crate::domain::record::event_payload(
                    &rec,
                    "dashboard.status_card",
                    card,
                    now,
                ),
                trace_id: rec.trace_id.clone(),
            };
            change.push_outbox(self.encode(msg, now, None, None));
        }
        Ok(self.commit(change)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::record::HistoryEntry;
    use crate::wire::protocol::TaskResponse;
    use chrono::Duration as ChronoDuration;
    use serde_json::json;

    fn core(dir: &std::path::Path, policy: Policy) -> Core {
        let store = Store::open(dir).unwrap();
        let names = Names::new("unit");
        Core::new(
            store,
            names.clone(),
            super::super::routing::Routing::new(&names, 1, Default::default()),
            Decoder::new(crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES),
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
            client_header: None,
        }
    }

    /// Answers every task request in `out` with success; returns what that published.
    fn answer_all(core: &mut Core, out: Vec<OutboxEntry>) -> Vec<OutboxEntry> {
        let mut next = Vec::new();
        for e in out {
            if !matches!(e.purpose, Purpose::TaskRequest { .. }) {
                continue;
            }
            let req: Envelope = serde_json::from_slice(&e.message.body).unwrap();
            let mut reply = Envelope::new(
                AgentRef::new("sim", "journeyman"),
                req.source_agent.clone(),
                MessageType::Response,
                req.intent.clone(),
                {
                    let out = crate::agent::sim::simulated_output(&req.intent, "acme", &json!({}));
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
        // One mark for the start command; replies are deduplicated by their attempt's
        // state, with no mark of their own.
        assert_eq!(before.dedup_marks.0, 1, "{before:?}");

        // Still running (awaiting its gate): its correlations are kept, dedup marks go.
        let now = Utc::now() + ChronoDuration::seconds(1);
        let p = core.housekeeping(now).unwrap();
        assert_eq!((p.dedup_marks, p.correlations, p.compacted), (1, 0, 0));

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
