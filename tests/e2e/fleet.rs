//! One view of a fleet: two orchestrators, each with its own namespace and data directory
//! (two replicas, each owning its journeys, until the broker routing lands), read through
//! the CLI with `--http-addr a,b` and through one replica's `--peers`; then one replica
//! stops and every view says so while still showing the other's journeys.

use std::net::SocketAddr;
use std::time::Duration;

use journeyman::domain::playbook::Playbook;
use journeyman::http::FleetConfig;
use journeyman::http::fleet::{FleetList, FleetReport};
use journeyman::ops::client::Client;

use crate::helpers::*;

/// Runs the real binary with `--http-addr addrs`.
async fn cli(addrs: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .arg("--http-addr")
        .arg(addrs)
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

/// A port nothing listens on right now, so a replica's own address can be among its
/// `--peers` before it binds (as a headless Service lists every pod, itself included).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn clients(list: &FleetList) -> Vec<(String, String)> {
    list.journeys
        .iter()
        .map(|j| (j.summary.client_id.clone(), j.replica.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_a_replicas_dashboard_show_every_replicas_journeys_and_who_did_not_answer() {
    let mut b = TestApp::spawn().await;
    let b_addr = b.http_addr().await.to_string();
    let mut a = TestApp::spawn_with(Playbook::default_playbook(), Mode::Manual).await;
    let a_own = free_port();
    a.start_replica(
        a_own,
        FleetConfig {
            // Itself among its peers: recognised by its answer and not counted twice.
            peers: vec![a_own.to_string(), b_addr.clone()],
            timeout: Duration::from_secs(2),
        },
    );
    let a_addr = a.http_addr().await.to_string();
    assert_eq!(a_addr, a_own.to_string());
    a.start_journey("acme").await;
    b.start_journey("bolt").await;
    b.start_journey("zinc").await;
    let both = format!("{a_addr},{b_addr}");

    // The CLI over both replicas: one list, sorted, with where each journey lives.
    let (ok, out, err) = cli(&both, &["journey", "list"]).await;
    assert!(ok, "{err}");
    println!("$ journeyman --http-addr {both} journey list\n{out}");
    assert!(err.is_empty(), "nothing to warn about: {err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].ends_with("replica"), "{out}");
    assert!(
        rows[1].starts_with("acme ") && rows[1].ends_with(&a_addr),
        "{out}"
    );
    assert!(
        rows[2].starts_with("bolt ") && rows[2].ends_with(&b_addr),
        "{out}"
    );
    assert!(
        rows[3].starts_with("zinc ") && rows[3].ends_with(&b_addr),
        "{out}"
    );
    assert_eq!(rows[4], "3 journeys on 2 replicas");
    let (ok, out, err) = cli(&both, &["journey", "list", "--json"]).await;
    assert!(ok, "{err}");
    let list: FleetList = serde_json::from_str(&out).unwrap();
    assert_eq!(
        clients(&list),
        [
            ("acme".to_string(), a_addr.clone()),
            ("bolt".to_string(), b_addr.clone()),
            ("zinc".to_string(), b_addr.clone())
        ]
    );
    assert!(!list.partial && list.unreachable.is_empty());

    let (ok, out, err) = cli(&both, &["report", "--json"]).await;
    assert!(ok, "{err}");
    let r: FleetReport = serde_json::from_str(&out).unwrap();
    assert_eq!((r.report.journeys, r.replicas_answered), (3, 2));
    assert_eq!(r.report.active_by_stage.get("sandbox"), Some(&3));
    let (ok, out, _) = cli(&both, &["report"]).await;
    assert!(ok);
    assert!(
        out.contains("replicas:                 2 of 2 answered\n"),
        "{out}"
    );
    assert!(out.contains("journeys:                 3\n"), "{out}");

    // History: asked of both, answered by the replica that holds it.
    let (ok, out, err) = cli(&both, &["journey", "history", "zinc"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("started"), "{out}");
    let (ok, out, err) = cli(&both, &["journey", "status", "bolt", "--via-http"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("stage:       sandbox"), "{out}");
    let (ok, _, err) = cli(&both, &["journey", "history", "nobody"]).await;
    assert!(!ok);
    assert!(
        err.contains("no journey for client 'nobody' on any of the 2 replicas"),
        "{err}"
    );

    // One address: exactly the single-orchestrator output, no replica column.
    let (ok, out, _) = cli(&b_addr, &["journey", "list"]).await;
    assert!(ok);
    assert!(!out.lines().next().unwrap().contains("replica"), "{out}");
    assert!(out.ends_with("2 journeys\n"), "{out}");

    // Replica a's fleet view: itself from its store, b over HTTP, itself not twice.
    let c = Client::new(a.http_addr().await, Duration::from_secs(10));
    let view: FleetList = c.get("/api/fleet/journeys").await.unwrap();
    assert_eq!(clients(&view), clients(&list), "the same view as the CLI's");
    assert_eq!(view.replicas.len(), 2, "{:?}", view.replicas);
    assert!(view.replicas[0].this && view.replicas[0].name == a_addr);
    let running: FleetList = c
        .get("/api/fleet/journeys?stage=sandbox&status=cancelled")
        .await
        .unwrap();
    assert!(running.journeys.is_empty(), "the filter reaches the peers");
    let r: FleetReport = c.get("/api/fleet/report").await.unwrap();
    assert_eq!((r.report.journeys, r.replicas_answered), (3, 2));
    let (s, page) = c.raw("/").await.unwrap();
    assert_eq!(s.as_u16(), 200);
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains(&format!(
            "data-replica=\"{b_addr}\"><a href=\"http://{b_addr}/?client=zinc\">zinc</a>"
        )),
        "b's journey on a's board, linking to b's page"
    );
    assert!(page.contains(&format!(
        "data-replica=\"{a_addr}\"><a href=\"/?client=acme\">acme</a>"
    )));
    assert!(page.contains("2 of 2 answered"));
    let (_, page) = c.raw("/?client=zinc").await.unwrap();
    assert!(
        String::from_utf8_lossy(&page).contains(&format!("Held by replica {b_addr}")),
        "a journey of another replica points to its page there"
    );

    // b stops: what a holds is still shown, and every view says b did not answer.
    b.stop_orchestrator().await.unwrap();
    let (ok, out, err) = cli(&both, &["journey", "list"]).await;
    assert!(ok, "a partial answer is still an answer: {err}");
    println!("$ journeyman --http-addr {both} journey list   # b stopped\n{out}{err}");
    assert!(out.contains("acme ") && !out.contains("zinc "), "{out}");
    assert!(
        out.ends_with("1 journey on 1 of 2 replicas (1 did not answer)\n"),
        "{out}"
    );
    assert!(
        err.contains(&format!("warning: replica {b_addr} did not answer"))
            && err.contains(&format!("journeyman health --http-addr {b_addr}")),
        "{err}"
    );
    let (ok, out, _) = cli(&both, &["journey", "list", "--json"]).await;
    assert!(ok);
    let list: FleetList = serde_json::from_str(&out).unwrap();
    assert!(list.partial);
    assert_eq!(list.unreachable.len(), 1);
    assert_eq!(list.unreachable[0].replica, b_addr);
    let (ok, out, _) = cli(&both, &["report", "--json"]).await;
    assert!(ok);
    let r: FleetReport = serde_json::from_str(&out).unwrap();
    assert!(r.partial && r.report.journeys == 1 && r.replicas_answered == 1);
    let (ok, _, err) = cli(&both, &["journey", "history", "zinc"]).await;
    assert!(!ok);
    assert!(
        err.contains("did not answer and may hold it") && err.contains(&b_addr),
        "{err}"
    );
    let view: FleetList = c.get("/api/fleet/journeys").await.unwrap();
    assert!(view.partial && view.journeys.len() == 1);
    assert!(
        view.unreachable[0].error.contains("--peers"),
        "{:?}",
        view.unreachable
    );
    let (_, page) = c.raw("/").await.unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains(&format!(
        "data-replica=\"{b_addr}\" data-answered=\"false\""
    )));
    assert!(page.contains("id=\"fleet-partial\"") && page.contains("1 of 2 answered"));

    // The orchestrator serves on one address, and says where the others go.
    let (ok, _, err) = cli(&both, &["orchestrator", "--insecure-no-auth"]).await;
    assert!(!ok);
    assert!(
        err.contains("--http-addr lists 2 addresses") && err.contains("--peers"),
        "{err}"
    );

    // Nobody answers: that is an error.
    let (ok, _, err) = cli("127.0.0.1:1,127.0.0.1:2", &["journey", "list"]).await;
    assert!(!ok);
    assert!(err.contains("no replica answered"), "{err}");
    a.stop_orchestrator().await.unwrap();
}
