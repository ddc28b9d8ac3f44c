//! W3C trace context travels from the upstream command to the task requests, and from a
//! task request to the agent's reply.

use std::sync::Arc;

use chrono::Utc;
use futures_util::StreamExt;
use journeyman::agent::sim::SimAgent;
use journeyman::broker::{self, Outgoing, Publisher};
use journeyman::wire::protocol::{AgentRef, Envelope, MessageType};
use journeyman::wire::trace::{HEADER, TraceParent};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::json;

use crate::helpers::*;

fn outgoing(
    app: &TestApp,
    env: &Envelope,
    reply_to: Option<String>,
    trace: &TraceParent,
) -> Outgoing {
    Outgoing {
        exchange: app.names.intents(),
        routing_key: env.intent.clone(),
        mandatory: true,
        message_id: env.message_id.to_string(),
        correlation_id: env.correlation_id.clone(),
        reply_to,
        message_type: env.message_type.as_str().into(),
        headers: vec![(HEADER.into(), trace.header())],
        body: env.to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_trace_reaches_the_task_requests() {
    let app = TestApp::spawn().await;
    // Stand in for the agent: a plain consumer on the first task's queue.
    let intent = "provision_sandbox_environment";
    let queue = app.names.intent_queue(intent);
    let ch = app.conn.create_channel().await.unwrap();
    broker::declare_queue(&ch, &app.names, &queue, Some(intent))
        .await
        .unwrap();
    let mut requests = ch
        .basic_consume(
            queue.as_str().into(),
            "t".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let upstream = TraceParent::new_root();
    let start = TestApp::command("journey.start", json!({"client_id": "acme"}));
    let publisher = Publisher::start(&app.conn).await.unwrap();
    publisher
        .publish(outgoing(&app, &start, None, &upstream))
        .await
        .unwrap();

    let d = tokio::time::timeout(WAIT, requests.next())
        .await
        .expect("a task request")
        .unwrap()
        .unwrap();
    let got = broker::header(&d.properties, HEADER).expect("the request carries traceparent");
    let got = TraceParent::parse(&got).expect("a valid traceparent");
    assert_eq!(got.trace_id, upstream.trace_id, "same trace as the command");
    assert_ne!(got.span_id, upstream.span_id, "its own span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answers_in_the_requests_trace() {
    let app = TestApp::spawn().await;
    app.start_agent(Arc::new(SimAgent::default()), &["run_security_scan"])
        .await;
    let ch = app.conn.create_channel().await.unwrap();
    let (reply_queue, mut replies) = private_reply_queue(&ch).await;
    let request = Envelope::new(
        AgentRef::orchestrator(),
        AgentRef::new("security-audit-agent", "tests"),
        MessageType::Request,
        "run_security_scan",
        json!({"environment_id": "env-1"}),
        Utc::now(),
    )
    .with_correlation("corr-1");
    let trace = TraceParent::new_root();
    let publisher = Publisher::start(&app.conn).await.unwrap();
    publisher
        .publish(outgoing(&app, &request, Some(reply_queue.clone()), &trace))
        .await
        .unwrap();

    let d = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap();
    let got = TraceParent::parse(
        &broker::header(&d.properties, HEADER).expect("the reply carries traceparent"),
    )
    .unwrap();
    assert_eq!(got.trace_id, trace.trace_id);
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-1")
    );
}
