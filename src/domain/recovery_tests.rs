//! The heart under faults, as property tests: duplicates change nothing, and a crash after
//! any prefix, followed by recovery from what was persisted and redelivery of what was not
//! acked, ends where the run without faults ends.
//!
//! The model of the runtime around [`step`] (what `orchestrator/engine.rs` does):
//! - a step's record and effects are persisted together, or not at all (one sled batch);
//! - a journey command is applied once per message id (the runtime's dedup mark is in the
//!   same batch); task replies and timer firings go to `step` every time they arrive;
//! - each input carries the time it is handled at and the seed of its fresh ids; a
//!   redelivered input is handled as it was the first time (same time, same seed). That is
//!   what makes "ends where the clean run ends" an equality and not an equivalence.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::command::{
    ClientPayload, Command, ErrorPayload, EvidencePayload, StartPayload, TaskOutcome,
};
use super::playbook::Playbook;
use super::record::JourneyRecord;
use super::step::{Ctx, Effect, Input, Message, Playbooks, Policy, Sender, step};
use super::work::TaskStatus;

/// Two stages: a chain of three sandbox tasks behind a flag, one pilot task, retries with
/// short backoff and deadlines, so timers, retries and promotion all happen in a short run.
const PLAYBOOK: &str = r#"
name: recovery
stages:
  sandbox:
    tasks:
      - { task_id: a, name: A, intent: do_a, max_retries: 2, timeout: 20s,
          backoff: { initial: 1s, max: 4s, multiplier: 2.0, jitter: 0.5 } }
      - { task_id: b, name: B, intent: do_b, depends_on: [a], max_retries: 2, timeout: 20s,
          backoff: { initial: 1s, max: 4s, multiplier: 2.0, jitter: 0.5 } }
      - { task_id: c, name: C, intent: do_c, depends_on: [a], max_retries: 1, timeout: 20s,
          backoff: { initial: 1s, max: 4s, multiplier: 2.0, jitter: 0.5 } }
    exit_criteria:
      - { name: approved, flag: demo.approved }
  pilot:
    tasks:
      - { task_id: p, name: P, intent: do_p, max_retries: 1, timeout: 20s,
          backoff: { initial: 1s, max: 4s, multiplier: 2.0, jitter: 0.5 } }
"#;

/// What a test script asks for; turned into a concrete input from the state it meets.
#[derive(Debug, Clone)]
enum Act {
    Start,
    /// Answer the n-th outstanding task attempt with success.
    Ok(u8),
    /// Answer it with an error, retryable or not.
    Err(u8, bool),
    Evidence(bool),
    Resume,
    /// Let this many seconds pass, then fire the timers.
    Tick(u8),
    /// Deliver an earlier input again.
    Dup(u8),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        1 => Just(Act::Start),
        6 => any::<u8>().prop_map(Act::Ok),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(n, r)| Act::Err(n, r)),
        2 => any::<bool>().prop_map(Act::Evidence),
        1 => Just(Act::Resume),
        2 => (0u8..40).prop_map(Act::Tick),
        3 => any::<u8>().prop_map(Act::Dup),
    ]
}

/// An input as it reaches the heart, with the time and seed it is handled with.
#[derive(Debug, Clone)]
struct Delivery {
    kind: Kind,
    at: DateTime<Utc>,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Kind {
    Command {
        cmd: Command,
        message_id: String,
    },
    Reply {
        correlation_id: String,
        outcome: TaskOutcome,
        message_id: String,
    },
    Timers,
}

/// The journey as the store holds it: its record and the command ids already applied.
#[derive(Debug, Clone, Default, PartialEq)]
struct Persisted {
    rec: Option<JourneyRecord>,
    applied: BTreeSet<String>,
}

struct World {
    playbook: Playbook,
    hash: String,
    policy: Policy,
}

impl World {
    fn new() -> Self {
        let playbook = Playbook::from_yaml(PLAYBOOK).unwrap();
        let hash = playbook.content_hash();
        Self {
            playbook,
            hash,
            policy: Policy::default(),
        }
    }

    /// Handles one delivery as the runtime does; returns the messages it would publish.
    fn deliver(&self, state: &mut Persisted, d: &Delivery) -> Vec<Message> {
        let payload = Value::Null;
        let input = match &d.kind {
            Kind::Command { cmd, message_id } => {
                if !state.applied.insert(message_id.clone()) {
                    return Vec::new();
                }
                Input::Command {
                    cmd: cmd.clone(),
                    from: Sender {
                        message_id,
                        agent_id: "upstream",
                        application: "tests",
                        reply_to: None,
                        correlation: message_id,
                        trace_id: Some("0af7651916cd43dd8448eb211c80319c"),
                    },
                    payload: &payload,
                    replay: None,
                }
            }
            Kind::Reply {
                correlation_id,
                outcome,
                message_id,
            } => Input::Reply {
                correlation_id,
                outcome: outcome.clone(),
                message_id,
            },
            Kind::Timers => Input::Timers,
        };
        let playbooks = Playbooks {
            current: &self.playbook,
            current_hash: &self.hash,
            pinned: None,
        };
        let mut ctx = Ctx::new(d.at, d.seed, (d.seed % 97) as f64 / 97.0);
        let out = step(state.rec.as_ref(), input, playbooks, &self.policy, &mut ctx);
        if let Some(rec) = out.record {
            state.rec = Some(rec);
        }
        out.effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Publish(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Turns a script into deliveries, each made from the state the clean run has reached
    /// (a reply answers an attempt that is outstanding then).
    fn script(&self, acts: &[Act]) -> Vec<Delivery> {
        let mut state = Persisted::default();
        let mut now = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap();
        let mut out: Vec<Delivery> = Vec::new();
        let client = || "acme".to_string();
        for (i, a) in acts.iter().enumerate() {
            now += Duration::milliseconds(10);
            let seed = i as u64 + 1;
            let id = |what: &str| format!("{what}-{i}");
            let outstanding: Vec<String> = state
                .rec
                .as_ref()
                .and_then(|r| r.work.as_ref())
                .map(|w| {
                    w.tasks
                        .iter()
                        .filter(|t| t.status == TaskStatus::Dispatched)
                        .filter_map(|t| t.correlation_id.clone())
                        .collect()
                })
                .unwrap_or_default();
            let kind = match a {
                Act::Start => Kind::Command {
                    cmd: Command::Start(StartPayload {
                        client_id: client(),
                        context: None,
                    }),
                    message_id: id("start"),
                },
                Act::Ok(n) | Act::Err(n, _) if !outstanding.is_empty() => {
                    let correlation_id = outstanding[*n as usize % outstanding.len()].clone();
                    let outcome = match a {
                        Act::Err(_, retryable) => TaskOutcome::Failed(ErrorPayload {
                            code: "boom".into(),
                            message: "the agent failed".into(),
                            retryable: *retryable,
                            details: None,
                        }),
                        _ => {
                            let mut m = Map::new();
                            m.insert("done".into(), json!(true));
                            TaskOutcome::Completed(m)
                        }
                    };
                    Kind::Reply {
                        correlation_id,
                        outcome,
                        message_id: id("reply"),
                    }
                }
                Act::Ok(_) | Act::Err(..) => Kind::Timers,
                Act::Evidence(approved) => Kind::Command {
                    cmd: Command::Evidence(EvidencePayload {
                        client_id: client(),
                        metrics: Default::default(),
                        flags: [("demo.approved".to_string(), *approved)].into(),
                        events: Vec::new(),
                    }),
                    message_id: id("evidence"),
                },
                Act::Resume => Kind::Command {
                    cmd: Command::Resume(ClientPayload {
                        client_id: client(),
                    }),
                    message_id: id("resume"),
                },
                Act::Tick(s) => {
                    now += Duration::seconds(i64::from(*s));
                    Kind::Timers
                }
                Act::Dup(j) if !out.is_empty() => {
                    // A broker redelivery: the same message, later.
                    let earlier = out[*j as usize % out.len()].clone();
                    Kind::clone(&earlier.kind)
                }
                Act::Dup(_) => Kind::Timers,
            };
            let d = Delivery {
                kind,
                at: now,
                seed,
            };
            self.deliver(&mut state, &d);
            out.push(d);
        }
        out
    }

    /// The clean run: the state after each delivery, and everything published.
    fn run(&self, deliveries: &[Delivery]) -> (Vec<Persisted>, Vec<Message>) {
        let mut state = Persisted::default();
        let mut states = vec![state.clone()];
        let mut published = Vec::new();
        for d in deliveries {
            published.extend(self.deliver(&mut state, d));
            states.push(state.clone());
        }
        (states, published)
    }
}

/// Messages as a set: published at least once is what the outbox promises.
fn set(ms: &[Message]) -> Vec<String> {
    let mut v: Vec<String> = ms.iter().map(|m| format!("{m:?}")).collect();
    v.sort();
    v.dedup();
    v
}

fn is_duplicate(d: &Delivery, earlier: &[Delivery]) -> bool {
    let key = |d: &Delivery| match &d.kind {
        Kind::Command { message_id, .. } | Kind::Reply { message_id, .. } => {
            Some(message_id.clone())
        }
        Kind::Timers => None,
    };
    key(d).is_some_and(|k| earlier.iter().any(|e| key(e).as_ref() == Some(&k)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Redelivered commands and replies change nothing: the run ends with the same record
    /// and publishes the same messages as the run without them.
    #[test]
    fn duplicates_change_nothing(acts in proptest::collection::vec(act(), 1..60)) {
        let w = World::new();
        let with = w.script(&acts);
        let without: Vec<Delivery> = with
            .iter()
            .enumerate()
            .filter(|(i, d)| !is_duplicate(d, &with[..*i]))
            .map(|(_, d)| d.clone())
            .collect();
        let (a, pa) = w.run(&with);
        let (b, pb) = w.run(&without);
        prop_assert_eq!(&a.last().unwrap().rec, &b.last().unwrap().rec);
        prop_assert_eq!(set(&pa), set(&pb));
    }

    /// A crash after `prefix` deliveries were persisted loses what came after; the broker
    /// redelivers everything not acked (from `prefix - unacked` on), and recovery ends where
    /// the clean run ends, having published the same set of messages.
    #[test]
    fn a_crash_after_any_prefix_then_redelivery_ends_where_the_clean_run_ends(
        acts in proptest::collection::vec(act(), 1..60),
        crash in any::<prop::sample::Index>(),
        unacked in 0usize..8,
    ) {
        let w = World::new();
        let deliveries = w.script(&acts);
        let (states, published) = w.run(&deliveries);
        let prefix = crash.index(deliveries.len() + 1);
        let mut state = states[prefix].clone();
        let mut seen = published_by(&w, &deliveries[..prefix]);
        for d in &deliveries[prefix.saturating_sub(unacked)..] {
            seen.extend(w.deliver(&mut state, d));
        }
        prop_assert_eq!(&state, states.last().unwrap());
        prop_assert_eq!(set(&seen), set(&published));
    }
}

/// What the first `n` deliveries of a clean run published (persisted with their steps).
fn published_by(w: &World, deliveries: &[Delivery]) -> Vec<Message> {
    w.run(deliveries).1
}

#[test]
fn the_scripts_reach_every_kind_of_state() {
    // A fixed script through start, retries, promotion and the pilot's work: the property
    // tests above start from the same machinery, so this keeps them from being vacuous.
    let w = World::new();
    let acts = [
        Act::Start,
        Act::Err(0, true),
        Act::Tick(5),
        Act::Ok(0),
        Act::Dup(3),
        Act::Ok(0),
        Act::Ok(0),
        Act::Evidence(true),
        Act::Dup(7),
        Act::Ok(0),
    ];
    let deliveries = w.script(&acts);
    let (states, published) = w.run(&deliveries);
    let rec = states.last().unwrap().rec.as_ref().unwrap();
    // The pilot has no exit criteria and production no tasks: promoted twice.
    assert_eq!(
        rec.journey.stage.as_str(),
        "production",
        "{:?}",
        rec.journey
    );
    assert_eq!(rec.status(), "live");
    let tasks = published
        .iter()
        .filter(|m| matches!(m, Message::Task { .. }))
        .count();
    // a twice (one retry), b, c, then p.
    assert_eq!(tasks, 5, "{published:#?}");
}
