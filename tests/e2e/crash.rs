//! Crash safety: the orchestrator is killed (SIGKILL) at each named crash point, restarted
//! on the same data directory, and every journey still finishes with every task dispatched
//! once (duplicates only ever carry the same message id) and no input applied twice.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::playbook::Playbook;
use journeyman::orchestrator::failpoint::POINTS;
use serde_json::json;

use crate::Recorder;
use crate::helpers::*;

/// How many times a point is passed before it fires: late enough that journeys are in
/// flight (the first commit stores the playbook at start-up).
fn nth(point: &str) -> [u32; 2] {
    match point {
        "before_commit" => [6, 25],
        "after_confirm_before_clear" => [8, 40],
        _ => [3, 10],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_is_safe() {
    for (point, n) in POINTS.iter().flat_map(|p| nth(p).map(|n| (*p, n))) {
        // Gates are not what this test is about: without them journeys run on their own,
        // so the crash lands wherever they are.
        let mut playbook = Playbook::default_playbook();
        for stage in playbook.stages.values_mut() {
            stage.exit_criteria.clear();
            stage.rollback_triggers.clear();
        }
        let mut app = TestApp::spawn_with(playbook, Mode::Manual).await;
        let rec = Recorder::new(SimAgent::default());
        app.start_agent_for_all(rec.clone()).await;
        let armed = format!("{point}:{n}");
        app.start_child_with(&[("JOURNEYMAN_FAILPOINT", &armed)])
            .await;
        let clients = ["k1", "k2", "k3", "k4"];
        for c in clients {
            let start = TestApp::command(
                "journey.start",
                json!({"client_id": c, "context": {"data_sources": ["drive"]}}),
            );
            app.send(&start).await;
        }
        let status = app.wait_child_exit().await;
        assert_eq!(
            status.signal(),
            Some(9),
            "{point}: killed by its crash point"
        );
        assert!(
            app.orchestrator_log()
                .contains(&format!("failpoint {point} reached")),
            "{point}"
        );

        // Restart on the same directory, without the crash point.
        app.start_child().await;
        for c in clients {
            app.wait_in_production(c).await;
        }
        eprintln!("{point}:{n}: all journeys finished after the crash");
        // Each task of each journey went out under exactly one correlation id.
        let mut expected: BTreeMap<String, usize> = BTreeMap::new();
        for stage in app.playbook.stages.values() {
            for t in &stage.tasks {
                *expected.entry(t.intent.clone()).or_default() += clients.len();
            }
        }
        for (intent, n) in expected {
            assert_eq!(
                rec.attempts(&intent).len(),
                n,
                "{point}: distinct attempts of {intent}"
            );
        }
        // No start was applied twice (that would be an already_exists refusal), nothing
        // was refused.
        assert_eq!(app.dead_letter_count().await, 0, "{point}: dead letters");
        let log = app.orchestrator_log();
        assert!(!log.contains("panicked"), "{point}: {log}");
    }
}
