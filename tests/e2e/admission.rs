//! Admission: a burst of `journey.start` commands is let in a few journeys at a time,
//! the rest waiting in their durable queue, and every journey still runs.

use std::sync::Arc;
use std::time::Duration;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::playbook::Playbook;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_starts_is_admitted_a_few_journeys_at_a_time() {
    const LIMIT: i64 = 2;
    const JOURNEYS: usize = 8;
    let mut app = TestApp::spawn_with(Playbook::default_playbook(), Mode::Manual).await;
    app.start_orchestrator_with(|c| {
        c.max_active_journeys = LIMIT as usize;
        c.policy.auto_promote = false;
    });
    app.start_agent_for_all(Arc::new(SimAgent {
        min_latency: Duration::from_millis(5),
        max_latency: Duration::from_millis(20),
        failure_rate: 0.0,
        duplicate_rate: 0.0,
    }))
    .await;
    // All at once, without waiting for any to start.
    for i in 0..JOURNEYS {
        let env = TestApp::command(
            "journey.start",
            serde_json::json!({"client_id": format!("burst-{i}"), "context": {"data_sources": ["drive"], "connectors": ["gdrive"]}}),
        );
        app.send(&env).await;
    }
    app.wait_events("every sandbox unit of work done", JOURNEYS, |p| {
        p["event"] == "work.completed"
    })
    .await;
    // Events leave in commit order: replaying them gives the running count at each step.
    let (mut running, mut peak) = (0i64, 0i64);
    for p in app.seen_events() {
        match p["event"].as_str() {
            Some("journey.started") => running += 1,
            Some("work.completed") => running -= 1,
            _ => {}
        }
        peak = peak.max(running);
    }
    assert_eq!(running, 0);
    assert_eq!(
        peak, LIMIT,
        "at most {LIMIT} journeys ran at once, and the places were used"
    );
    assert_eq!(app.dead_letter_count().await, 0);
}
