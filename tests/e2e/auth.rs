//! Authentication with a key pair per sender. The agent side: an agent given a registry
//! serves only task requests signed with the orchestrator's private key, dead-letters the
//! rest with a reason, and goes on. The orchestrator side: commands are checked against
//! the registry, and a key cannot grant itself a role (`journeyman token issue --role
//! operator` with an agent's key is refused as `forbidden`).

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
    let orchestrator = AgentRef::orchestrator().agent_id;
    let orch_key = Key::generate("orch-2026", orchestrator.clone()).unwrap();
    let agent_key = Key::generate("test-agent-2026", "test-agent").unwrap();
    let other_key = Key::generate("some-agent-2026", "some-agent").unwrap();
    // The agent holds its own private key and the others' public keys only.
    let keyring = Arc::new(Keyring::own_and_public(&agent_key, &[&orch_key, &other_key]).unwrap());
    let (ring, signing) = (keyring.clone(), agent_key.clone());
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

    let now = Utc::now();
    let hour = Duration::from_secs(3600);
    // Forged: the orchestrator's name and key id, another key pair.
    let forger = Key::generate("orch-2026", orchestrator.clone()).unwrap();
    let forged = task_request(&orchestrator, &intent, 1)
        .with_auth_token(auth::mint(&forger, &orchestrator, &[], now, hour).unwrap());
    publish(forged.clone()).await;
    // Unsigned.
    publish(task_request(&orchestrator, &intent, 2)).await;
    // Validly signed, but by an agent (its own key) that is not the orchestrator.
    let other = Signer::new(other_key.clone(), "some-agent").unwrap();
    publish(other.sign(task_request("some-agent", &intent, 3), now)).await;
    // The orchestrator's token on a message claiming another sender.
    let stolen = task_request("some-agent", &intent, 4)
        .with_auth_token(auth::mint(&orch_key, &orchestrator, &[], now, hour).unwrap());
    publish(stolen).await;
    // An agent's key naming the orchestrator as its subject: the key is bound to the agent.
    let impersonation = task_request(&orchestrator, &intent, 5)
        .with_auth_token(auth::mint(&other_key, &orchestrator, &[], now, hour).unwrap());
    publish(impersonation).await;
    // An agent's key claiming the orchestrator role: the registry does not grant it.
    let claims_role = task_request("some-agent", &intent, 6).with_auth_token(
        auth::mint(
            &other_key,
            "some-agent",
            &[auth::ORCHESTRATOR_ROLE.into()],
            now,
            hour,
        )
        .unwrap(),
    );
    publish(claims_role).await;

    let dls = app.dead_letters(6).await;
    let reasons: Vec<&str> = dls.iter().map(|d| d.reason()).collect();
    assert_eq!(
        reasons.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["unauthenticated", "forbidden"]),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "unauthenticated").count(),
        4
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
    assert!(
        messages
            .iter()
            .any(|m| m.contains("is for agent 'some-agent'")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("does not grant")),
        "{messages:?}"
    );
    for m in &messages {
        assert!(
            !m.contains(&forged.security.auth_token),
            "token echoed: {m}"
        );
    }

    // The next valid request is served, and the reply is signed by the agent.
    let signer = Signer::new(orch_key.clone(), orchestrator.clone()).unwrap();
    publish(signer.sign(task_request(&orchestrator, &intent, 7), Utc::now())).await;
    let d = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("a reply within the wait")
        .expect("reply consumer open")
        .expect("delivery");
    let reply = Decoder::default().envelope(&d.data).unwrap();
    assert_eq!(reply.message_type, MessageType::Response);
    assert_eq!(reply.correlation_id.as_deref(), Some("req-7"));
    assert_eq!(reply.payload["output"]["n"], 7);
    // As the orchestrator verifies it: with the agent's public key.
    let orch_registry = Keyring::own_and_public(&orch_key, &[&agent_key]).unwrap();
    let claims = auth::check_envelope(&orch_registry, &reply, Utc::now()).unwrap();
    assert_eq!(claims.sub, "test-agent");
    assert_eq!(stats.handled.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
}

/// The orchestrator side: unsigned commands are refused, signed ones applied, and the
/// task requests it signs are accepted by agents that check them (and sign their replies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_refuses_unsigned_commands_and_its_signed_requests_are_served() {
    let orch_key = Key::generate("orch", AgentRef::orchestrator().agent_id).unwrap();
    let agent_key = Key::generate("agent", "signed-agent").unwrap();
    let upstream_key = Key::generate("upstream", "test-upstream").unwrap();
    let ring = Arc::new(Keyring::own_and_public(&orch_key, &[&agent_key, &upstream_key]).unwrap());
    let agent_ring = Arc::new(Keyring::own_and_public(&agent_key, &[&orch_key]).unwrap());
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let guard = auth::Guard::new(ring.clone(), auth::Policy::default());
    let orchestrator = Signer::new(orch_key.clone(), AgentRef::orchestrator().agent_id).unwrap();
    app.start_orchestrator_with(|c| c.auth = Some((guard, orchestrator)));
    let config = journeyman::agent::AgentConfig {
        amqp_url: app.url.clone(),
        names: app.names.clone(),
        agent_id: "signed-agent".into(),
        intents: app.playbook.intents().into_iter().collect(),
        prefetch: 16,
        max_message_bytes: journeyman::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
        keyring: Some(agent_ring),
        signing_key: Some(agent_key.clone()),
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

    let upstream = Signer::new(upstream_key.clone(), "test-upstream").unwrap();
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

/// The attack of issue 13: an agent's own key, given to `journeyman token issue --role
/// operator`, makes a token the orchestrator refuses as `forbidden`; the journey it tried
/// to cancel goes on. The key pair comes from `journeyman token keygen`, as deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_key_cannot_grant_itself_operator() {
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("agent-x.key");
    let url = app.url.clone();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args(args)
            .env_remove(auth::KEYS_ENV)
            .env_remove(auth::KEYS_FILE_ENV)
            .env_remove(auth::PRIVATE_KEY_FILE_ENV)
            .env_remove("JOURNEYMAN_AUTH_TOKEN")
            .env("JOURNEYMAN_AMQP_URL", &url)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "token",
        "keygen",
        "--kid",
        "agent-x-1",
        "--sub",
        "agent-x",
        "--out",
        private.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is the owner's only");
    }
    let public_line = String::from_utf8(out.stdout).unwrap();
    assert!(!public_line.contains("private"), "{public_line}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("agent-x.key.pub")).unwrap(),
        public_line
    );
    let agent_public = Keyring::parse(&public_line).unwrap();
    let agent_public = agent_public.get("agent-x-1").unwrap();
    assert!(!agent_public.can_sign());

    let orch_key = Key::generate("orch", AgentRef::orchestrator().agent_id).unwrap();
    let upstream_key = Key::generate("upstream", "test-upstream").unwrap();
    let ring =
        Arc::new(Keyring::own_and_public(&orch_key, &[agent_public, &upstream_key]).unwrap());
    let guard = auth::Guard::new(ring, auth::Policy::default());
    let signer = Signer::new(orch_key, AgentRef::orchestrator().agent_id).unwrap();
    app.start_orchestrator_with(|c| c.auth = Some((guard, signer)));
    let upstream = Signer::new(upstream_key, "test-upstream").unwrap();
    app.send(&upstream.sign(
        TestApp::command("journey.start", json!({"client_id": "acme"})),
        Utc::now(),
    ))
    .await;
    app.wait_event("acme started", |p| {
        p["event"] == "journey.started" && p["client_id"] == "acme"
    })
    .await;

    let out = cli(&[
        "token",
        "issue",
        "--role",
        "operator",
        "--ttl",
        "5m",
        "--auth-private-key-file",
        private.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(auth::unverified_subject(&token).as_deref(), Some("agent-x"));
    let out = cli(&[
        "--namespace",
        &app.names.namespace,
        "--auth-token",
        &token,
        "journey",
        "cancel",
        "acme",
        "--timeout",
        "3s",
    ]);
    assert!(!out.status.success(), "the cancel was not accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(&token),
        "the token is not printed: {stderr}"
    );
    // The CLI asked for an answer, so the refusal is answered, not dead-lettered.
    assert!(stderr.contains("forbidden"), "{stderr}");
    assert!(stderr.contains("does not grant"), "{stderr}");
    let status = journeyman::ops::cli::request_as(
        &app.conn,
        &app.names,
        &journeyman::wire::protocol::Command::Status(journeyman::wire::protocol::ClientPayload {
            client_id: "acme".into(),
        }),
        WAIT,
        AgentRef::new("test-upstream", "tests"),
        Some(upstream.token(Utc::now())),
    )
    .await
    .expect("the orchestrator answers a signed status request");
    assert_ne!(status.payload["stage"], "cancelled", "{}", status.payload);
    assert_ne!(status.payload["state"], "cancelled", "{}", status.payload);
}
