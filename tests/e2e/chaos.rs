//! The short chaos run (the full one is `journeyman chaos`): journeys while the
//! orchestrator is killed repeatedly, agents fail 10 % of attempts and duplicate 1 % of
//! replies, and poison is mixed in. Nothing lost, nothing applied twice, and the dead
//! letters are exactly the poison.

use std::time::Duration;

use journeyman::ops::chaos::{ChaosConfig, run};

use crate::helpers::amqp_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_loses_nothing_and_applies_nothing_twice() {
    let report = run(ChaosConfig {
        amqp_url: amqp_url(),
        binary: env!("CARGO_BIN_EXE_journeyman").into(),
        journeys: 40,
        kills: 3,
        failure_rate: 0.1,
        duplicate_rate: 0.01,
        poison: 4,
        timeout: Duration::from_secs(120),
        broker_restart: None,
    })
    .await
    .expect("the chaos run completes");
    eprintln!("{}", report.line());
    assert_eq!(report.lost, 0);
    assert_eq!(report.applied_twice, 0);
    assert_eq!(report.unexpected_dead_letters, Vec::<String>::new());
    assert_eq!(report.dead_letters, report.poison);
    assert_eq!(report.kills, 3);
}
