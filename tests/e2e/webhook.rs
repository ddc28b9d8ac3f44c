//! Status cards reach a dashboard webhook (a real local HTTP server) in order, with the
//! bearer token, and none is lost while the receiver fails for a while.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::playbook::Playbook;
use journeyman::orchestrator::webhook::{Secret, WebhookConfig};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::helpers::*;

/// One POST as the receiver saw it.
struct Received {
    authorization: String,
    card: Value,
}

/// A minimal HTTP/1.1 server: answers 500 to the first `fail_first` requests, then 200.
async fn receiver(
    fail_first: usize,
) -> (String, mpsc::UnboundedReceiver<Received>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cards", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (tx, count) = (tx.clone(), count.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                let mut line = String::new();
                let (mut len, mut auth) = (0usize, String::new());
                r.read_line(&mut line).await.ok();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        auth = line["authorization:".len()..].trim().to_string();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).await.ok();
                let n = count.fetch_add(1, Ordering::SeqCst);
                let status = if n < fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                if n >= fail_first
                    && let Ok(card) = serde_json::from_slice(&body)
                {
                    let _ = tx.send(Received {
                        authorization: auth,
                        card,
                    });
                }
                let resp =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = r.get_mut().write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, rx, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cards_reach_the_webhook_in_order_despite_failures() {
    let (url, mut cards, requests) = receiver(3).await;
    let mut app = TestApp::spawn_with(Playbook::default_playbook(), Mode::Manual).await;
    app.start_orchestrator_with(|c| {
        c.webhook = Some(WebhookConfig {
            url,
            token: Some(Secret::new("t0k3n")),
            timeout: Duration::from_secs(5),
        })
    });
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;
    let last = app
        .wait_event("the live card", |p| {
            p["event"] == "dashboard.status_card" && p["detail"]["status"] == "live"
        })
        .await;

    // The webhook gets every card, in order, once the receiver recovers (events are
    // coalesced per round; the webhook is not): up to the live one.
    let mut delivered = Vec::new();
    loop {
        let r = tokio::time::timeout(WAIT, cards.recv())
            .await
            .expect("cards keep arriving")
            .expect("receiver open");
        assert_eq!(r.authorization, "Bearer t0k3n");
        assert_eq!(r.card["client_id"], "acme");
        delivered.push(r.card["card_id"].as_u64().unwrap());
        if r.card["status"] == "live" {
            break;
        }
    }
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "in order: {delivered:?}"
    );
    // One card per change: at least one per task of the three stages.
    assert!(
        delivered.len() >= 12,
        "every change has its card: {delivered:?}"
    );
    assert!(
        requests.load(Ordering::SeqCst) >= delivered.len() + 3,
        "the first 3 posts failed and were retried"
    );
    assert!(Stats::get(&app.stats.webhook.failed_attempts) >= 3);
    let card = &last["detail"];
    assert_eq!(card["current_stage"], "production");
    assert_eq!(card["progress"]["percent"], 100);
    assert!(card["recent_activities"].as_array().unwrap().len() <= 5);
}

use journeyman::orchestrator::Stats;
