//! Delivers status cards to a dashboard webhook (DES-002 §7.2's Glean publisher, kept
//! generic: any URL that accepts a JSON POST with a bearer token).
//!
//! Cards are queued in the store in the same batch as the state change that made them, so
//! a card is never lost: this task posts them in order, retries with backoff while the
//! receiver fails, and removes each only after a 2xx. It never blocks the orchestrator,
//! which only queues. A card may be posted twice if the process dies between the 2xx and
//! the removal: receivers dedupe by `card_id` (also sent as `Idempotency-Key`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::store::Store;

/// A bearer token that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub token: Option<Secret>,
    /// Per request.
    pub timeout: Duration,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
}

/// Runs until the process ends: posts queued cards in order, waking on `wake`.
pub async fn deliver(
    store: Store,
    config: WebhookConfig,
    wake: Arc<Notify>,
    stats: Arc<WebhookStats>,
) {
    let client = match reqwest::Client::builder().timeout(config.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build the webhook HTTP client; cards stay queued");
            return;
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(60))
        .with_jitter()
        .without_max_times();
    loop {
        let batch = match store.cards(64) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read queued status cards");
                Vec::new()
            }
        };
        if batch.is_empty() {
            // Woken when cards are queued; the timeout is a safety net, not the mechanism.
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        for (seq, body) in batch {
            let mut delays = backoff.build();
            loop {
                let mut req = client
                    .post(&config.url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", seq.to_string())
                    .body(body.clone());
                if let Some(t) = &config.token {
                    req = req.bearer_auth(t.expose());
                }
                let outcome = req.send().await;
                match outcome {
                    Ok(r) if r.status().is_success() => {
                        if let Err(e) = store.remove_card(seq).await {
                            warn!(error = %e, "cannot remove a delivered card");
                        }
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                        debug!(card = seq, "status card delivered");
                        break;
                    }
                    other => {
                        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        let why = match other {
                            Ok(r) => format!("HTTP {}", r.status()),
                            Err(e) => e.without_url().to_string(),
                        };
                        let wait = delays.next().unwrap_or(Duration::from_secs(60));
                        warn!(card = seq, %why, retry_in = ?wait, "webhook delivery failed; the card stays queued");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}
