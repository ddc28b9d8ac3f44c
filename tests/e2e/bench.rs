//! `journeyman bench` end to end: a small run of every part as a child process against the
//! shared broker. It must report positive numbers for each part and leave nothing behind
//! in the broker. (It reports targets; it asserts no timings.)

use std::time::Duration;

use journeyman::broker;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::helpers::amqp_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_every_part_and_deletes_its_namespaces() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(["bench", "--journeys", "40", "--concurrency", "20", "--json"])
        .args(["--timeout", "120s", "--stall-timeout", "60s"])
        .env("JOURNEYMAN_AMQP_URL", amqp_url())
        .env_remove("JOURNEYMAN_NAMESPACE")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the bench finishes within 3 minutes")
        .expect("the bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));

    let rows = report["rows"].as_array().expect("rows");
    let parts: Vec<&str> = rows.iter().map(|r| r["part"].as_str().unwrap()).collect();
    assert_eq!(
        parts,
        [
            "broker limit",
            "orchestrator chain",
            "orchestrator parallel"
        ]
    );
    let positive = |r: &Value, path: &[&str]| {
        let v = path.iter().fold(r, |v, k| &v[*k]);
        assert!(
            v.as_f64().is_some_and(|x| x > 0.0),
            "{} {path:?} = {v} in {report}",
            r["part"]
        );
    };
    for r in rows {
        assert_eq!(r["journeys"], 40);
        assert_eq!(r["tasks"], 160, "{r}");
        for path in [
            &["tasks_per_s"][..],
            &["journeys_per_s"],
            &["round_trip", "p50_ms"],
            &["round_trip", "p99_ms"],
            &["round_trip", "p999_ms"],
            &["cpu_s_per_1k_tasks"],
            &["peak_rss_mib"],
        ] {
            positive(r, path);
        }
    }
    for r in &rows[1..] {
        assert_eq!(r["round_trip"]["count"], 160, "{r}");
        positive(r, &["store_bytes_per_journey"]);
        assert_eq!(r["store_flushed"], true, "{r}");
    }
    positive(&report, &["ratios", "chain"]);
    positive(&report, &["ratios", "parallel"]);
    assert!(
        report["broker_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("RabbitMQ ")),
        "{}",
        report["broker_version"]
    );

    // Nothing of its namespaces is left: every queue and exchange it declared is gone.
    let namespaces: Vec<&str> = report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(namespaces.len(), 3);
    assert_eq!(report["namespaces_deleted"], true);
    let conn = broker::connect(&amqp_url(), "bench-test").await.unwrap();
    for ns in namespaces {
        assert_namespace_gone(&conn, ns).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Every queue and exchange a bench part declares under `ns` is gone.
async fn assert_namespace_gone(conn: &lapin::Connection, ns: &str) {
    let mut queues: Vec<String> = [
        "dead-letter",
        "orchestrator.0.replies",
        "orchestrator.bench.replies",
        "intent.journey.start",
        "intent.provision_sandbox_environment",
        "intent.run_security_scan",
    ]
    .iter()
    .map(|q| format!("{ns}.{q}"))
    .collect();
    queues.extend((0..4).map(|i| format!("{ns}.intent.bench.step.{i}")));
    for q in queues {
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let r = ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await;
        assert!(r.is_err(), "queue {q} is left behind");
    }
    for ex in ["intents", "events", "dlx"] {
        let ch = conn.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let name = format!("{ns}.{ex}");
        let r = ch
            .exchange_declare(
                name.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await;
        assert!(r.is_err(), "exchange {name} is left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_bench_stops_its_orchestrator_and_deletes_its_namespace() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(["bench", "--part", "orchestrator", "--variant", "chain"])
        .args(["--journeys", "100000", "--concurrency", "1000"])
        .env("JOURNEYMAN_AMQP_URL", amqp_url())
        .env_remove("JOURNEYMAN_NAMESPACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the bench starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Its namespace, then a first progress line: journeys are running.
    let ns = tokio::time::timeout(Duration::from_secs(60), async {
        let mut ns = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("namespace ").nth(1) {
                ns = Some(rest.trim().to_string());
            }
            let running = line.contains("journeys done");
            seen.push(line);
            if running && let Some(ns) = &ns {
                return ns.clone();
            }
        }
        panic!("the bench ended early: {seen:?}");
    })
    .await
    .expect("the bench runs journeys within a minute");
    let pid = child.id().expect("running") as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let mut rest = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("the bench stops within 30 s of SIGTERM");
    assert!(!status.success());
    assert!(
        rest.iter().any(|l| l.contains("interrupted")),
        "says it was interrupted: {rest:?}"
    );
    let conn = broker::connect(&amqp_url(), "bench-test").await.unwrap();
    assert_namespace_gone(&conn, &ns).await;
    let _ = conn.close(200, "done".into()).await;
}
