//! Authentication on the agent side: an agent given a keyring serves only task requests
//! that carry the orchestrator's token, dead-letters the rest with a reason, and goes on.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use journeyman::agent::{Agent, TaskError};
use journeyman::wire::auth::{self, Key, Keyring, Signer};
use journeyman::wire::protocol::{AgentRef, Decoder, Envelope, MessageType};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use serde_json::{Map, Value, json};

use crate::helpers::*;

/// Answers every task with its input.
struct Echo;

impl Agent for Echo {
    async fn handle(
        &self,
        _request: &Envelope,
        input: Map<String, Value>,
    ) -> Result<Map<String, Value>, TaskError> {
        Ok(input)
    }
}

fn task_request(source: &str, intent: &str, n: u32) -> Envelope {
    Envelope::new(
        AgentRef::new(source, "journeyman"),
        AgentRef::new("test-agent", "tests"),
        MessageType::Request,
        intent,
        json!({"n": n}),
        Utc::now(),
    )
    .with_correlation(format!("req-{n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_task_request_is_dead_lettered_and_the_next_valid_one_is_served() {
    let mut app = TestApp::spawn().await;
    let intent = app.playbook.intents().into_iter().next().unwrap();
    let key = Key::generate("test-2026").unwrap();
    let keyring = Arc::new(Keyring::new(vec![key.clone()]).unwrap());
    let (ring, signing) = (keyring.clone(), key.clone());
    let stats = app
        .start_agent_with(Arc::new(Echo), &[&intent], move |c| {
            c.keyring = Some(ring);
            c.signing_key = Some(signing);
        })
        .await;

    // Where the agent's replies go: a private queue of this test.
    let ch = app.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (reply_queue, mut replies) = private_reply_queue(&ch).await;
    let exchange = app.names.intents();
    let publish = |env: Envelope| {
        let ch = ch.clone();
        let (exchange, reply_to) = (exchange.clone(), reply_queue.clone());
        async move {
            let props = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(env.message_id.to_string()))
                .with_correlation_id(ShortString::from(env.reply_correlation()))
                .with_reply_to(ShortString::from(reply_to));
            let c = ch
                .basic_publish(
                    exchange.as_str().into(),
                    env.intent.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &env.to_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert_eq!(c, Confirmation::Ack(None), "task request routed");
        }
    };

    let orchestrator = AgentRef::orchestrator().agent_id;
    let now = Utc::now();
    let hour = Duration::from_secs(3600);
    // Forged: the orchestrator's name and key id, another secret.
    let forger = Key::new("test-2026", vec![7; 32]).unwrap();
    let forged = task_request(&orchestrator, &intent, 1).with_auth_token(auth::mint(
        &forger,
        &orchestrator,
        &[],
        now,
        hour,
    ));
    publish(forged.clone()).await;
    // Unsigned.
    publish(task_request(&orchestrator, &intent, 2)).await;
    // Validly signed, but by an agent that is not the orchestrator.
    let other = Signer::new(key.clone(), "some-agent");
    publish(other.sign(task_request("some-agent", &intent, 3), now)).await;
    // The orchestrator's token on a message claiming another sender.
    let stolen = task_request("some-agent", &intent, 4).with_auth_token(auth::mint(
        &key,
        &orchestrator,
        &[],
        now,
        hour,
    ));
    publish(stolen).await;

    let dls = app.dead_letters(4).await;
    let reasons: Vec<&str> = dls.iter().map(|d| d.reason()).collect();
    assert_eq!(
        reasons.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["unauthenticated", "forbidden"]),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "unauthenticated").count(),
        3
    );
    let messages: BTreeSet<&str> = dls
        .iter()
        .map(|d| d.headers["x-journeyman-reason-message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("bad signature")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("no auth token")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("does not match the token's subject")),
        "{messages:?}"
    );
    for m in &messages {
        assert!(
            !m.contains(&forged.security.auth_token),
            "token echoed: {m}"
        );
    }

    // The next valid request is served, and the reply is signed by the agent.
    let signer = Signer::new(key, orchestrator.clone());
    publish(signer.sign(task_request(&orchestrator, &intent, 5), Utc::now())).await;
    let d = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply within the wait")
        .expect("reply consumer open")
        .expect("delivery");
    let reply = Decoder::default().envelope(&d.data).unwrap();
    assert_eq!(reply.message_type, MessageType::Response);
    assert_eq!(reply.correlation_id.as_deref(), Some("req-5"));
    assert_eq!(reply.payload["output"]["n"], 5);
    let claims = auth::check_envelope(&keyring, &reply, Utc::now()).unwrap();
    assert_eq!(claims.sub, "test-agent");
    assert_eq!(stats.handled.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

/// The orchestrator side: unsigned commands are refused, signed ones applied, and the
/// task requests it signs are accepted by agents that check them (and sign their replies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_refuses_unsigned_commands_and_its_signed_requests_are_served() {
    let key = Key::generate("k1").unwrap();
    let ring = Arc::new(Keyring::new(vec![key.clone()]).unwrap());
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let guard = auth::Guard::new(ring.clone(), auth::Policy::default());
    let orchestrator = Signer::new(key.clone(), AgentRef::orchestrator().agent_id);
    app.start_orchestrator_with(|c| c.auth = Some((guard, orchestrator)));
    let config = journeyman::agent::AgentConfig {
        amqp_url: app.url.clone(),
        names: app.names.clone(),
        agent_id: "signed-agent".into(),
        intents: app.playbook.intents().into_iter().collect(),
        prefetch: 16,
        max_message_bytes: journeyman::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        keyring: Some(ring.clone()),
        signing_key: Some(key.clone()),
        shutdown_timeout: journeyman::agent::DEFAULT_SHUTDOWN_TIMEOUT,
    };
    let stats = Arc::new(journeyman::agent::AgentStats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let _ = journeyman::agent::run(
            config,
            Arc::new(journeyman::agent::sim::SimAgent::default()),
            st,
            std::future::pending(),
        )
        .await;
    });
    tokio::time::timeout(WAIT, stats.wait_ready())
        .await
        .unwrap();

    let unsigned = TestApp::command("journey.start", json!({"client_id": "mallory"}));
    app.send(&unsigned).await;
    let dl = app.dead_letters(1).await;
    assert_eq!(dl[0].reason(), "unauthenticated", "{:?}", dl[0].headers);

    let upstream = Signer::new(key.clone(), "test-upstream");
    let start = upstream.sign(
        TestApp::command("journey.start", json!({"client_id": "acme"})),
        Utc::now(),
    );
    app.send(&start).await;
    app.wait_event("acme started", |p| {
        p["event"] == "journey.started" && p["client_id"] == "acme"
    })
    .await;
    let evidence = upstream.sign(
        TestApp::command(
            "journey.evidence",
            json!({"client_id": "acme", "metrics": {"search.precision": 0.9}, "flags": {"demo.approved": true}}),
        ),
        Utc::now(),
    );
    app.send(&evidence).await;
    app.wait_in_production("acme").await;
    assert_eq!(app.dead_letter_count().await, 0, "nothing else was refused");
}
