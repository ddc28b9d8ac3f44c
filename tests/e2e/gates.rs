//! Exit-criteria gates, automatic promotion, rollback (manual and triggered), pause and
//! resume, over the real broker (issue 3).

use std::sync::Arc;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::journey::Stage;
use journeyman::orchestrator::Stats;
use journeyman::wire::protocol::{ClientPayload, Command, MessageType, RollbackPayload};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::helpers::*;
use crate::{Flaky, Gate, Recorder};

fn status(client: &str) -> Command {
    Command::Status(ClientPayload {
        client_id: client.into(),
    })
}

fn rollback(client: &str, reason: &str, to: Option<Stage>) -> Command {
    Command::Rollback(RollbackPayload {
        client_id: client.into(),
        reason: reason.into(),
        rollback_to: to,
    })
}

/// Waits until `client` has entered `stage` (started in sandbox, or promoted into it).
async fn wait_stage(app: &mut TestApp, client: &str, stage: &str) -> Value {
    let (c, s) = (client.to_string(), stage.to_string());
    app.wait_event(&format!("{client} in {stage}"), move |p| {
        p["client_id"] == c.as_str()
            && p["stage"] == s.as_str()
            && (p["event"] == "journey.promoted" || p["event"] == "journey.started")
    })
    .await
}

/// Lets a journey held by a manual rollback go on: upstream reports the sandbox evidence
/// again (a gate judges evidence observed since its stage was re-entered), then
/// `journey.resume` releases the hold.
async fn release(app: &mut TestApp, client: &str) {
    app.evidence(
        client,
        &[("search.precision", 0.9)],
        &[("demo.approved", true)],
    )
    .await;
    let r = app
        .request(&Command::Resume(ClientPayload {
            client_id: client.into(),
        }))
        .await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    assert!(r.payload["hold"].is_null(), "{}", r.payload);
}

async fn wait_rollback_done(app: &mut TestApp, client: &str) -> Value {
    let c = client.to_string();
    app.wait_event(&format!("{client} rolled back"), move |p| {
        p["client_id"] == c.as_str() && p["event"] == "journey.rollback_completed"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_holds_a_journey_until_its_evidence_passes_and_refuses_a_manual_promote() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    // Start without the upstream evidence: the work completes, the gate does not pass.
    let start = TestApp::command("journey.start", json!({"client_id": "acme"}));
    app.send(&start).await;
    let failed = app
        .wait_event("sandbox gate refused", |p| p["event"] == "gate.failed")
        .await;
    let names: Vec<&str> = failed["detail"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"search_quality") && names.contains(&"demo_approved"),
        "{names:?}"
    );

    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["status"], "awaiting_gate");
    assert_eq!(s["stage"], "sandbox");
    let checks = s["gate"]["checks"].as_array().unwrap();
    let quality = checks
        .iter()
        .find(|c| c["name"] == "search_quality")
        .unwrap();
    assert_eq!(quality["passed"], false);
    assert!(
        quality["message"].as_str().unwrap().contains("no value"),
        "{quality}"
    );
    // Connectors and the security scan came from the task outputs and pass.
    for name in ["connectors_syncing", "security_scan"] {
        let c = checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {checks:?}"));
        assert_eq!(c["passed"], true, "{c}");
    }

    // A manual promote through a failing gate is refused with the failing checks.
    let promote = Command::Promote(ClientPayload {
        client_id: "acme".into(),
    });
    let refused = app.request(&promote).await;
    assert_eq!(refused.message_type, MessageType::Error);
    assert_eq!(refused.payload["code"], "gate_failed");
    let failing: Vec<&Value> = refused.payload["details"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert_eq!(failing.len(), 2, "{failing:?}");

    // Exactly 80 % is not above 80 %: still waiting.
    app.evidence(
        "acme",
        &[("search.precision", 0.80)],
        &[("demo.approved", true)],
    )
    .await;
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["stage"], "sandbox", "0.80 must not pass > 0.80");
    // Evidence that passes promotes it automatically.
    app.evidence("acme", &[("search.precision", 0.81)], &[])
        .await;
    wait_stage(&mut app, "acme", "pilot").await;
    app.wait_in_production("acme").await;
    assert!(Stats::get(&app.stats.gate_failed) >= 3);
    // The refused promote was answered, so it is not a dead letter.
    assert_eq!(app.dead_letter_count().await, 0);
}

/// What a test case reports.
enum Report {
    Metric(String, f64),
    Event(String),
}

/// Each automatic rollback trigger of the default playbook, fired by evidence reported in
/// its stage, rolls the journey back to the stage before (sandbox restarts sandbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_automatic_trigger_rolls_back() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    let metric = |n: &str, v: f64| Report::Metric(n.to_string(), v);
    let event = |n: &str| Report::Event(n.to_string());
    let cases: Vec<(&str, &str, Report, &str)> = vec![
        (
            "sandbox",
            "security_vulnerability",
            metric("security.critical_count", 2.0),
            "sandbox",
        ),
        (
            "sandbox",
            "low_data_quality",
            metric("data.quality", 0.5),
            "sandbox",
        ),
        (
            "pilot",
            "low_satisfaction",
            metric("user.satisfaction", 3.4),
            "sandbox",
        ),
        ("pilot", "critical_bug", event("bug.critical"), "sandbox"),
        (
            "pilot",
            "performance_degradation",
            metric("performance.degradation_pct", 25.0),
            "sandbox",
        ),
        ("production", "p0_incident", event("incident.p0"), "pilot"),
        ("production", "p1_incident", event("incident.p1"), "pilot"),
        (
            "production",
            "low_satisfaction",
            metric("user.satisfaction", 3.9),
            "pilot",
        ),
        (
            "production",
            "security_vulnerability",
            metric("security.critical_count", 1.0),
            "pilot",
        ),
        (
            "production",
            "outage",
            metric("outage.minutes", 61.0),
            "pilot",
        ),
    ];
    for (i, (stage, trigger, report, back_to)) in cases.into_iter().enumerate() {
        let client = format!("c{i}-{trigger}");
        app.start_journey(&client).await;
        wait_stage(&mut app, &client, stage).await;
        match report {
            Report::Metric(name, v) => {
                app.evidence(&client, &[(name.as_str(), v)], &[]).await;
            }
            Report::Event(name) => {
                app.report_event(&client, &name, None).await;
            }
        }
        let c = client.clone();
        let started = app
            .wait_event(&format!("{client}: {trigger} fires"), move |p| {
                p["client_id"] == c.as_str() && p["event"] == "journey.rollback_started"
            })
            .await;
        assert_eq!(started["detail"]["automatic"], true, "{trigger}");
        assert_eq!(started["detail"]["from"], stage, "{trigger}");
        assert!(
            started["detail"]["reason"]
                .as_str()
                .unwrap()
                .contains(trigger),
            "{started}"
        );
        let done = wait_rollback_done(&mut app, &client).await;
        assert_eq!(done["stage"], back_to, "{trigger}");
    }
    assert_eq!(Stats::get(&app.stats.rollbacks_automatic), 10);
    assert_eq!(Stats::get(&app.stats.rollbacks_completed), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rollbacks_land_where_asked_and_rerun_the_stage() {
    let mut app = TestApp::spawn().await;
    let rec = Recorder::new(SimAgent::default());
    app.start_agent_for_all(rec.clone()).await;
    for c in ["to-previous", "to-sandbox"] {
        app.start_journey(c).await;
    }
    // Held in sandbox by its gate (no upstream evidence yet).
    let start = TestApp::command("journey.start", json!({"client_id": "from-sandbox"}));
    app.send(&start).await;
    // From production without a target: back to pilot.
    app.wait_in_production("to-previous").await;
    let r = app
        .request(&rollback("to-previous", "client asked to pause", None))
        .await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    let done = wait_rollback_done(&mut app, "to-previous").await;
    assert_eq!(done["stage"], "pilot");
    assert_eq!(done["detail"]["rollback"]["automatic"], false);
    // previous_stage: the stage the rollback left.
    assert_eq!(done["previous_stage"], "production");
    let s = app.request(&status("to-previous")).await.payload;
    assert_eq!(
        s["completed_stages"],
        json!(["sandbox"]),
        "pilot must pass its gate again"
    );
    assert_eq!(s["hold"]["reason"], "client asked to pause");

    // From production to an explicit earlier stage.
    app.wait_in_production("to-sandbox").await;
    app.request(&rollback("to-sandbox", "restart", Some(Stage::Sandbox)))
        .await;
    let done = wait_rollback_done(&mut app, "to-sandbox").await;
    assert_eq!(done["stage"], "sandbox");

    // Rollback from sandbox restarts sandbox.
    app.wait_event("from-sandbox held by its gate", |p| {
        p["client_id"] == "from-sandbox" && p["event"] == "gate.failed"
    })
    .await;
    app.request(&rollback("from-sandbox", "data sources changed", None))
        .await;
    let done = wait_rollback_done(&mut app, "from-sandbox").await;
    assert_eq!(done["stage"], "sandbox");
    assert_eq!(done["detail"]["from"], "rollback");
    app.evidence(
        "from-sandbox",
        &[("search.precision", 0.9)],
        &[("demo.approved", true)],
    )
    .await;

    // A target that is not earlier is refused.
    let bad = app
        .request(&rollback(
            "to-previous",
            "nonsense",
            Some(Stage::Production),
        ))
        .await;
    assert_eq!(bad.message_type, MessageType::Error);
    assert!(matches!(
        bad.payload["code"].as_str(),
        Some("invalid_rollback_target" | "invalid_transition")
    ));

    // Every journey is held where its manual rollback put it; released, it runs each
    // stage again on fresh evidence.
    for c in ["to-previous", "to-sandbox", "from-sandbox"] {
        release(&mut app, c).await;
    }
    for c in ["to-previous", "to-sandbox", "from-sandbox"] {
        app.wait_event(&format!("{c} back in production"), {
            let c = c.to_string();
            move |p| {
                p["client_id"] == c.as_str()
                    && p["event"] == "work.completed"
                    && p["stage"] == "production"
            }
        })
        .await;
    }
    assert!(!rec.attempts("rollback_production_deployment").is_empty());
    assert!(!rec.attempts("teardown_sandbox_environment").is_empty());
    // Production -> sandbox undid pilot too (saga compensation).
    assert!(!rec.attempts("revoke_pilot_access").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollback_is_marked_failed_and_can_be_retried() {
    let mut app = TestApp::spawn().await;
    // The pilot's rollback task fails through all its attempts, then works.
    let attempts = app.playbook.stage("pilot").unwrap().rollback.tasks[0].max_retries + 1;
    let rec = Recorder::new(Flaky::new("revoke_pilot_access", attempts, true));
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    wait_stage(&mut app, "acme", "pilot").await;
    app.request(&rollback("acme", "stakeholder concerns", None))
        .await;
    app.wait_event("rollback failed", |p| p["event"] == "rollback.failed")
        .await;
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["stage"], "rollback");
    assert_eq!(s["status"], "rollback_failed");
    assert_eq!(s["rollback"]["failed"], true);
    assert!(
        s["paused"]["last_error"]
            .as_str()
            .unwrap()
            .contains("injected")
    );
    assert_eq!(app.dead_letters(1).await[0].reason(), "rollback_failed");

    // journey.rollback retries it.
    let r = app.request(&rollback("acme", "retry", None)).await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    let done = wait_rollback_done(&mut app, "acme").await;
    assert_eq!(done["stage"], "sandbox");
    assert_eq!(
        rec.attempts("revoke_pilot_access").len() as u32,
        attempts + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replies_after_a_rollback_are_recorded_and_ignored() {
    let mut app = TestApp::spawn().await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    app.start_agent_for_all(Arc::new(Gate {
        intent: "collect_user_feedback".into(),
        arrived: arrived_tx,
        open: open_rx,
    }))
    .await;
    app.start_journey("acme").await;
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("feedback requested");
    let stale_before = Stats::get(&app.stats.stale_replies);
    app.request(&rollback("acme", "pause pilot", None)).await;
    wait_rollback_done(&mut app, "acme").await;
    // Now the held pilot task answers: too late, its work was cancelled.
    open_tx.send(true).unwrap();
    release(&mut app, "acme").await;
    app.wait_in_production("acme").await;
    assert!(
        Stats::get(&app.stats.stale_replies) > stale_before,
        "the late reply was seen and ignored"
    );
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["completed_stages"], json!(["sandbox", "pilot"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_out_of_retries_pauses_the_journey_and_resume_keeps_completed_tasks() {
    let mut app = TestApp::spawn().await;
    let attempts = app
        .playbook
        .stage("sandbox")
        .unwrap()
        .task("provision-test-data")
        .unwrap()
        .max_retries
        + 1;
    let rec = Recorder::new(Flaky::new("provision_test_dataset", attempts, true));
    app.start_agent_for_all(rec.clone()).await;
    app.start_journey("acme").await;
    app.wait_event("paused", |p| p["event"] == "journey.paused")
        .await;
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["status"], "paused");
    assert_eq!(s["paused"]["task_id"], "provision-test-data");
    assert_eq!(s["paused"]["attempts"], attempts);
    assert!(
        s["paused"]["last_error"]
            .as_str()
            .unwrap()
            .contains("injected")
    );
    assert_eq!(app.dead_letters(1).await[0].reason(), "task_failed");

    let resume = Command::Resume(ClientPayload {
        client_id: "acme".into(),
    });
    let r = app.request(&resume).await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    app.wait_in_production("acme").await;
    // Completed tasks were kept: the two before the failure ran once each.
    assert_eq!(rec.attempts("provision_sandbox_environment").len(), 1);
    assert_eq!(rec.attempts("install_connectors").len(), 1);
    assert_eq!(
        rec.attempts("provision_test_dataset").len() as u32,
        attempts + 1
    );
    // Resuming a journey that is not paused is refused.
    let again = app.request(&resume).await;
    assert_eq!(again.message_type, MessageType::Error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_during_a_rollback() {
    let mut app = TestApp::spawn().await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    app.start_agent_for_all(Arc::new(Gate {
        intent: "revoke_pilot_access".into(),
        arrived: arrived_tx,
        open: open_rx,
    }))
    .await;
    app.start_journey("acme").await;
    wait_stage(&mut app, "acme", "pilot").await;
    app.request(&rollback("acme", "stop", None)).await;
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("rollback task requested");
    let cancel = Command::Cancel(journeyman::wire::protocol::CancelPayload {
        client_id: "acme".into(),
        reason: Some("contract ended".into()),
    });
    let r = app.request(&cancel).await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    assert_eq!(r.payload["stage"], "cancelled");
    open_tx.send(true).unwrap();
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["status"], "cancelled");
    // A cancelled journey refuses everything but status.
    let again = app.request(&rollback("acme", "again", None)).await;
    assert_eq!(again.payload["code"], "invalid_transition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_rollback_holds_instead_of_bouncing_and_a_finished_client_comes_back() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;
    let r = app
        .request(&rollback("acme", "client asked", Some(Stage::Sandbox)))
        .await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    // Sandbox's work runs again after the landing (previous_stage names the stage left).
    app.wait_event("sandbox re-run", |p| {
        p["event"] == "work.completed"
            && p["detail"]["kind"] == "stage"
            && p["stage"] == "sandbox"
            && p["previous_stage"] == "production"
    })
    .await;
    // Held, though the journey had passed the sandbox gate before: no auto-promotion.
    let s = app.request(&status("acme")).await.payload;
    assert_eq!(s["stage"], "sandbox");
    assert_eq!(s["status"], "held", "{s}");
    assert!(
        !app.seen_events()
            .iter()
            .any(|p| p["event"] == "journey.promoted" && p["previous_stage"] == "production"),
        "bounced back"
    );

    // Cancelled, then started again: a second generation, the first kept.
    let cancel = Command::Cancel(journeyman::wire::protocol::CancelPayload {
        client_id: "acme".into(),
        reason: Some("contract paused".into()),
    });
    assert_eq!(app.request(&cancel).await.payload["stage"], "cancelled");
    let start = Command::Start(journeyman::wire::protocol::StartPayload {
        client_id: "acme".into(),
        context: None,
    });
    let r = app.request(&start).await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    assert_eq!(r.payload["generation"], 2);
    assert_eq!(r.payload["stage"], "sandbox");
    assert_eq!(r.payload["past_generations"][0]["generation"], 1);
    assert_eq!(r.payload["past_generations"][0]["outcome"], "cancelled");
    assert_eq!(app.dead_letter_count().await, 0);
}
