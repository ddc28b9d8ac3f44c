//! The dead-letter tooling (`journeyman dlq`), over the real broker: dead letters made by
//! the orchestrator (bad input, refusals) and by the broker (rejects, delivery limit).

use journeyman::wire::names::PartitionQueue;
use std::collections::BTreeMap;
use std::time::Duration;

use journeyman::agent::sim::SimAgent;
use journeyman::broker::{self, Outgoing, Publisher};
use journeyman::ops::dlq::{
    DeadLetteredBy, Dlq, DlqError, Filter, ReplayOptions, Selector, derived_id,
};
use journeyman::wire::protocol::{ClientPayload, Command};
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicRejectOptions};
use serde_json::{Value, json};
use std::sync::Arc;

use crate::helpers::*;

/// Waits until the dead-letter queue holds exactly `n` messages.
async fn wait_dead_letters(app: &TestApp, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = app.dead_letter_count().await;
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} dead letters, the queue holds {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn no_progress() -> impl FnMut(usize, usize) {
    |_, _| {}
}

/// Bad input and refused commands, dead-lettered by the orchestrator: four of them.
async fn make_dead_letters(app: &TestApp) -> (String, String) {
    app.publish_raw(
        "journey.start",
        b"{not json",
        Some("00000000-0000-4000-8000-000000000001"),
    )
    .await;
    let invalid = TestApp::command("journey.start", json!({"client": "acme"}));
    app.send(&invalid).await;
    wait_dead_letters(app, 2).await;
    let evidence = TestApp::command(
        "journey.evidence",
        json!({"client_id": "ghost", "metrics": {"dlq.replayed": 0.42}}),
    );
    app.send(&evidence).await;
    wait_dead_letters(app, 3).await;
    let promote = TestApp::command("journey.promote", json!({"client_id": "ghost"}));
    app.send(&promote).await;
    wait_dead_letters(app, 4).await;
    (
        evidence.message_id.to_string(),
        promote.message_id.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_stats_and_show_read_without_consuming_or_reordering() {
    let app = TestApp::spawn().await;
    let (evidence_id, promote_id) = make_dead_letters(&app).await;
    let dlq = Dlq::new(&app.conn, app.names.clone());

    let all = dlq.list(&Filter::default()).await.unwrap();
    let reasons: Vec<&str> = all.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["malformed_json", "schema_invalid", "not_found", "not_found"],
        "queue order is dead-lettering order"
    );
    assert_eq!(all[2].id, evidence_id);
    assert_eq!(all[3].id, promote_id);
    assert_eq!(all[0].id, "00000000-0000-4000-8000-000000000001");
    let ev = &all[2];
    assert_eq!(ev.dead_lettered_by, DeadLetteredBy::Journeyman);
    assert_eq!(ev.original_exchange, app.names.intents());
    assert_eq!(ev.original_routing_key, "journey.evidence");
    assert_eq!(
        ev.original_queue,
        app.names.partition_queue(0, PartitionQueue::Commands)
    );
    assert_eq!(ev.client_id.as_deref(), Some("ghost"));
    assert_eq!(ev.attempts, 1);
    assert!(ev.failed_at.is_some() && ev.first_failed_at.is_some());
    assert!(ev.reason_message.contains("ghost"));

    // Reading changed nothing: same count, same order, again and again.
    assert_eq!(app.dead_letter_count().await, 4);
    for _ in 0..3 {
        let again = dlq.list(&Filter::default()).await.unwrap();
        let ids: Vec<&str> = again.iter().map(|d| d.id.as_str()).collect();
        let before: Vec<&str> = all.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, before, "a read does not reorder");
        wait_dead_letters(&app, 4).await;
    }

    let by = |reason: Option<&str>, intent: Option<&str>, client: Option<&str>| Filter {
        reason: reason.map(str::to_string),
        intent: intent.map(str::to_string),
        client: client.map(str::to_string),
    };
    assert_eq!(
        dlq.list(&by(Some("not_found"), None, None))
            .await
            .unwrap()
            .len(),
        2
    );
    let only = dlq
        .list(&by(None, Some("journey.promote"), None))
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].id, promote_id);
    assert_eq!(
        dlq.list(&by(None, None, Some("ghost")))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        dlq.list(&by(Some("not_found"), Some("journey.start"), None))
            .await
            .unwrap()
            .is_empty()
    );

    let stats = dlq.stats().await.unwrap();
    assert_eq!(stats.total, 4);
    assert_eq!(
        stats.by_reason,
        BTreeMap::from([
            ("malformed_json".to_string(), 1),
            ("not_found".to_string(), 2),
            ("schema_invalid".to_string(), 1)
        ])
    );
    assert_eq!(
        stats.by_intent,
        BTreeMap::from([
            ("journey.evidence".to_string(), 1),
            ("journey.promote".to_string(), 1),
            ("journey.start".to_string(), 2)
        ])
    );

    let shown = dlq.show(&evidence_id).await.unwrap();
    assert_eq!(shown.len(), 1);
    let full = shown[0].to_full_json();
    assert_eq!(full["body"]["payload"]["metrics"]["dlq.replayed"], 0.42);
    assert_eq!(full["headers"]["x-journeyman-reason"], "not_found");
    assert_eq!(full["properties"]["message_id"], evidence_id.as_str());
    assert_eq!(full["properties"]["type"], "dead_letter");
    let malformed = dlq
        .show("00000000-0000-4000-8000-000000000001")
        .await
        .unwrap();
    assert_eq!(malformed[0].to_full_json()["body"]["text"], "{not json");
    match dlq.show("no-such-id").await {
        Err(DlqError::NotFound { id, .. }) => assert_eq!(id, "no-such-id"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    wait_dead_letters(&app, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_evidence_is_replayed_with_a_new_id_and_applied_once_the_journey_exists() {
    let mut app = TestApp::spawn().await;
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    let early = TestApp::command(
        "journey.evidence",
        json!({"client_id": "acme", "metrics": {"dlq.replayed": 0.42}}),
    );
    app.send(&early).await;
    wait_dead_letters(&app, 1).await;
    let to_edit = TestApp::command(
        "journey.evidence",
        json!({"client_id": "acme", "metrics": {"dlq.edited": 1.0}}),
    );
    app.send(&to_edit).await;
    wait_dead_letters(&app, 2).await;
    // The tool's own connection, as the CLI has.
    let conn = broker::connect(&app.url, "journeyman-dlq-test")
        .await
        .unwrap();
    let dlq = Dlq::new(&conn, app.names.clone());
    let id = early.message_id.to_string();
    let fast = ReplayOptions {
        rate: 100.0,
        ..Default::default()
    };

    // The orchestrator has seen this id: a same-id copy would be dropped, so it is
    // skipped, and stays.
    let r = dlq
        .replay(&Selector::Id(id.clone()), &fast, &mut no_progress())
        .await
        .unwrap();
    assert!(r.replayed.is_empty());
    assert_eq!(r.skipped.len(), 1);
    assert!(
        r.skipped[0].why.contains("--new-id"),
        "{}",
        r.skipped[0].why
    );
    wait_dead_letters(&app, 2).await;

    app.start_journey("acme").await;
    let dl = dlq.show(&id).await.unwrap().remove(0);
    let expected_id = derived_id(&dl, None);
    let opts = ReplayOptions {
        new_id: true,
        ..fast
    };
    let mut calls = Vec::new();
    let r = dlq
        .replay(&Selector::Id(id.clone()), &opts, &mut |d, t| {
            calls.push((d, t))
        })
        .await
        .unwrap();
    assert_eq!(calls, [(1, 1)]);
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    assert_eq!(r.replayed.len(), 1);
    assert_eq!(r.replayed[0].replayed_as, expected_id);
    assert_eq!(r.replayed[0].routing_key, "journey.evidence");
    assert_eq!(r.replayed[0].exchange, app.names.intents());

    // --edit replaces the payload of the copy.
    let edit = json!({"client_id": "acme", "metrics": {"dlq.edited": 2.0}});
    let r = dlq
        .replay(
            &Selector::Id(to_edit.message_id.to_string()),
            &ReplayOptions {
                edit: Some(edit.as_object().unwrap().clone()),
                ..opts.clone()
            },
            &mut no_progress(),
        )
        .await
        .unwrap();
    assert_eq!(r.replayed.len(), 1, "{:?}", r.skipped);
    assert!(r.replayed[0].edited);

    // Applied: the metrics show in the journey's evidence, and nothing new is refused.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = app
            .request(&Command::Status(ClientPayload {
                client_id: "acme".into(),
            }))
            .await;
        let v = &st.payload["evidence"]["metrics"]["dlq.replayed"];
        let edited = &st.payload["evidence"]["metrics"]["dlq.edited"]["value"];
        if v["value"] == json!(0.42) && *edited == json!(2.0) {
            assert_eq!(
                v["message_id"],
                expected_id.as_str(),
                "applied from the copy"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replayed evidence was not applied: {}",
            st.payload["evidence"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_dead_letters(&app, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_reason_id_and_age_removes_only_those() {
    let app = TestApp::spawn().await;
    let (evidence_id, _) = make_dead_letters(&app).await;
    let dlq = Dlq::new(&app.conn, app.names.clone());

    // Nothing is that old.
    let r = dlq
        .purge(
            &Selector::OlderThan(Duration::from_secs(3600)),
            &mut no_progress(),
        )
        .await
        .unwrap();
    assert!(r.purged.is_empty());
    wait_dead_letters(&app, 4).await;

    let mut calls = Vec::new();
    let r = dlq
        .purge(&Selector::Reason("not_found".into()), &mut |d, t| {
            calls.push((d, t))
        })
        .await
        .unwrap();
    assert_eq!(r.purged.len(), 2);
    assert!(r.purged.contains(&evidence_id));
    assert_eq!(calls, [(1, 2), (2, 2)]);
    wait_dead_letters(&app, 2).await;
    let left: Vec<String> = dlq
        .list(&Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(left, ["malformed_json", "schema_invalid"]);

    let r = dlq
        .purge(
            &Selector::Id("00000000-0000-4000-8000-000000000001".into()),
            &mut no_progress(),
        )
        .await
        .unwrap();
    assert_eq!(r.purged.len(), 1);
    wait_dead_letters(&app, 1).await;
    assert!(matches!(
        dlq.purge(&Selector::Id(evidence_id), &mut no_progress())
            .await,
        Err(DlqError::NotFound { .. })
    ));
    // Older than zero: everything left.
    let r = dlq
        .purge(&Selector::OlderThan(Duration::ZERO), &mut no_progress())
        .await
        .unwrap();
    assert_eq!(r.purged.len(), 1);
    wait_dead_letters(&app, 0).await;
}

/// The broker's own dead letters (x-death) show as `rejected` / `delivery_limit` with
/// their origin from x-death, and replay with their id to where they came from; a failed
/// unit of work's record is refused with what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_letters_replay_with_their_id_and_records_are_refused() {
    let app = TestApp::spawn().await;
    let ch = app.conn.create_channel().await.unwrap();
    // A task queue of the playbook that nobody consumes here (no agents), declared like
    // every work queue (delivery limit 20); the app deletes it with the namespace.
    let intent = app.playbook.intents().into_iter().next().unwrap();
    let intent = intent.as_str();
    let queue = app.names.intent_queue(intent);
    broker::declare_queue(&ch, &app.names, &queue, Some(intent))
        .await
        .unwrap();
    let publisher = Publisher::start(&app.conn).await.unwrap();
    let task = |id: &str| Outgoing {
        exchange: app.names.intents(),
        routing_key: intent.into(),
        mandatory: true,
        message_id: id.into(),
        correlation_id: Some(format!("corr-{id}")),
        reply_to: Some(app.names.partition_queue(0, PartitionQueue::Replies)),
        message_type: "request".into(),
        headers: vec![("x-journeyman-client-id".into(), "acme".into())],
        body: br#"{"hello": "agent"}"#.to_vec(),
    };
    publisher.publish(task("rejected-1")).await.unwrap();
    publisher.publish(task("poison-1")).await.unwrap();

    // A consumer rejects the first (requeue=false): the queue dead-letters it.
    let get = |ch: lapin::Channel, q: String| async move {
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message")
            .delivery
    };
    let d = get(ch.clone(), queue.clone()).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        "rejected-1"
    );
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // The second crashes its consumer every time, past the delivery limit.
    for _ in 0..=broker::DELIVERY_LIMIT {
        let d = get(ch.clone(), queue.clone()).await;
        d.acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
    }
    wait_dead_letters(&app, 2).await;

    // And a record of a failed unit of work, as the orchestrator publishes it.
    publisher
        .publish(Outgoing {
            exchange: app.names.dlx(),
            routing_key: "work.failed.sandbox".into(),
            mandatory: false,
            message_id: "record-1".into(),
            correlation_id: None,
            reply_to: None,
            message_type: "dead_letter".into(),
            headers: vec![
                ("x-journeyman-reason".into(), "task_failed".into()),
                ("x-journeyman-reason-message".into(), "boom".into()),
                ("x-journeyman-original-exchange".into(), "".into()),
                (
                    "x-journeyman-original-routing-key".into(),
                    "work.failed.sandbox".into(),
                ),
                ("x-journeyman-original-queue".into(), "".into()),
                ("x-journeyman-attempts".into(), "1".into()),
                ("x-journeyman-client-id".into(), "acme".into()),
            ],
            body: br#"{"client_id": "acme", "stage": "sandbox", "work": null}"#.to_vec(),
        })
        .await
        .unwrap();
    wait_dead_letters(&app, 3).await;

    let dlq = Dlq::new(&app.conn, app.names.clone());
    let all = dlq.list(&Filter::default()).await.unwrap();
    let reasons: Vec<&str> = all.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, ["rejected", "delivery_limit", "task_failed"]);
    for d in &all[..2] {
        assert_eq!(d.dead_lettered_by, DeadLetteredBy::Broker);
        assert_eq!(d.original_exchange, app.names.intents());
        assert_eq!(d.original_routing_key, intent);
        assert_eq!(d.original_queue, queue);
        assert_eq!(d.client_id.as_deref(), Some("acme"));
        assert!(d.failed_at.is_some());
    }
    assert!(all[2].is_record());

    let fast = ReplayOptions {
        rate: 100.0,
        ..Default::default()
    };
    let r = dlq
        .replay(&Selector::Id("record-1".into()), &fast, &mut no_progress())
        .await
        .unwrap();
    assert!(r.replayed.is_empty());
    assert!(
        r.skipped[0].why.contains("journeyman journey resume acme"),
        "{}",
        r.skipped[0].why
    );

    // Replay everything: the two broker dead letters go back to their queue with their
    // ids and properties, the record stays.
    // At 4/s the second copy goes out a quarter of a second after the first.
    let started = std::time::Instant::now();
    let throttled = ReplayOptions {
        rate: 4.0,
        ..Default::default()
    };
    let r = dlq
        .replay(&Selector::All, &throttled, &mut no_progress())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(240), "throttled");
    let ids: Vec<&str> = r.replayed.iter().map(|x| x.replayed_as.as_str()).collect();
    assert_eq!(ids, ["rejected-1", "poison-1"]);
    assert_eq!(r.skipped.len(), 1);
    wait_dead_letters(&app, 1).await;
    for want in ["rejected-1", "poison-1"] {
        let d = get(ch.clone(), queue.clone()).await;
        let p = &d.properties;
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), want);
        assert_eq!(
            p.correlation_id().as_ref().unwrap().as_str(),
            format!("corr-{want}")
        );
        assert_eq!(
            p.reply_to().as_ref().unwrap().as_str(),
            app.names.partition_queue(0, PartitionQueue::Replies)
        );
        assert_eq!(d.data, br#"{"hello": "agent"}"#);
        assert_eq!(
            broker::header(p, "x-journeyman-client-id").as_deref(),
            Some("acme")
        );
        assert!(broker::header(p, "x-journeyman-replayed-at").is_some());
        let attempts: u64 = broker::header(p, "x-journeyman-attempts")
            .unwrap()
            .parse()
            .unwrap();
        assert!(attempts >= 2, "attempts bumped: {attempts}");
        assert!(broker::header(p, "x-death").is_none(), "x-death dropped");
        d.acker.ack(Default::default()).await.unwrap();
    }
}

/// The binary: `dlq list --json`, `dlq stats --json`, and a purge refused without
/// `--yes` when nobody is at a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_command_lists_and_refuses_to_purge_unconfirmed() {
    let app = TestApp::spawn().await;
    make_dead_letters(&app).await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args(["--namespace", &app.names.namespace, "dlq"])
            .args(args)
            .env("JOURNEYMAN_AMQP_URL", &app.url)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&["list", "--json", "--reason", "not_found"]);
    assert!(ok, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["reason"], "not_found");
    let (ok, stdout, stderr) = run(&["stats", "--json"]);
    assert!(ok, "{stderr}");
    let stats: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["by_reason"]["not_found"], 2);
    let (ok, stdout, stderr) = run(&["list"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("4 dead letter(s)"), "{stdout}");

    let (ok, _, stderr) = run(&["purge", "--reason", "not_found"]);
    assert!(!ok);
    assert!(stderr.contains("--yes"), "{stderr}");
    wait_dead_letters(&app, 4).await;
    let (ok, _, stderr) = run(&["replay", "--reason", "not_found", "--yes"]);
    assert!(!ok, "skipped messages fail the command");
    assert!(stderr.contains("--new-id"), "{stderr}");
    wait_dead_letters(&app, 4).await;
    let (ok, stdout, stderr) = run(&["purge", "--reason", "not_found", "--yes"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("purged 2"), "{stdout}");
    wait_dead_letters(&app, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_refused_again_keeps_its_failure_history() {
    let app = TestApp::spawn().await;
    let orphan = TestApp::command(
        "journey.evidence",
        json!({"client_id": "nobody", "metrics": {"x": 1.0}}),
    );
    app.send(&orphan).await;
    wait_dead_letters(&app, 1).await;
    let conn = broker::connect(&app.url, "journeyman-dlq-test")
        .await
        .unwrap();
    let dlq = Dlq::new(&conn, app.names.clone());
    let first = dlq
        .show(&orphan.message_id.to_string())
        .await
        .unwrap()
        .remove(0);
    let opts = ReplayOptions {
        rate: 100.0,
        new_id: true,
        ..Default::default()
    };
    let r = dlq
        .replay(&Selector::Id(first.id.clone()), &opts, &mut no_progress())
        .await
        .unwrap();
    assert_eq!(r.replayed.len(), 1);
    // Still no such journey: refused again, and the new dead letter continues the count.
    wait_dead_letters(&app, 1).await;
    let again = dlq.list(&Default::default()).await.unwrap();
    assert_eq!(again.len(), 1);
    let again = &again[0];
    assert_eq!(again.reason, "not_found");
    assert_ne!(again.id, first.id, "{again:?}");
    assert_eq!(again.attempts, first.attempts + 1);
    assert_eq!(
        again.first_failed_at,
        first.first_failed_at.or(first.failed_at)
    );
}

/// Nothing secret prints: a command refused for its token is dead-lettered with that
/// token in its body, and neither `dlq show` (text, `--json`), `dlq list --json`, the
/// JSON API nor the dashboard shows it; they show `<redacted: N bytes, kid K>` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_surface_prints_a_dead_letters_token() {
    use journeyman::wire::auth::{self, Guard, Key, Keyring, Policy, Signer};
    let mut app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::Manual,
    )
    .await;
    let orch = Key::generate("orch", "journey-orchestrator").unwrap();
    let ring = Arc::new(Keyring::own_and_public(&orch, &[]).unwrap());
    let signer = Signer::new(orch, "journey-orchestrator").unwrap();
    app.start_orchestrator_with(|c| c.auth = Some((Guard::new(ring, Policy::default()), signer)));
    // Signed with a key the orchestrator does not know: refused, token and all.
    let stranger = Key::generate("stranger-1", "mallory").unwrap();
    let token = auth::mint(
        &stranger,
        "mallory",
        &[],
        chrono::Utc::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut cmd = TestApp::command("journey.start", json!({"client_id": "acme"}));
    cmd.source_agent.agent_id = "mallory".into();
    let cmd = cmd.with_auth_token(token.clone());
    app.send(&cmd).await;
    wait_dead_letters(&app, 1).await;
    let signature = token.rsplit('.').next().unwrap().to_string();
    let leaks = |shown: &str| shown.contains(&token) || shown.contains(&signature);

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
            .args(["--namespace", &app.names.namespace, "dlq"])
            .args(args)
            .env("JOURNEYMAN_AMQP_URL", &app.url)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let id = cmd.message_id.to_string();
    let text = run(&["show", &id]);
    assert!(text.contains("reason:         unauthenticated"), "{text}");
    assert!(
        text.contains("<redacted: ") && text.contains("kid stranger-1"),
        "{text}"
    );
    assert!(!leaks(&text), "dlq show prints the token:\n{text}");
    let json_text = run(&["show", &id, "--json"]);
    assert!(
        !leaks(&json_text),
        "dlq show --json prints the token:\n{json_text}"
    );
    let shown: Value = serde_json::from_str(&json_text).unwrap();
    assert!(
        shown["body"]["security"]["auth_token"]
            .as_str()
            .unwrap()
            .starts_with("<redacted: "),
        "{shown}"
    );
    let listed = run(&["list", "--json"]);
    assert!(!leaks(&listed), "{listed}");

    let c = journeyman::ops::client::Client::new(app.http_addr().await, Duration::from_secs(10));
    let api: Vec<Value> = c.get("/api/dead-letters").await.unwrap();
    assert_eq!(api.len(), 1);
    assert!(!leaks(&serde_json::to_string(&api).unwrap()), "{api:?}");
    let (_, page) = c.raw("/").await.unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(!leaks(&page), "the dashboard prints the token");
    app.stop_orchestrator().await.unwrap();
}

/// The log surface: a refused message whose error quotes what the sender wrote (here a
/// token where the schema wants an object) is logged with the token redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_log_line_does_not_print_a_token() {
    let app = TestApp::spawn_with(
        journeyman::domain::playbook::Playbook::default_playbook(),
        Mode::ChildProcess,
    )
    .await;
    let token =
        "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
    let mut cmd = TestApp::command("journey.start", json!({"client_id": "acme"}));
    cmd.payload["context"] = json!(token);
    let id = cmd.message_id.to_string();
    app.publish_raw("journey.start", &cmd.to_bytes(), Some(&id))
        .await;
    wait_dead_letters(&app, 1).await;
    let log = app.orchestrator_log();
    assert!(log.contains("refused message"), "{log}");
    assert!(
        log.contains("<redacted: "),
        "the quoted token is redacted: {log}"
    );
    assert!(!log.contains("c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"), "{log}");
}
