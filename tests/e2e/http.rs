//! The orchestrator's HTTP side against a running orchestrator: readiness, `/metrics`
//! moving as journeys advance, the JSON API, the CLI commands that read it, and the
//! dashboard in a real headless browser.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use journeyman::agent::sim::SimAgent;
use journeyman::domain::report::Report;
use journeyman::http::JourneySummary;
use journeyman::ops::client::Client;
use journeyman::orchestrator::HistoryEntry;
use serde_json::Value;

use crate::helpers::*;

fn client(addr: SocketAddr) -> Client {
    Client::new(addr, Duration::from_secs(10))
}

async fn text(c: &Client, path: &str) -> (u16, String) {
    let (s, body) = c.raw(path).await.expect("the orchestrator answers HTTP");
    (s.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

/// The value of one exact series (name and labels) in a Prometheus text exposition,
/// written without the `replica` label that every orchestrator series carries first.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let l = without_replica(l);
        l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()
    })
}

/// A sample line without its leading `replica="..."` label.
fn without_replica(line: &str) -> String {
    let Some((name, rest)) = line.split_once("{replica=\"") else {
        return line.to_string();
    };
    let Some((_, rest)) = rest.split_once('"') else {
        return line.to_string();
    };
    match rest.strip_prefix(',') {
        Some(labels) => format!("{name}{{{labels}"),
        None => format!("{name}{}", rest.strip_prefix('}').unwrap_or(rest)),
    }
}

async fn wait_ready(c: &Client) {
    let ready = async {
        loop {
            if text(c, "/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("the orchestrator becomes ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_a_journey_advances_and_readyz_reports_readiness() {
    let mut app = TestApp::spawn().await;
    let c = client(app.http_addr().await);
    assert_eq!(text(&c, "/healthz").await, (200, "ok\n".to_string()));
    wait_ready(&c).await;
    let (_, ready) = text(&c, "/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["broker"], true);
    assert_eq!(ready["store"], true);

    let (s, before) = text(&c, "/metrics").await;
    assert_eq!(s, 200);
    assert_eq!(series(&before, "journeyman_up"), Some(1.0));
    assert_eq!(
        series(&before, "journeyman_journeys_started_total"),
        Some(0.0)
    );
    assert_eq!(
        series(&before, "journeyman_tasks_dispatched_total"),
        Some(0.0)
    );
    assert!(!before.contains("journeyman_journeys{"), "no journeys yet");

    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    // In sandbox, its work running or done: the gauge counts it.
    let (_, during) = text(&c, "/metrics").await;
    let in_sandbox: f64 = during
        .lines()
        .map(without_replica)
        .filter(|l| l.starts_with("journeyman_journeys{stage=\"sandbox\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let elsewhere = during
        .lines()
        .map(without_replica)
        .any(|l| l.starts_with("journeyman_journeys{stage=\"pilot\""));
    assert!(in_sandbox == 1.0 || elsewhere, "acme is counted: {during}");
    assert_eq!(
        series(&during, "journeyman_journeys_started_total"),
        Some(1.0)
    );

    app.wait_in_production("acme").await;
    let (_, after) = text(&c, "/metrics").await;
    assert_eq!(
        series(
            &after,
            "journeyman_journeys{stage=\"production\",status=\"live\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        series(&after, "journeyman_transitions_total{kind=\"promote\"}"),
        Some(2.0)
    );
    assert_eq!(series(&after, "journeyman_promotions_total"), Some(2.0));
    let dispatched = series(&after, "journeyman_tasks_dispatched_total").unwrap();
    assert!(dispatched >= 3.0, "tasks dispatched: {dispatched}");
    assert_eq!(
        series(&after, "journeyman_tasks_completed_total"),
        Some(dispatched),
        "every dispatched task completed"
    );
    assert!(
        series(
            &after,
            "journeyman_gate_evaluations_total{result=\"passed\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        series(&after, "journeyman_rollbacks_total{outcome=\"started\"}"),
        Some(0.0)
    );
    assert_eq!(series(&after, "journeyman_dead_letters_total"), Some(0.0));
    assert!(series(&after, "journeyman_outbox_depth").is_some());
    assert!(series(&after, "journeyman_flushes_total").unwrap() >= 1.0);
    assert_eq!(
        series(
            &after,
            "journeyman_task_outcomes_total{intent=\"provision_sandbox_environment\",outcome=\"dispatched\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        series(
            &after,
            "journeyman_task_outcomes_total{intent=\"provision_sandbox_environment\",outcome=\"completed\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            &after,
            "journeyman_task_round_trip_seconds_count{intent=\"provision_sandbox_environment\"}"
        ),
        Some(1.0)
    );
    app.stop_orchestrator().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_lists_shows_and_histories_journeys() {
    let mut app = TestApp::spawn().await;
    let c = client(app.http_addr().await);
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.start_journey("globex").await;
    app.wait_in_production("acme").await;
    app.wait_in_production("globex").await;

    let all: Vec<JourneySummary> = c.get("/api/journeys").await.unwrap();
    let mut clients: Vec<&str> = all.iter().map(|j| j.client_id.as_str()).collect();
    clients.sort();
    assert_eq!(clients, ["acme", "globex"]);
    let acme = all.iter().find(|j| j.client_id == "acme").unwrap();
    assert_eq!(
        (acme.stage.as_str(), acme.status.as_str()),
        ("production", "live")
    );
    assert!(acme.tasks_total > 0);
    assert_eq!(acme.tasks_done, acme.tasks_total);

    let live: Vec<JourneySummary> = c
        .get("/api/journeys?stage=production&status=live")
        .await
        .unwrap();
    assert_eq!(live.len(), 2);
    let none: Vec<JourneySummary> = c.get("/api/journeys?stage=pilot").await.unwrap();
    assert!(none.is_empty());
    let paused: Vec<JourneySummary> = c.get("/api/journeys?status=paused").await.unwrap();
    assert!(paused.is_empty());

    // The detail is the protocol's journey state, schema and all.
    let detail: Value = c.get("/api/journeys/acme").await.unwrap();
    assert_eq!(detail["stage"], "production");
    let v = journeyman::wire::protocol::compile_schema(
        journeyman::wire::protocol::schemas::JOURNEY_STATE,
    );
    assert!(v.is_valid(&detail), "{detail}");

    let history: Vec<HistoryEntry> = c.get("/api/journeys/acme/history").await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"));
    let transitions: Vec<(String, String)> = history
        .iter()
        .filter(|e| e.kind == "transition")
        .map(|e| {
            (
                e.detail["from"].as_str().unwrap().to_string(),
                e.detail["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        transitions,
        [
            ("sandbox".to_string(), "pilot".to_string()),
            ("pilot".to_string(), "production".to_string())
        ]
    );
    assert!(kinds.contains(&"gate_evaluation") && kinds.contains(&"task_completed"));
    assert!(history.windows(2).all(|w| w[0].at <= w[1].at), "in order");

    let (s, body) = text(&c, "/api/journeys/nobody").await;
    assert_eq!(s, 404);
    assert!(body.contains("no journey for client 'nobody'"));
    let (s, _) = text(&c, "/api/journeys/nobody/history").await;
    assert_eq!(s, 404);

    let report: Report = c.get("/api/report").await.unwrap();
    assert_eq!(report.journeys, 2);
    assert_eq!(report.active_by_stage.get("production"), Some(&2));
    assert_eq!(report.time_to_production.count, 2);
    assert_eq!(report.stage_durations["sandbox"].count, 2);
    assert_eq!(report.stage_durations["pilot"].count, 2);
    assert_eq!(report.rollback_rate, Some(0.0));
    assert!(report.exit_criteria_pass_rate.unwrap() > 0.0);
    assert_eq!(report.task_failure_rate, Some(0.0));
    assert!(report.tasks_per_unit_of_work.unwrap() >= 1.0);
    app.stop_orchestrator().await.unwrap();
}

/// Runs the real binary against the test's orchestrator.
async fn cli(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .arg("--http-addr")
        .arg(addr)
        .args(args)
        .env_remove("JOURNEYMAN_HTTP_ADDR")
        .output()
        .await
        .expect("run the journeyman binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_list_history_and_report_commands_read_the_http_api() {
    let mut app = TestApp::spawn().await;
    let addr = app.http_addr().await.to_string();
    app.start_agent_for_all(Arc::new(SimAgent::default())).await;
    app.start_journey("acme").await;
    app.wait_in_production("acme").await;

    let (ok, out, err) = cli(&addr, &["journey", "list"]).await;
    assert!(ok, "{err}");
    println!("$ journeyman journey list\n{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("acme "))
        .expect("acme listed");
    assert!(row.contains("production") && row.contains("live"), "{row}");
    assert!(out.lines().any(|l| l == "1 journey"), "{out}");

    let (ok, out, err) = cli(&addr, &["journey", "list", "--stage", "pilot", "--json"]).await;
    assert!(ok, "{err}");
    let v: Vec<JourneySummary> = serde_json::from_str(&out).unwrap();
    assert!(v.is_empty());
    let (ok, out, _) = cli(&addr, &["journey", "list", "--status", "live", "--json"]).await;
    assert!(ok);
    let v: Vec<JourneySummary> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 1);

    let (ok, out, err) = cli(&addr, &["journey", "status", "acme", "--via-http"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("stage:       production") && out.contains("status:      live"),
        "{out}"
    );

    let (ok, out, err) = cli(&addr, &["journey", "history", "acme"]).await;
    assert!(ok, "{err}");
    println!("$ journeyman journey history acme\n{out}");
    assert!(
        out.contains("transition") && out.contains("sandbox → pilot"),
        "{out}"
    );
    assert!(out.contains("pilot → production"));
    assert!(out.contains("gate passed"));
    let (ok, out, _) = cli(&addr, &["journey", "history", "acme", "--json"]).await;
    assert!(ok);
    let h: Vec<HistoryEntry> = serde_json::from_str(&out).unwrap();
    assert!(h.iter().any(|e| e.kind == "transition"));

    let (ok, _, err) = cli(&addr, &["journey", "history", "nobody"]).await;
    assert!(!ok);
    assert!(err.contains("no journey for client 'nobody'"), "{err}");

    let (ok, out, err) = cli(&addr, &["report"]).await;
    assert!(ok, "{err}");
    println!("$ journeyman report\n{out}");
    assert!(out.contains("time to production:") && out.contains("rollback rate:            0.0%"));
    let (ok, out, _) = cli(&addr, &["report", "--json"]).await;
    assert!(ok);
    let r: Report = serde_json::from_str(&out).unwrap();
    assert_eq!(r.journeys, 1);

    // Nothing listens on port 1: a clear message, not a stack of errors.
    let (ok, _, err) = cli("127.0.0.1:1", &["journey", "list"]).await;
    assert!(!ok);
    assert!(
        err.contains("cannot reach the orchestrator's HTTP API at http://127.0.0.1:1")
            && err.contains("--http-addr or JOURNEYMAN_HTTP_ADDR"),
        "{err}"
    );
    app.stop_orchestrator().await.unwrap();
}

/// `target/` of this build (the test binary lives in `target/debug/deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The colour the page's CSS gives each status, as the browser computes it.
fn expected_colour(status: &str) -> &'static str {
    match status {
        "live" | "completed" => "rgb(205, 236, 207)", // green
        "awaiting_gate" | "rolling_back" => "rgb(248, 217, 139)", // amber
        "paused" | "rollback_failed" => "rgb(246, 196, 196)", // red
        "cancelled" => "rgb(226, 228, 232)",          // grey
        _ => "rgb(219, 232, 251)",                    // running: blue
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_refreshes_colours_counts_and_shows_an_unreachable_orchestrator_in_a_browser()
{
    let mut app = TestApp::spawn().await;
    let addr = app.http_addr().await;
    // The first sandbox attempt fails for good: hooli pauses (and is dead-lettered); every
    // later journey runs normally.
    app.start_agent_for_all(Arc::new(crate::Flaky::new(
        "provision_sandbox_environment",
        1,
        false,
    )))
    .await;
    app.start_journey("hooli").await;
    app.wait_event("hooli paused", |p| {
        p["client_id"] == "hooli" && p["event"] == "journey.paused"
    })
    .await;
    app.start_journey("acme").await;
    app.start_journey("globex").await;
    app.wait_in_production("acme").await;
    app.wait_in_production("globex").await;
    // Cancelled in sandbox.
    app.start_journey("initech").await;
    let cancel =
        journeyman::wire::protocol::Command::Cancel(journeyman::wire::protocol::CancelPayload {
            client_id: "initech".into(),
            reason: Some("client withdrew".into()),
        });
    app.request(&cancel).await;
    // Sandbox evidence below the gate: umbrella waits at the sandbox gate.
    let start = TestApp::command(
        "journey.start",
        serde_json::json!({"client_id": "umbrella", "context": {"data_sources": ["drive"], "connectors": ["gdrive"]}}),
    );
    app.send(&start).await;
    app.wait_event("umbrella started", |p| {
        p["client_id"] == "umbrella" && p["event"] == "journey.started"
    })
    .await;
    app.evidence(
        "umbrella",
        &[("search.precision", 0.5)],
        &[("demo.approved", true)],
    )
    .await;
    app.wait_event("umbrella refused at the gate", |p| {
        p["client_id"] == "umbrella" && p["event"] == "gate.failed"
    })
    .await;

    // Server-rendered: the page is complete without a browser.
    let c = client(addr);
    let (s, page) = text(&c, "/").await;
    assert_eq!(s, 200);
    assert!(page.contains("id=\"stage-production\"") && page.contains(">acme</a>"));
    let (_, detail) = text(&c, "/?client=acme").await;
    assert!(detail.contains("id=\"timeline\"") && detail.contains("sandbox → pilot"));
    assert!(detail.contains("id=\"gate\"") && detail.contains("pilot gate"));
    let (_, fragment) = text(&c, "/?client=acme&fragment=1").await;
    assert!(
        fragment.starts_with("<h1>") && !fragment.contains("<script>"),
        "the refresh fetches only the live part"
    );

    let Some(bin) = crate::cdp::chromium() else {
        println!(
            "SKIPPED the browser part of the dashboard test: no chromium at /usr/bin/chromium \
             (scripts/test installs it when run as root)"
        );
        return;
    };
    let artifacts = target_dir().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut b = crate::cdp::Browser::launch(&bin, &format!("http://{addr}/?client=umbrella")).await;
    b.wait_for(
        "two refreshes",
        "+document.body.dataset.refreshesOk >= 2",
        Duration::from_secs(30),
    )
    .await;

    // Colours and counts, as the browser renders them after its refreshes, against the API.
    let journeys: Vec<JourneySummary> = c.get("/api/journeys").await.unwrap();
    assert_eq!(journeys.len(), 5);
    let shown = b
        .eval(
            r##"JSON.stringify({
                cards: [...document.querySelectorAll("#board .card")].map(c => ({
                    client: c.dataset.client,
                    stage: c.closest(".col").dataset.stage,
                    status: c.querySelector(".status").textContent,
                    colour: getComputedStyle(c.querySelector(".status")).backgroundColor,
                    text: c.innerText,
                })),
                columns: Object.fromEntries([...document.querySelectorAll("#board .col")]
                    .map(c => [c.dataset.stage, +c.querySelector(".count").textContent])),
                pausedNow: +document.querySelector("#count-paused-now b").textContent,
                awaitingNow: +document.querySelector("#count-awaiting-now b").textContent,
                journeys: +document.querySelector("#count-journeys b").textContent,
                readiness: document.getElementById("readiness").textContent,
                page: document.getElementById("live").innerText,
            })"##,
        )
        .await;
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    println!("the browser shows: {shown:#}");
    for j in &journeys {
        let card = shown["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client"] == j.client_id.as_str())
            .unwrap_or_else(|| panic!("{} on the board: {shown}", j.client_id));
        assert_eq!(card["stage"], j.stage.as_str(), "{}'s column", j.client_id);
        assert_eq!(
            card["status"],
            j.status.as_str(),
            "{}'s status",
            j.client_id
        );
        assert_eq!(
            card["colour"],
            expected_colour(&j.status),
            "{} is {}",
            j.client_id,
            j.status
        );
        assert!(
            card["text"].as_str().unwrap().contains("in stage"),
            "{card}"
        );
    }
    let status_of = |c: &str| {
        journeys
            .iter()
            .find(|j| j.client_id == c)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(status_of("hooli"), "paused");
    assert_eq!(status_of("umbrella"), "awaiting_gate");
    assert_eq!(status_of("initech"), "cancelled");
    assert_eq!(status_of("acme"), "live");
    for stage in [
        "sandbox",
        "pilot",
        "production",
        "rollback",
        "completed",
        "cancelled",
    ] {
        let n = journeys.iter().filter(|j| j.stage == stage).count();
        assert_eq!(shown["columns"][stage], n, "the {stage} column's count");
    }
    let count = |status: &str| journeys.iter().filter(|j| j.status == status).count();
    assert_eq!(shown["pausedNow"], count("paused"));
    assert_eq!(shown["awaitingNow"], count("awaiting_gate"));
    assert_eq!(shown["journeys"], journeys.len());
    assert_eq!(shown["readiness"], "ready");
    let card = |c: &str| {
        shown["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["client"] == c)
            .unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        card("hooli").contains("journeyman journey resume hooli"),
        "{}",
        card("hooli")
    );
    assert!(
        card("umbrella").contains("search"),
        "failing check on the card: {}",
        card("umbrella")
    );
    // The journey's page: what blocks it, the command to run, evidence, newest first.
    let page = shown["page"].as_str().unwrap();
    for want in [
        "Blocked by the sandbox gate",
        "journeyman journey evidence umbrella --metric search.precision=<value>",
        "Evidence",
        "search.precision",
        "Timeline",
        "evidence from journeyman-cli",
        "Dead letters",
        "in the dead-letter queue now",
        "Task round trip",
        "Retries and dead letters per intent",
    ] {
        assert!(page.contains(want), "the page shows {want:?}:\n{page}");
    }
    let first_row = b
        .eval("document.querySelector('#timeline tr:nth-child(2) td:nth-child(2)').textContent")
        .await;
    assert_eq!(first_row, "gate evaluation", "newest first");
    assert_eq!(
        b.eval("document.querySelectorAll('#stages-chart polyline').length")
            .await,
        6,
        "one line per stage once the page has sampled twice"
    );
    let board = artifacts.join("dashboard.png");
    b.screenshot(&board).await;
    println!("dashboard screenshot: {}", board.display());

    // The orchestrator stops: within one refresh the page says so.
    app.stop_orchestrator().await.unwrap();
    b.wait_for(
        "\"unreachable\"",
        "document.getElementById('readiness').textContent === 'unreachable' \
         && !document.getElementById('fetch-error').hidden",
        Duration::from_secs(15),
    )
    .await;
    let banner = b
        .eval("document.getElementById('fetch-error').textContent")
        .await;
    assert!(
        banner
            .as_str()
            .unwrap()
            .contains("Everything below is as of"),
        "{banner}"
    );
    let down = artifacts.join("dashboard-unreachable.png");
    b.screenshot(&down).await;
    println!(
        "dashboard screenshot, orchestrator stopped: {}",
        down.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_journey_shows_in_metrics_the_api_and_the_report() {
    let mut app = TestApp::spawn().await;
    let c = client(app.http_addr().await);
    // The first sandbox task fails for good: the journey pauses and is dead-lettered.
    app.start_agent_for_all(Arc::new(crate::Flaky::new(
        "provision_sandbox_environment",
        1,
        false,
    )))
    .await;
    app.start_journey("acme").await;
    app.wait_event("acme paused", |p| {
        p["client_id"] == "acme" && p["event"] == "journey.paused"
    })
    .await;

    let (_, m) = text(&c, "/metrics").await;
    assert_eq!(
        series(
            &m,
            "journeyman_journeys{stage=\"sandbox\",status=\"paused\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(series(&m, "journeyman_pauses_total"), Some(1.0));
    assert_eq!(series(&m, "journeyman_dead_letters_total"), Some(1.0));
    assert_eq!(series(&m, "journeyman_promotions_total"), Some(0.0));
    assert_eq!(
        series(
            &m,
            "journeyman_dead_letters_by_reason_total{reason=\"task_failed\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "journeyman_task_outcomes_total{intent=\"provision_sandbox_environment\",outcome=\"failed\"}"
        ),
        Some(1.0)
    );

    let paused: Vec<JourneySummary> = c.get("/api/journeys?status=paused").await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].client_id, "acme");
    let detail: Value = c.get("/api/journeys/acme").await.unwrap();
    assert_eq!(detail["paused"]["task_id"], "provision-infra");

    let report: Report = c.get("/api/report").await.unwrap();
    assert_eq!(report.tasks_failed, 1);
    assert!(report.task_failure_rate.unwrap() > 0.0);
    assert_eq!(report.active_by_stage.get("sandbox"), Some(&1));

    // The dead letter, read from the queue without consuming it (as `journeyman dlq` does).
    let stats = async {
        loop {
            let s: Value = c.get("/api/dead-letters/stats").await.unwrap();
            if s["total"] == 1 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let stats = tokio::time::timeout(WAIT, stats)
        .await
        .expect("the dead letter arrives");
    assert_eq!(stats["by_reason"]["task_failed"], 1, "{stats}");
    let listed: Vec<Value> = c.get("/api/dead-letters?client=acme").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["reason"], "task_failed");
    let none: Vec<Value> = c.get("/api/dead-letters?reason=no_agent").await.unwrap();
    assert!(none.is_empty());
    let again: Value = c.get("/api/dead-letters/stats").await.unwrap();
    assert_eq!(again["total"], 1, "reading did not consume it");

    let (_, page) = text(&c, "/?client=acme").await;
    assert!(
        page.contains(">paused</span>")
            && page.contains("<b>1</b> dead-lettered")
            && page.contains("<b>1</b> in the dead-letter queue now")
            && page.contains("journeyman journey resume acme")
            && page.contains("<td>task_failed</td><td>1</td>"),
        "{page}"
    );
    app.stop_orchestrator().await.unwrap();
}
