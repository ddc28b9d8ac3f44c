//! Conformance: every message the service sends in a representative run (a journey to
//! production, a rollback across stages, a refusal, a cancel, a second generation, status
//! cards and a dead letter) is checked against its published schema, which refuse unknown
//! fields. It catches the next drift between behaviour and contract.

use std::sync::Arc;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::journey::Stage;
use journeyman::wire::protocol::{
    CancelPayload, ClientPayload, Command, Envelope, MessageType, RollbackPayload, StartPayload,
    compile_schema, schemas,
};
use serde_json::{Value, json};

use crate::helpers::*;

fn assert_valid(validator: &jsonschema::Validator, what: &str, value: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} breaks its schema: {errors:?}\n{value}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_the_service_sends_matches_its_schema() {
    let envelope = compile_schema(schemas::ENVELOPE);
    let state = compile_schema(schemas::JOURNEY_STATE);
    let error = compile_schema(schemas::ERROR);
    let event = compile_schema(schemas::JOURNEY_EVENT);
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;

    let mut replies: Vec<Envelope> = Vec::new();
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;
    replies.push(
        app.request(&Command::Rollback(RollbackPayload {
            client_id: "acme".into(),
            reason: "conformance".into(),
            rollback_to: Some(Stage::Sandbox),
        }))
        .await,
    );
    app.wait_event("landed", |p| {
        p["event"] == "journey.rollback_completed" && p["client_id"] == "acme"
    })
    .await;
    replies.push(
        app.request(&Command::Promote(ClientPayload {
            client_id: "acme".into(),
        }))
        .await,
    );
    replies.push(
        app.request(&Command::Cancel(CancelPayload {
            client_id: "acme".into(),
            reason: Some("conformance".into()),
        }))
        .await,
    );
    replies.push(
        app.request(&Command::Start(StartPayload {
            client_id: "acme".into(),
            context: None,
        }))
        .await,
    );
    replies.push(
        app.request(&Command::Status(ClientPayload {
            client_id: "nobody".into(),
        }))
        .await,
    );
    app.wait_event("cancelled", |p| p["event"] == "journey.cancelled")
        .await;
    app.wait_event("generation 2", |p| {
        p["event"] == "journey.started" && p["detail"]["generation"] == 2
    })
    .await;
    app.wait_event("a status card", |p| p["event"] == "dashboard.status_card")
        .await;
    // Refused with nobody to tell: a dead letter, naming its client.
    let silent = TestApp::command("journey.complete", json!({"client_id": "acme"}));
    app.send(&silent).await;
    let dl = app.dead_letters(1).await;
    assert_eq!(dl[0].reason(), "invalid_transition");
    assert_eq!(dl[0].headers["x-journeyman-client-id"], "acme");
    let failed_at = &dl[0].headers["x-journeyman-failed-at"];
    assert!(
        chrono::DateTime::parse_from_rfc3339(failed_at).is_ok() && !failed_at.contains(".000000"),
        "{failed_at}"
    );

    let mut errors = 0;
    for r in &replies {
        let raw = serde_json::to_value(r).unwrap();
        assert_valid(&envelope, "reply envelope", &raw);
        let ts = raw["timestamp"].as_str().unwrap();
        assert!(
            ts.split('.').nth(1).is_none_or(|f| f.len() <= 4),
            "milliseconds at most: {ts}"
        );
        match r.message_type {
            MessageType::Response => assert_valid(&state, "journey state", &r.payload),
            MessageType::Error => {
                errors += 1;
                assert_valid(&error, "error", &r.payload)
            }
            other => panic!("reply of type {other:?}"),
        }
    }
    assert_eq!(
        errors, 2,
        "the promote of a held journey and the unknown client"
    );

    let seen = app.seen_events();
    let names: std::collections::BTreeSet<&str> =
        seen.iter().filter_map(|p| p["event"].as_str()).collect();
    for name in [
        "journey.started",
        "journey.promoted",
        "journey.rollback_started",
        "journey.rollback_completed",
        "journey.cancelled",
        "work.completed",
        "dashboard.status_card",
    ] {
        assert!(names.contains(name), "{name} not seen: {names:?}");
    }
    for p in seen {
        assert_valid(&event, p["event"].as_str().unwrap_or("event"), p);
    }
}
