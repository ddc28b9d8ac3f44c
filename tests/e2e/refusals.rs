//! Every refusal answered (issue 14): a refused command with `reply_to` gets an `error`
//! reply with its code and what to do, and is not dead-lettered; the CLI prints the reason.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use journeyman::wire::auth::{self, Key, Keyring, Signer};
use journeyman::wire::protocol::{AgentRef, Decoder, Envelope, MessageType};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use serde_json::json;

use crate::helpers::*;

/// Publishes `body` as a command on `routing_key` with a private `reply_to`, and returns
/// the answer.
async fn ask_raw(app: &TestApp, routing_key: &str, body: &[u8], message_id: &str) -> Envelope {
    let ch = app.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (reply_to, mut replies) = private_reply_queue(&ch).await;
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(message_id))
        .with_correlation_id(ShortString::from(message_id))
        .with_reply_to(ShortString::from(reply_to));
    let c = ch
        .basic_publish(
            app.names.intents().as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(c, Confirmation::Ack(None), "command routed");
    let d = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("an answer within the wait")
        .expect("reply consumer open")
        .expect("delivery");
    let _ = ch.close(200, "done".into()).await;
    Decoder::default().envelope(&d.data).unwrap()
}

fn code(reply: &Envelope) -> &str {
    assert_eq!(reply.message_type, MessageType::Error, "{}", reply.payload);
    reply.payload["code"].as_str().unwrap()
}

/// `journeyman <args>` against the test's namespace: (success, stdout, stderr).
fn cli(app: &TestApp, args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"));
    cmd.args(["--namespace", &app.names.namespace])
        .args(args)
        .env("JOURNEYMAN_AMQP_URL", &app.url)
        .env_remove("JOURNEYMAN_KEYS")
        .env_remove("JOURNEYMAN_AUTH_TOKEN")
        .stdin(std::process::Stdio::null());
    if let Some(t) = token {
        cmd.env("JOURNEYMAN_AUTH_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_code_is_answered_and_none_is_dead_lettered() {
    let orch_key = Key::generate("orch", AgentRef::orchestrator().agent_id).unwrap();
    let key = Key::generate("k1", "test-upstream").unwrap();
    let ring = Arc::new(Keyring::own_and_public(&orch_key, &[&key]).unwrap());
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let guard = auth::Guard::new(ring.clone(), auth::Policy::default());
    let orchestrator = Signer::new(orch_key.clone(), AgentRef::orchestrator().agent_id).unwrap();
    app.start_orchestrator_with(|c| c.auth = Some((guard, orchestrator)));
    // No agents: the journey's work waits, so a promote is not_ready.
    let upstream = Signer::new(key.clone(), "test-upstream").unwrap();
    let signed =
        |intent: &str, payload| upstream.sign(TestApp::command(intent, payload), Utc::now());

    // Undecodable: not JSON, and JSON nested deeper than the decoder follows.
    let r = ask_raw(&app, "journey.start", b"{not json", "bad-json").await;
    assert_eq!(code(&r), "malformed_json");
    assert_eq!(r.correlation_id.as_deref(), Some("bad-json"));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let r = ask_raw(&app, "journey.start", deep.as_bytes(), "deep").await;
    assert_eq!(code(&r), "too_deep");

    // Unauthenticated: no token, and a token from another key. Never echoed.
    let unsigned = TestApp::command("journey.start", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.start", &unsigned.to_bytes(), "unsigned").await;
    assert_eq!(code(&r), "unauthenticated");
    assert!(r.payload["message"].as_str().unwrap().contains("token"));
    // Same key id and subject, another key pair: the signature does not verify.
    let forger = Key::generate("k1", "test-upstream").unwrap();
    let forged = TestApp::command("journey.start", json!({"client_id": "acme"})).with_auth_token(
        auth::mint(
            &forger,
            "test-upstream",
            &[],
            Utc::now(),
            Duration::from_secs(60),
        )
        .unwrap(),
    );
    let r = ask_raw(&app, "journey.start", &forged.to_bytes(), "forged").await;
    assert_eq!(code(&r), "unauthenticated");
    assert!(
        !r.to_bytes()
            .windows(forged.security.auth_token.len())
            .any(|w| w == forged.security.auth_token.as_bytes()),
        "token echoed"
    );
    // The orchestrator's replies are signed, refusals included.
    auth::check_envelope(&ring, &r, Utc::now()).unwrap();

    // Schema: a client id the schema refuses.
    let bad = signed("journey.start", json!({"client_id": "bad client!"}));
    let r = ask_raw(&app, "journey.start", &bad.to_bytes(), "bad-client").await;
    assert_eq!(code(&r), "schema_invalid");
    assert!(
        r.payload["message"].as_str().unwrap().contains("client_id"),
        "{}",
        r.payload
    );

    // Journey refusals.
    let start = signed("journey.start", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.start", &start.to_bytes(), "start-1").await;
    assert_eq!(r.message_type, MessageType::Response, "{}", r.payload);
    let again = signed("journey.start", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.start", &again.to_bytes(), "start-2").await;
    assert_eq!(code(&r), "already_exists");
    let nobody = signed("journey.promote", json!({"client_id": "nobody"}));
    let r = ask_raw(&app, "journey.promote", &nobody.to_bytes(), "nobody").await;
    assert_eq!(code(&r), "not_found");
    let promote = signed("journey.promote", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.promote", &promote.to_bytes(), "promote").await;
    assert!(
        matches!(code(&r), "not_ready" | "gate_failed"),
        "{}",
        r.payload
    );
    let complete = signed("journey.complete", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.complete", &complete.to_bytes(), "complete").await;
    assert_eq!(code(&r), "invalid_transition");
    let rb = signed(
        "journey.rollback",
        json!({"client_id": "acme", "reason": "x", "rollback_to": "production"}),
    );
    let r = ask_raw(&app, "journey.rollback", &rb.to_bytes(), "rollback").await;
    assert_eq!(code(&r), "invalid_rollback_target");

    // Forbidden: cancel needs the operator role.
    let cancel = signed("journey.cancel", json!({"client_id": "acme"}));
    let r = ask_raw(&app, "journey.cancel", &cancel.to_bytes(), "cancel").await;
    assert_eq!(code(&r), "forbidden");
    assert!(
        r.payload["message"].as_str().unwrap().contains("operator"),
        "{}",
        r.payload
    );

    // The CLI prints the reason, not "the orchestrator is not running".
    let no_role = auth::mint(
        &key,
        "test-upstream",
        &[],
        Utc::now(),
        Duration::from_secs(300),
    )
    .unwrap();
    let (ok, _, stderr) = cli(&app, &["journey", "start", "bad client!"], Some(&no_role));
    assert!(!ok);
    assert!(stderr.contains("schema_invalid"), "{stderr}");
    let (ok, _, stderr) = cli(&app, &["journey", "cancel", "acme"], Some(&no_role));
    assert!(!ok);
    assert!(stderr.contains("forbidden"), "{stderr}");

    // All answered: nothing in the dead-letter queue.
    assert_eq!(app.dead_letter_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_without_topology_is_named_and_topology_delete_removes_one() {
    let app = TestApp::spawn().await;
    let ns = format!("{}-none", app.names.namespace);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(["--namespace", &ns, "journey", "status", "acme"])
        .env("JOURNEYMAN_AMQP_URL", &app.url)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("namespace '{ns}' has no topology"))
            && stderr.contains("journeyman topology declare"),
        "{stderr}"
    );

    // Declared, then deleted (confirmed with --yes; unconfirmed it refuses).
    let other = format!("{}-del", app.names.namespace);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args(["--namespace", &other, "topology"])
            .args(args)
            .env("JOURNEYMAN_AMQP_URL", &app.url)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    assert!(run(&["declare"]).status.success());
    let names = journeyman::broker::Names::new(other.clone());
    assert!(
        journeyman::broker::queue_len(&app.conn, &names.dead_letter())
            .await
            .is_ok()
    );
    assert!(!run(&["delete"]).status.success(), "not confirmed");
    let out = run(&["delete", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        journeyman::broker::queue_len(&app.conn, &names.dead_letter())
            .await
            .is_err(),
        "the dead-letter queue is gone"
    );
}
