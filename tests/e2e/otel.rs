//! Traces exported over OTLP/HTTP: the real binaries, pointed by `OTEL_EXPORTER_OTLP_ENDPOINT`
//! at a small receiver in the test, send spans that link upstream → orchestrator → agent →
//! orchestrator in one trace, and an exiting process flushes what it still holds.

use std::process::Stdio;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use journeyman::broker::{Outgoing, Publisher};
use journeyman::wire::trace::{HEADER, TraceParent};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;
use tokio::sync::mpsc;

use crate::helpers::*;

/// One span as the receiver saw it, ids in hex.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// A minimal OTLP/HTTP trace receiver: `POST /v1/traces` with a protobuf body. Returns its
/// base URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` takes) and the spans as they arrive.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Received>) {
    async fn traces(
        State(tx): State<mpsc::UnboundedSender<Received>>,
        body: Bytes,
    ) -> &'static str {
        let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let _ = tx.send(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent_span_id: hex::encode(span.parent_span_id),
                });
            }
        }
        ""
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), rx)
}

/// Receives spans (keeping them all in `seen`) until `found` picks one, within `WAIT`.
async fn wait_span(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    seen: &mut Vec<Received>,
    what: &str,
    found: impl Fn(&Received) -> bool,
) -> Received {
    let wait = async {
        loop {
            if let Some(s) = seen.iter().find(|s| found(s)) {
                return s.clone();
            }
            seen.push(rx.recv().await.expect("the receiver runs"));
        }
    };
    match tokio::time::timeout(WAIT, wait).await {
        Ok(s) => s,
        Err(_) => panic!("no span: {what}; received: {seen:#?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_linked_across_the_broker() {
    let (endpoint, mut spans) = receiver().await;
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    app.start_child_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "orchestrator-under-test"),
        // Export promptly: the test waits for the spans, not for the 5 s default.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_SDK_DISABLED", "false"),
    ])
    .await;
    // The agents hold their spans (a schedule far longer than the test) until they exit:
    // they arrive only if shutting down flushes the exporter. No OTEL_SERVICE_NAME: the
    // default service name is journeyman's.
    let agents_log = app.dir.path().join("agents.log");
    let mut agents = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(["--namespace", &app.names.namespace, "agents", "--playbook"])
        .arg(app.playbook_file())
        .args(["--failure-rate", "0"])
        .env("JOURNEYMAN_AMQP_URL", &app.url)
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("JOURNEYMAN_AUTH_KEYS")
        .env_remove("JOURNEYMAN_AUTH_KEYS_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&agents_log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn journeyman agents");
    // The first task request must find its queue: one published before the agents
    // declared it comes back unroutable and is retried by a timer, outside any message's
    // span, so it could not name the command's span as its parent.
    let consuming = async {
        while !std::fs::read_to_string(&agents_log)
            .unwrap_or_default()
            .contains("agent consuming")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, consuming)
        .await
        .expect("the agents consume");

    // The upstream agent: a journey.start in a trace of its own.
    let upstream = TraceParent::new_root();
    let start = TestApp::command("journey.start", json!({"client_id": "acme"}));
    let publisher = Publisher::start(&app.conn).await.unwrap();
    publisher
        .publish(Outgoing {
            exchange: app.names.intents(),
            routing_key: start.intent.clone(),
            mandatory: true,
            message_id: start.message_id.to_string(),
            correlation_id: None,
            reply_to: None,
            message_type: "request".into(),
            headers: vec![(HEADER.into(), upstream.header())],
            body: start.to_bytes(),
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let command = wait_span(&mut spans, &mut seen, "the orchestrator's command", |s| {
        s.name == "message"
            && s.trace_id == upstream.trace_id
            && s.parent_span_id == upstream.span_id
    })
    .await;
    assert_eq!(command.service, "orchestrator-under-test");
    // A reply handled by the orchestrator, in the same trace, whose parent is not the
    // upstream's: the agent's span.
    let reply = wait_span(
        &mut spans,
        &mut seen,
        "the orchestrator's first reply",
        |s| {
            s.name == "message"
                && s.trace_id == upstream.trace_id
                && s.parent_span_id != upstream.span_id
                && s.service == "orchestrator-under-test"
        },
    )
    .await;

    let (status, _) = terminate(&mut agents, Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the agents stop gracefully: {status:?}"
    );
    let task = wait_span(
        &mut spans,
        &mut seen,
        "the agent's task, flushed on exit",
        |s| s.name == "task" && s.span_id == reply.parent_span_id,
    )
    .await;
    assert_eq!(task.service, "journeyman", "the default service name");
    assert_eq!(task.trace_id, upstream.trace_id);
    assert_eq!(
        task.parent_span_id,
        command.span_id,
        "the agent's span is a child of the orchestrator's; spans:\n{}",
        seen.iter()
            .map(|s| format!(
                "{} {} {} <- {}",
                s.service, s.name, s.span_id, s.parent_span_id
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
