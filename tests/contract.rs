//! The published schemas and the Rust types agree: every schema compiles and its examples
//! validate and parse into the Rust types; every message the Rust side builds validates
//! against its schema. No broker needed.

use chrono::Utc;
use journeyman::domain::journey::{Journey, Stage};
use journeyman::domain::playbook::Playbook;
use journeyman::domain::work::{JourneyView, UnitOfWork};
use journeyman::orchestrator::{JourneyRecord, event_payload, state_view};
use journeyman::wire::protocol::{
    AgentRef, CancelPayload, ClientPayload, Command, Decoder, Envelope, ErrorPayload,
    EvidenceEvent, EvidencePayload, MessageType, RollbackPayload, StartPayload, TaskOutcome,
    TaskResponse, compile_schema, schemas,
};
use serde_json::{Value, json};

fn examples(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).unwrap();
    v["examples"].as_array().cloned().unwrap_or_default()
}

/// JSON numbers compared by value: 420 and 420.0 are the same metric.
fn numbers_as_f64(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_f64).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect())
        }
        other => other,
    }
}

fn all_schemas() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("envelope", schemas::ENVELOPE),
        ("task-response", schemas::TASK_RESPONSE),
        ("error", schemas::ERROR),
        ("journey-state", schemas::JOURNEY_STATE),
        ("journey-event", schemas::JOURNEY_EVENT),
    ];
    v.extend(schemas::COMMANDS.iter().copied());
    v
}

fn envelope(intent: &str, message_type: MessageType, payload: Value) -> Envelope {
    Envelope::new(
        AgentRef::new("contract-test", "tests"),
        AgentRef::orchestrator(),
        message_type,
        intent,
        payload,
        Utc::now(),
    )
}

#[test]
fn every_schema_compiles_and_its_examples_validate() {
    for (name, text) in all_schemas() {
        let v = compile_schema(text);
        let ex = examples(text);
        assert!(!ex.is_empty(), "{name} has examples");
        for e in ex {
            assert!(v.is_valid(&e), "{name}: example does not validate: {e}");
        }
    }
}

#[test]
fn schema_examples_parse_into_the_rust_types() {
    let d = Decoder::default();
    for e in examples(schemas::ENVELOPE) {
        let env = d
            .envelope(&serde_json::to_vec(&e).unwrap())
            .expect("envelope example parses");
        assert_eq!(serde_json::to_value(&env).unwrap()["intent"], e["intent"]);
    }
    for (intent, text) in schemas::COMMANDS {
        for e in examples(text) {
            let env = envelope(intent, MessageType::Request, e.clone());
            let cmd = d
                .command(&env)
                .unwrap_or_else(|err| panic!("{intent} example {e}: {err}"));
            assert_eq!(cmd.intent(), intent);
            // And back: the Rust payload is the same JSON.
            assert_eq!(
                numbers_as_f64(cmd.payload()),
                numbers_as_f64(e),
                "{intent} round trip"
            );
        }
    }
    for e in examples(schemas::TASK_RESPONSE) {
        let env = envelope("x", MessageType::Response, e);
        assert!(matches!(d.task_reply(&env), Ok(TaskOutcome::Completed(_))));
    }
    for e in examples(schemas::ERROR) {
        let env = envelope("x", MessageType::Error, e.clone());
        assert!(
            matches!(d.task_reply(&env), Ok(TaskOutcome::Failed(_))),
            "{e}"
        );
        let _: ErrorPayload = serde_json::from_value(e).unwrap();
    }
}

#[test]
fn what_the_rust_side_builds_validates() {
    let env_schema = compile_schema(schemas::ENVELOPE);
    let commands = [
        Command::Start(StartPayload {
            client_id: "acme".into(),
            context: Some(
                json!({"data_sources": ["drive"]})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        }),
        Command::Promote(ClientPayload {
            client_id: "acme".into(),
        }),
        Command::Rollback(RollbackPayload {
            client_id: "acme".into(),
            reason: "satisfaction dropped".into(),
            rollback_to: Some(Stage::Sandbox),
        }),
        Command::Cancel(CancelPayload {
            client_id: "acme".into(),
            reason: Some("contract ended".into()),
        }),
        Command::Complete(ClientPayload {
            client_id: "acme".into(),
        }),
        Command::Evidence(EvidencePayload {
            client_id: "acme".into(),
            metrics: [("search.precision".to_string(), 0.9)].into(),
            flags: [("demo.approved".to_string(), true)].into(),
            events: vec![EvidenceEvent {
                name: "bug.critical".into(),
                at: Some(Utc::now()),
                severity: Some("critical".into()),
                detail: None,
            }],
        }),
        Command::Status(ClientPayload {
            client_id: "acme".into(),
        }),
        Command::Resume(ClientPayload {
            client_id: "acme".into(),
        }),
    ];
    for cmd in commands {
        let (_, text) = schemas::COMMANDS
            .iter()
            .find(|(i, _)| *i == cmd.intent())
            .unwrap();
        let payload = cmd.payload();
        assert!(
            compile_schema(text).is_valid(&payload),
            "{}: {payload}",
            cmd.intent()
        );
        let env = envelope(cmd.intent(), MessageType::Request, payload);
        assert!(env_schema.is_valid(&serde_json::to_value(&env).unwrap()));
    }
    let resp = serde_json::to_value(TaskResponse::completed(
        json!({"k": 1}).as_object().unwrap().clone(),
    ))
    .unwrap();
    assert!(compile_schema(schemas::TASK_RESPONSE).is_valid(&resp));
    let err = serde_json::to_value(ErrorPayload {
        code: "not_found".into(),
        message: "no journey".into(),
        retryable: false,
        details: None,
    })
    .unwrap();
    assert!(compile_schema(schemas::ERROR).is_valid(&err));

    // A journey record mid-sandbox: its state view and an event about it.
    let playbook = Playbook::default_playbook();
    let now = Utc::now();
    let ctx = json!({});
    let spec = playbook.stage("sandbox").unwrap();
    let mut work = UnitOfWork::new("uow-acme-sandbox-1".into(), Stage::Sandbox, spec, now);
    let mut n = 0;
    let mut ids = || {
        n += 1;
        format!("c{n}")
    };
    let view = JourneyView {
        client_id: "acme",
        context: &ctx,
    };
    work.advance(spec, &view, now, &mut ids);
    let rec = JourneyRecord {
        journey: Journey::start("acme", now),
        playbook: playbook.content_hash(),
        context: ctx.clone(),
        work: Some(work),
        work_seq: 1,
        evidence: Default::default(),
        gate: None,
        rollback: None,
        trace_id: None,
        hold: None,
        generation: 1,
        past: Vec::new(),
        partition: None,
    };
    let state = state_view(&rec);
    assert!(
        compile_schema(schemas::JOURNEY_STATE).is_valid(&state),
        "{state}"
    );
    let event = event_payload(&rec, "journey.started", json!({"generation": 1}), now);
    assert!(
        compile_schema(schemas::JOURNEY_EVENT).is_valid(&event),
        "{event}"
    );
}
