//! Journeys as DES-002 means them (issue 14), driven through [`step`] alone: saga
//! compensation across stages, no bounce after a manual rollback, timers for time-based
//! criteria, generations, rollback work reported like stage work, `gate.failed` once per
//! change, and which refusals are dead letters.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::command::{
    CancelPayload, ClientPayload, Command, EvidenceEvent, EvidencePayload, RollbackPayload,
    StartPayload, TaskOutcome,
};
use super::journey::Stage;
use super::playbook::Playbook;
use super::record::JourneyRecord;
use super::step::{Ctx, Effect, Input, Message, Playbooks, Policy, Sender, Step, step, wakeups};

/// Three stages, one task each, each undone by one rollback task. Gates read evidence only
/// upstream reports, so a test decides exactly when each gate can pass.
const PLAYBOOK: &str = r#"
name: semantics
stages:
  sandbox:
    tasks:
      - { task_id: setup, name: Setup, intent: setup_sandbox }
    exit_criteria:
      - { name: demo_approved, flag: demo.approved }
    rollback:
      tasks:
        - { task_id: teardown, name: Teardown, intent: teardown_sandbox }
  pilot:
    tasks:
      - { task_id: deploy, name: Deploy, intent: deploy_pilot }
    exit_criteria:
      - { name: satisfaction, metric: user.satisfaction, op: ">", value: 4.0 }
    rollback_triggers:
      - { name: low_satisfaction, metric: user.satisfaction, op: "<", value: 3.5 }
    rollback:
      tasks:
        - { task_id: revoke, name: Revoke, intent: revoke_pilot_access }
  production:
    tasks:
      - { task_id: rollout, name: Rollout, intent: rollout_users }
    exit_criteria:
      - { name: adoption, metric: users.adoption, op: ">", value: 0.7 }
    rollback:
      tasks:
        - { task_id: unroll, name: Unroll, intent: rollback_production_deployment }
"#;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
}

/// One journey, its playbook and a clock the test moves.
struct Harness {
    playbook: Playbook,
    hash: String,
    policy: Policy,
    rec: Option<JourneyRecord>,
    now: DateTime<Utc>,
    seed: u64,
    /// Every step taken, in order.
    steps: Vec<Step>,
}

impl Harness {
    fn new(yaml: &str) -> Self {
        let playbook = Playbook::from_yaml(yaml).unwrap();
        let hash = playbook.content_hash();
        Self {
            playbook,
            hash,
            policy: Policy::default(),
            rec: None,
            now: t0(),
            seed: 0,
            steps: Vec::new(),
        }
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
    }

    fn run(&mut self, input: Input<'_>) -> Step {
        self.seed += 1;
        let mut ctx = Ctx::new(self.now, self.seed, 0.5);
        let playbooks = Playbooks {
            current: &self.playbook,
            current_hash: &self.hash,
            pinned: None,
        };
        let out = step(self.rec.as_ref(), input, playbooks, &self.policy, &mut ctx);
        if let Some(r) = &out.record {
            self.rec = Some(r.clone());
        }
        self.steps.push(out.clone());
        out
    }

    fn command(&mut self, cmd: Command, reply_to: Option<&str>) -> Step {
        let mid = format!("m{}", self.seed + 1);
        let payload = cmd.payload();
        let from = Sender {
            message_id: &mid,
            agent_id: "upstream",
            application: "test",
            reply_to,
            correlation: &mid,
            trace_id: None,
        };
        self.run(Input::Command {
            cmd,
            from,
            payload: &payload,
            replay: None,
        })
    }

    fn cmd(&mut self, cmd: Command) -> Step {
        self.command(cmd, Some("amq.rabbitmq.reply-to"))
    }

    /// Answers every task request `first` published with success, then every request that
    /// published, until none is left. Returns every step, `first` included.
    fn drive(&mut self, first: Step) -> Vec<Step> {
        let mut all = vec![first];
        let mut i = 0;
        while i < all.len() {
            let tasks: Vec<String> = all[i]
                .messages()
                .filter_map(|m| match m {
                    Message::Task { correlation_id, .. } => Some(correlation_id.clone()),
                    _ => None,
                })
                .collect();
            for corr in tasks {
                // An agent answers a moment later.
                self.tick(Duration::milliseconds(1));
                let out = self.run(Input::Reply {
                    correlation_id: &corr,
                    outcome: TaskOutcome::Completed(Map::new()),
                    message_id: &format!("r-{corr}"),
                });
                all.push(out);
            }
            i += 1;
        }
        all
    }

    fn start(&mut self) -> Vec<Step> {
        let s = self.cmd(Command::Start(StartPayload {
            client_id: "acme".into(),
            context: None,
        }));
        self.drive(s)
    }

    fn evidence(&mut self, metrics: &[(&str, f64)], flags: &[(&str, bool)]) -> Vec<Step> {
        let s = self.cmd(Command::Evidence(EvidencePayload {
            client_id: "acme".into(),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            flags: flags.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            events: Vec::new(),
        }));
        self.drive(s)
    }

    fn client() -> ClientPayload {
        ClientPayload {
            client_id: "acme".into(),
        }
    }

    fn rollback(&mut self, to: Option<Stage>) -> Vec<Step> {
        let s = self.cmd(Command::Rollback(RollbackPayload {
            client_id: "acme".into(),
            reason: "client asked".into(),
            rollback_to: to,
        }));
        self.drive(s)
    }

    fn timers(&mut self) -> Vec<Step> {
        let s = self.run(Input::Timers);
        self.drive(s)
    }

    /// A journey in production, its work done, reached through its gates.
    fn in_production(&mut self) {
        self.start();
        self.tick(Duration::minutes(1));
        self.evidence(&[], &[("demo.approved", true)]);
        self.tick(Duration::minutes(1));
        self.evidence(&[("user.satisfaction", 4.5)], &[]);
        assert_eq!(self.stage(), Stage::Production);
        assert_eq!(self.rec().status(), "live");
    }

    fn rec(&self) -> &JourneyRecord {
        self.rec.as_ref().unwrap()
    }

    fn stage(&self) -> Stage {
        self.rec().journey.stage
    }
}

fn events(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .flat_map(|s| s.events().into_iter().map(str::to_string))
        .collect()
}

fn event_details<'a>(steps: &'a [Step], name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    steps.iter().flat_map(move |s| {
        s.messages().filter_map(move |m| match m {
            Message::Event {
                name: n, payload, ..
            } if n == name => Some(&payload["detail"]),
            _ => None,
        })
    })
}

fn intents(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .flat_map(|s| {
            s.messages().filter_map(|m| match m {
                Message::Task { intent, .. } => Some(intent.clone()),
                _ => None,
            })
        })
        .collect()
}

fn dead_letters(steps: &[Step]) -> usize {
    steps
        .iter()
        .flat_map(|s| s.messages())
        .filter(|m| matches!(m, Message::DeadLetter(_)))
        .count()
}

fn arms(s: &Step) -> Vec<DateTime<Utc>> {
    s.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Arm(at) => Some(*at),
            _ => None,
        })
        .collect()
}

// ---- saga compensation ----

#[test]
fn rollback_across_stages_undoes_every_stage_it_leaves_latest_first() {
    let mut h = Harness::new(PLAYBOOK);
    h.in_production();
    h.tick(Duration::minutes(1));
    let steps = h.rollback(Some(Stage::Sandbox));

    // Production's undo, then pilot's, then sandbox is entered again and re-runs its work.
    assert_eq!(
        intents(&steps),
        [
            "rollback_production_deployment",
            "revoke_pilot_access",
            "setup_sandbox"
        ]
    );
    let undone: Vec<&Value> = event_details(&steps, "work.completed")
        .filter(|d| d["kind"] == "rollback")
        .collect();
    assert_eq!(
        undone,
        [
            &json!({"stage": "production", "kind": "rollback"}),
            &json!({"stage": "pilot", "kind": "rollback"})
        ]
    );
    // It lands only after the last undo: the rollback events bracket both undos.
    let names = events(&steps);
    let landed = names
        .iter()
        .position(|e| e == "journey.rollback_completed")
        .unwrap();
    assert_eq!(
        names[..landed]
            .iter()
            .filter(|e| *e == "work.completed")
            .count(),
        2,
        "{names:?}"
    );

    let j = &h.rec().journey;
    assert_eq!(j.stage, Stage::Sandbox);
    // previous_stage after a rollback: the stage the rollback left.
    assert_eq!(j.previous_stage, Some(Stage::Production));
    assert!(j.completed_stages.is_empty());
}

#[test]
fn rollback_to_the_stage_before_undoes_only_the_stage_left() {
    let mut h = Harness::new(PLAYBOOK);
    h.in_production();
    let steps = h.rollback(None);
    assert_eq!(
        intents(&steps),
        ["rollback_production_deployment", "deploy_pilot"]
    );
    assert_eq!(h.stage(), Stage::Pilot);
    assert_eq!(h.rec().journey.previous_stage, Some(Stage::Production));
}

#[test]
fn a_stage_without_rollback_tasks_is_skipped_in_the_chain() {
    let yaml = PLAYBOOK.replace(
        "    rollback:\n      tasks:\n        - { task_id: revoke, name: Revoke, intent: revoke_pilot_access }\n",
        "",
    );
    let mut h = Harness::new(&yaml);
    h.in_production();
    let steps = h.rollback(Some(Stage::Sandbox));
    assert_eq!(
        intents(&steps),
        ["rollback_production_deployment", "setup_sandbox"]
    );
    assert_eq!(h.stage(), Stage::Sandbox);
}

// ---- no bounce after a manual rollback ----

#[test]
fn a_manual_rollback_holds_at_its_target_until_resume() {
    let mut h = Harness::new(PLAYBOOK);
    h.in_production();
    h.tick(Duration::minutes(1));
    let steps = h.rollback(Some(Stage::Sandbox));
    // Sandbox's work ran again; demo.approved is from before the stage was re-entered, so
    // the gate would not pass anyway, and the journey is held.
    assert_eq!(h.stage(), Stage::Sandbox);
    assert!(!events(&steps).contains(&"journey.promoted".to_string()));
    assert!(h.rec().hold.is_some());
    assert_eq!(h.rec().status(), "held");

    // Fresh evidence that passes the gate: still held, no promotion, no gate.failed noise.
    h.tick(Duration::minutes(1));
    let steps = h.evidence(&[], &[("demo.approved", true)]);
    assert_eq!(h.stage(), Stage::Sandbox);
    assert!(events(&steps).is_empty(), "{:?}", events(&steps));

    // Resume releases the hold; the gate decides at once on this stage's evidence.
    h.tick(Duration::minutes(1));
    let resume = h.cmd(Command::Resume(Harness::client()));
    let steps = h.drive(resume);
    assert_eq!(h.stage(), Stage::Pilot, "{:?}", events(&steps));
    assert!(h.rec().hold.is_none());
    let resumed: Vec<&Value> = event_details(&steps, "journey.resumed").collect();
    assert_eq!(resumed[0]["released_hold"], true);
}

#[test]
fn a_manual_promote_releases_the_hold_through_the_gate() {
    let mut h = Harness::new(PLAYBOOK);
    h.in_production();
    h.rollback(Some(Stage::Sandbox));
    // The old demo.approved does not count in the re-entered stage.
    let s = h.cmd(Command::Promote(Harness::client()));
    assert_eq!(s.refusal(), Some("gate_failed"));
    let Some(Message::Reply { payload, .. }) = s.messages().next() else {
        panic!()
    };
    assert!(
        payload["message"]
            .as_str()
            .unwrap()
            .contains("last reported before the stage started"),
        "{payload}"
    );
    h.tick(Duration::minutes(1));
    h.evidence(&[], &[("demo.approved", true)]);
    let s = h.cmd(Command::Promote(Harness::client()));
    let steps = h.drive(s);
    assert_eq!(h.stage(), Stage::Pilot);
    assert!(h.rec().hold.is_none());
    // Released: pilot promotes itself once its gate passes.
    assert!(events(&steps).contains(&"work.completed".to_string()));
    h.tick(Duration::minutes(1));
    h.evidence(&[("user.satisfaction", 4.6)], &[]);
    assert_eq!(h.stage(), Stage::Production);
}

#[test]
fn an_automatic_rollback_does_not_hold_but_needs_fresh_evidence() {
    let mut h = Harness::new(PLAYBOOK);
    h.start();
    h.tick(Duration::minutes(1));
    h.evidence(&[], &[("demo.approved", true)]);
    assert_eq!(h.stage(), Stage::Pilot);
    h.tick(Duration::minutes(1));
    let steps = h.evidence(&[("user.satisfaction", 3.0)], &[]);
    assert_eq!(intents(&steps), ["revoke_pilot_access", "setup_sandbox"]);
    assert_eq!(h.stage(), Stage::Sandbox);
    assert!(h.rec().hold.is_none());
    // No bounce: the sandbox gate needs demo.approved again.
    assert_eq!(h.rec().status(), "awaiting_gate");
    h.tick(Duration::minutes(1));
    h.evidence(&[], &[("demo.approved", true)]);
    assert_eq!(h.stage(), Stage::Pilot);
    // And pilot's trigger does not fire on the 3.0 from its previous visit.
    assert_eq!(h.rec().status(), "awaiting_gate");
}

#[test]
fn since_journey_lets_a_criterion_read_older_evidence() {
    let yaml = PLAYBOOK.replace(
        "{ name: demo_approved, flag: demo.approved }",
        "{ name: demo_approved, flag: demo.approved, since: journey }",
    );
    let mut h = Harness::new(&yaml);
    h.start();
    h.evidence(&[], &[("demo.approved", true)]);
    h.tick(Duration::minutes(1));
    h.evidence(&[("user.satisfaction", 3.0)], &[]);
    // Rolled back automatically; the journey-wide criterion still sees the old approval.
    assert_eq!(h.stage(), Stage::Pilot);
    assert_eq!(h.rec().journey.previous_stage, Some(Stage::Sandbox));
}

// ---- time-based criteria get their own timers ----

#[test]
fn min_time_in_stage_is_rechecked_by_a_timer() {
    let yaml = PLAYBOOK.replace(
        "{ name: demo_approved, flag: demo.approved }",
        "{ name: soak, min_time_in_stage: 1h }",
    );
    let mut h = Harness::new(&yaml);
    let steps = h.start();
    assert_eq!(h.rec().status(), "awaiting_gate");
    let due = t0() + Duration::hours(1);
    assert!(arms(steps.last().unwrap()).contains(&due), "{steps:?}");
    // The same wake-up is armed again from the store after a restart.
    assert!(wakeups(h.rec(), &h.playbook, &h.policy, h.now).contains(&due));

    // Early: nothing changes, nothing is saved.
    h.tick(Duration::minutes(30));
    let early = h.timers();
    assert!(early[0].record.is_none());
    assert!(arms(&early[0]).contains(&due));

    h.now = due;
    let steps = h.timers();
    assert!(events(&steps).contains(&"journey.promoted".to_string()));
    assert_eq!(h.stage(), Stage::Pilot);
}

#[test]
fn an_event_window_is_rechecked_when_the_event_leaves_it() {
    let yaml = PLAYBOOK.replace(
        "{ name: satisfaction, metric: user.satisfaction, op: \">\", value: 4.0 }",
        "{ name: no_critical_bugs, event: bug.critical, within: 7d, max: 0 }",
    );
    let mut h = Harness::new(&yaml);
    h.start();
    // A critical bug a day ago, reported while in sandbox: pilot's 7-day window sees it.
    let bug_at = h.now - Duration::days(1);
    h.cmd(Command::Evidence(EvidencePayload {
        client_id: "acme".into(),
        metrics: Default::default(),
        flags: Default::default(),
        events: vec![EvidenceEvent {
            name: "bug.critical".into(),
            at: Some(bug_at),
            severity: None,
            detail: None,
        }],
    }));
    let steps = h.evidence(&[], &[("demo.approved", true)]);
    assert_eq!(h.stage(), Stage::Pilot);
    assert_eq!(h.rec().status(), "awaiting_gate");
    let failed: Vec<&Value> = event_details(&steps, "gate.failed").collect();
    assert_eq!(failed[0]["failed"], json!(["no_critical_bugs"]));
    let clears = bug_at + Duration::days(7) + Duration::milliseconds(1);
    assert!(
        arms(steps.last().unwrap()).contains(&clears),
        "{:?}",
        arms(steps.last().unwrap())
    );

    h.now = clears - Duration::milliseconds(1);
    let steps = h.timers();
    assert_eq!(
        h.stage(),
        Stage::Pilot,
        "the bug is still inside the window"
    );
    assert!(
        events(&steps).is_empty(),
        "unchanged failing set: no gate.failed"
    );
    h.now = clears;
    h.timers();
    assert_eq!(h.stage(), Stage::Production);
}

#[test]
fn a_stage_timeout_trigger_fires_from_a_timer() {
    let yaml = PLAYBOOK.replace(
        "      - { name: low_satisfaction, metric: user.satisfaction, op: \"<\", value: 3.5 }",
        "      - { name: stage_timeout, min_time_in_stage: 2d }",
    );
    let mut h = Harness::new(&yaml);
    h.start();
    h.evidence(&[], &[("demo.approved", true)]);
    let entered = h.rec().journey.stage_started_at;
    assert!(
        wakeups(h.rec(), &h.playbook, &h.policy, h.now).contains(&(entered + Duration::days(2)))
    );
    h.now = entered + Duration::days(2);
    let steps = h.timers();
    assert!(events(&steps).contains(&"journey.rollback_started".to_string()));
    assert_eq!(h.stage(), Stage::Sandbox);
    assert!(
        h.rec().hold.is_none(),
        "an automatic rollback does not hold"
    );
}

// ---- generations ----

#[test]
fn a_finished_client_starts_again_as_a_new_generation() {
    let mut h = Harness::new(PLAYBOOK);
    h.start();
    // While a journey runs, a second start is refused, answered, and not dead-lettered.
    let s = h.cmd(Command::Start(StartPayload {
        client_id: "acme".into(),
        context: None,
    }));
    assert_eq!(s.refusal(), Some("already_exists"));
    assert_eq!(dead_letters(std::slice::from_ref(&s)), 0);

    h.cmd(Command::Cancel(CancelPayload {
        client_id: "acme".into(),
        reason: Some("paused contract".into()),
    }));
    assert_eq!(h.stage(), Stage::Cancelled);
    let first_started = h.rec().journey.started_at;
    let seq = h.rec().work_seq;

    h.tick(Duration::days(3));
    let restarted_at = h.now;
    let steps = h.start();
    let rec = h.rec();
    assert_eq!(rec.generation, 2);
    assert_eq!(rec.journey.stage, Stage::Sandbox);
    assert_eq!(rec.journey.started_at, restarted_at);
    assert_eq!(rec.past.len(), 1);
    assert_eq!(rec.past[0].generation, 1);
    assert_eq!(rec.past[0].outcome, Stage::Cancelled);
    assert_eq!(rec.past[0].started_at, first_started);
    assert!(rec.evidence.flags.is_empty() && rec.hold.is_none());
    // Work ids stay unique across generations.
    assert!(rec.work_seq > seq);
    let history: Vec<&str> = steps[0].history().map(|(k, _)| k).collect();
    assert_eq!(&history[..2], ["generation_archived", "started"]);
    let started: Vec<&Value> = event_details(&steps, "journey.started").collect();
    assert_eq!(started, [&json!({"generation": 2})]);
}

// ---- gate.failed once per change ----

#[test]
fn gate_failed_is_published_only_when_the_failing_set_changes() {
    let yaml = PLAYBOOK.replace(
        "      - { name: demo_approved, flag: demo.approved }\n",
        "      - { name: demo_approved, flag: demo.approved }\n      - { name: precision, metric: search.precision, op: \">\", value: 0.8 }\n",
    );
    let mut h = Harness::new(&yaml);
    let steps = h.start();
    let failed: Vec<&Value> = event_details(&steps, "gate.failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["failed"], json!(["demo_approved", "precision"]));

    // Evidence that changes no verdict: silence.
    let steps = h.evidence(&[("unrelated.metric", 1.0)], &[]);
    assert_eq!(events(&steps), Vec::<String>::new());
    let steps = h.evidence(&[("search.precision", 0.5)], &[]);
    assert_eq!(events(&steps), Vec::<String>::new());

    // One check passes: the set changed.
    let steps = h.evidence(&[("search.precision", 0.9)], &[]);
    let failed: Vec<&Value> = event_details(&steps, "gate.failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["failed"], json!(["demo_approved"]));
    let steps = h.evidence(&[("search.precision", 0.95)], &[]);
    assert!(events(&steps).is_empty());
}

// ---- refusals ----

#[test]
fn answered_refusals_are_not_dead_letters_unanswerable_ones_are() {
    let mut h = Harness::new(PLAYBOOK);
    h.start();
    for (cmd, code) in [
        (Command::Promote(Harness::client()), "gate_failed"),
        (Command::Complete(Harness::client()), "invalid_transition"),
    ] {
        let answered = h.command(cmd.clone(), Some("reply-queue"));
        assert_eq!(answered.refusal(), Some(code));
        assert_eq!(dead_letters(std::slice::from_ref(&answered)), 0, "{code}");
        let silent = h.command(cmd, None);
        assert_eq!(dead_letters(std::slice::from_ref(&silent)), 1, "{code}");
        let Some(Message::DeadLetter(dl)) = silent.messages().next() else {
            panic!()
        };
        assert_eq!(dl.reason, code);
        assert_eq!(dl.client_id.as_deref(), Some("acme"));
    }
    // An unknown client (no record): answered with what to do.
    let mut h = Harness::new(PLAYBOOK);
    let s = h.command(
        Command::Status(ClientPayload {
            client_id: "nobody".into(),
        }),
        Some("reply-queue"),
    );
    assert_eq!(s.refusal(), Some("not_found"));
}

#[test]
fn resume_with_nothing_to_resume_says_what_resume_does() {
    let mut h = Harness::new(PLAYBOOK);
    h.start();
    let s = h.cmd(Command::Resume(Harness::client()));
    assert_eq!(s.refusal(), Some("invalid_transition"));
    let Some(Message::Reply { payload, .. }) = s.messages().next() else {
        panic!()
    };
    assert!(
        payload["message"]
            .as_str()
            .unwrap()
            .contains("releases the hold")
    );
}
