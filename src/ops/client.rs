//! The other side of the API: the commands that read running orchestrators through it
//! (`journey list`, `journey history`, `journey status --via-http`, `report`).
//!
//! These never open an orchestrator's sled directory (it holds it locked). Given one
//! address they read it as they always have; given several (or a name that resolves to
//! several, a fleet of replicas behind a headless Service) they ask every replica at
//! once, merge what the replicas said, and warn on stderr about those that did not
//! answer: a command fails only when none did.

use std::time::Duration;

use anyhow::{Result, bail};

use super::settings::HttpAddrs;
use crate::domain::record::HistoryEntry;
use crate::domain::report::{self, Report};
use crate::http::JourneySummary;
use crate::http::client::encode;
use crate::http::fleet::{
    self, Fetched, FleetJourney, FleetList, FleetReport, ReplicaView, Unreachable,
};

pub use crate::http::client::Client;

/// How long one replica may take to answer a command.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The single replica of a one-address `--http-addr`: read exactly as before fleets.
fn single(addrs: &HttpAddrs) -> Option<Client> {
    addrs
        .is_single()
        .then(|| Client::new(addrs.peers[0].addr, TIMEOUT))
}

/// The replicas that answered (each once: two entries reaching the same server count
/// once) and those that did not, in `--http-addr` order.
struct Answers<T> {
    answered: Vec<(ReplicaView, T)>,
    unreachable: Vec<Unreachable>,
}

fn sort_answers<T>(addrs: &HttpAddrs, fetched: Vec<Fetched<T>>) -> Answers<T> {
    let mut unreachable = addrs.unresolved.clone();
    let mut answered = Vec::new();
    let mut instances = std::collections::HashSet::new();
    for f in fetched {
        match f.result {
            Ok(v) => {
                if let Some(i) = &f.instance
                    && !instances.insert(i.clone())
                {
                    continue;
                }
                let view = ReplicaView {
                    name: f.peer.name,
                    orchestrator_id: f.orchestrator_id,
                    this: false,
                    answered: true,
                    journeys: None,
                    error: None,
                };
                answered.push((view, v));
            }
            Err(e) => unreachable.push(Unreachable {
                replica: f.peer.name,
                error: e.detail(),
            }),
        }
    }
    Answers {
        answered,
        unreachable,
    }
}

/// Says on stderr which replicas did not answer and what to do; fails when none did.
fn report_unreachable<T>(a: &Answers<T>, what: &str) -> Result<()> {
    if a.answered.is_empty() {
        let all: Vec<String> = a
            .unreachable
            .iter()
            .map(|u| format!("{}: {}", u.replica, u.error))
            .collect();
        bail!(
            "no replica answered ({}). Are they running? Give their addresses with --http-addr or JOURNEYMAN_HTTP_ADDR (host:port, comma-separated)",
            all.join("; ")
        );
    }
    for u in &a.unreachable {
        eprintln!(
            "warning: replica {} did not answer ({}); {what}. Check it with `journeyman health --http-addr {}`, or leave it out of --http-addr",
            u.replica, u.error, u.replica
        );
    }
    Ok(())
}

fn unreachable_views(u: &[Unreachable]) -> impl Iterator<Item = ReplicaView> + '_ {
    u.iter().map(|u| ReplicaView {
        name: u.replica.clone(),
        orchestrator_id: None,
        this: false,
        answered: false,
        journeys: None,
        error: Some(u.error.clone()),
    })
}

/// `journeyman journey list`.
pub async fn journey_list(
    addrs: &HttpAddrs,
    stage: Option<&str>,
    status: Option<&str>,
    json: bool,
) -> Result<()> {
    let mut q = Vec::new();
    if let Some(s) = stage {
        q.push(format!("stage={}", encode(s)));
    }
    if let Some(s) = status {
        q.push(format!("status={}", encode(s)));
    }
    let path = if q.is_empty() {
        "/api/journeys".to_string()
    } else {
        format!("/api/journeys?{}", q.join("&"))
    };
    if let Some(client) = single(addrs) {
        let list: Vec<JourneySummary> = client.get(&path).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            print!("{}", render_list(&list, chrono::Utc::now()));
        }
        return Ok(());
    }
    let fetched = fleet::fetch_all::<Vec<JourneySummary>>(&addrs.peers, &path, TIMEOUT).await;
    let answers = sort_answers(addrs, fetched);
    report_unreachable(&answers, "its journeys are missing from this list")?;
    let list = fleet_list(answers);
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_fleet_list(&list, chrono::Utc::now()));
    }
    Ok(())
}

fn fleet_list(a: Answers<Vec<JourneySummary>>) -> FleetList {
    let mut replicas = Vec::new();
    let mut journeys = Vec::new();
    for (mut view, list) in a.answered {
        view.journeys = Some(list.len());
        journeys.extend(list.into_iter().map(|summary| FleetJourney {
            replica: view.name.clone(),
            summary,
        }));
        replicas.push(view);
    }
    replicas.extend(unreachable_views(&a.unreachable));
    FleetList {
        journeys: fleet::merge_lists(journeys),
        replicas,
        partial: !a.unreachable.is_empty(),
        unreachable: a.unreachable,
    }
}

pub fn render_list(list: &[JourneySummary], now: chrono::DateTime<chrono::Utc>) -> String {
    let mut o = format!(
        "{:<24} {:<11} {:<16} {:>7} {:>10}  {}\n",
        "client", "stage", "status", "tasks", "in stage", "stage started"
    );
    for j in list {
        let in_stage = (now - j.stage_started_at).num_milliseconds().max(0) as f64 / 1e3;
        o.push_str(&format!(
            "{:<24} {:<11} {:<16} {:>7} {:>10}  {}\n",
            j.client_id,
            j.stage,
            j.status,
            format!("{}/{}", j.tasks_done, j.tasks_total),
            report::human(in_stage),
            j.stage_started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    o.push_str(&match list.len() {
        1 => "1 journey\n".to_string(),
        n => format!("{n} journeys\n"),
    });
    o
}

/// A fleet's list: the single list's columns, then where each journey lives.
pub fn render_fleet_list(list: &FleetList, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut o = format!(
        "{:<24} {:<11} {:<16} {:>7} {:>10}  {:<20}  {}\n",
        "client", "stage", "status", "tasks", "in stage", "stage started", "replica"
    );
    for fj in &list.journeys {
        let j = &fj.summary;
        let in_stage = (now - j.stage_started_at).num_milliseconds().max(0) as f64 / 1e3;
        o.push_str(&format!(
            "{:<24} {:<11} {:<16} {:>7} {:>10}  {:<20}  {}\n",
            j.client_id,
            j.stage,
            j.status,
            format!("{}/{}", j.tasks_done, j.tasks_total),
            report::human(in_stage),
            j.stage_started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            fj.replica
        ));
    }
    let n = list.journeys.len();
    let answered = list.replicas.iter().filter(|r| r.answered).count();
    let replicas = match (answered, list.replicas.len()) {
        (a, t) if a == t => format!("{t} replicas"),
        (a, t) => format!("{a} of {t} replicas ({} did not answer)", t - a),
    };
    o.push_str(&format!(
        "{n} journey{} on {replicas}\n",
        if n == 1 { "" } else { "s" }
    ));
    o
}

/// Asks every replica for one journey's `path`; the first that has it answers. A journey
/// lives on one replica, so an answer is complete even if others are away; without one,
/// the error says whether a replica that did not answer may hold it.
async fn find<T: serde::de::DeserializeOwned>(
    addrs: &HttpAddrs,
    path: &str,
    client_id: &str,
) -> Result<T> {
    if let Some(client) = single(addrs) {
        return Ok(client.get(path).await?);
    }
    let fetched = fleet::fetch_all::<T>(&addrs.peers, path, TIMEOUT).await;
    let mut unreachable = addrs.unresolved.clone();
    let mut without = 0;
    for f in fetched {
        match f.result {
            Ok(v) => return Ok(v),
            Err(e) if e.is_not_found() => without += 1,
            Err(e) => unreachable.push(Unreachable {
                replica: f.peer.name,
                error: e.detail(),
            }),
        }
    }
    if unreachable.is_empty() {
        bail!("no journey for client '{client_id}' on any of the {without} replicas asked");
    }
    let away: Vec<String> = unreachable
        .iter()
        .map(|u| format!("{} ({})", u.replica, u.error))
        .collect();
    bail!(
        "no journey for client '{client_id}' on the {without} replicas that answered; {} did not answer and may hold it. Try again once {} answer{} (`journeyman health --http-addr ...`)",
        away.join(", "),
        if unreachable.len() == 1 { "it" } else { "they" },
        if unreachable.len() == 1 { "s" } else { "" },
    )
}

/// `journeyman journey status <client> --via-http`: the same view as over the protocol.
pub async fn journey_status(addrs: &HttpAddrs, client_id: &str, json: bool) -> Result<()> {
    let state: serde_json::Value = find(
        addrs,
        &format!("/api/journeys/{}", encode(client_id)),
        client_id,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        super::show::print_state(&state);
    }
    Ok(())
}

/// `journeyman journey history <client>`.
pub async fn journey_history(addrs: &HttpAddrs, client_id: &str, json: bool) -> Result<()> {
    let h: Vec<HistoryEntry> = find(
        addrs,
        &format!("/api/journeys/{}/history", encode(client_id)),
        client_id,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&h)?);
    } else {
        print!("{}", render_history(&h));
    }
    Ok(())
}

pub fn render_history(h: &[HistoryEntry]) -> String {
    let mut o = String::new();
    for e in h {
        o.push_str(&format!(
            "{}  {:<24} {}{}\n",
            e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            e.kind,
            crate::http::dashboard::summary(&e.kind, &e.detail),
            e.cause
                .as_deref()
                .map(|c| format!("  [cause {c}]"))
                .unwrap_or_default()
        ));
    }
    o
}

/// `journeyman report`: over several replicas, the sum of their reports.
pub async fn report(addrs: &HttpAddrs, json: bool) -> Result<()> {
    if let Some(client) = single(addrs) {
        let r: Report = client.get("/api/report").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", report::render_text(&r));
        }
        return Ok(());
    }
    let fetched = fleet::fetch_all::<Report>(&addrs.peers, "/api/report", TIMEOUT).await;
    let answers = sort_answers(addrs, fetched);
    report_unreachable(&answers, "its journeys are not counted in this report")?;
    let parts: Vec<Report> = answers.answered.into_iter().map(|(_, r)| r).collect();
    let r = FleetReport {
        report: report::merge(&parts),
        replicas_answered: parts.len(),
        replicas_asked: parts.len() + answers.unreachable.len(),
        partial: !answers.unreachable.is_empty(),
        unreachable: answers.unreachable,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render_fleet_report(&r));
    }
    Ok(())
}

pub fn render_fleet_report(r: &FleetReport) -> String {
    let mut o = format!(
        "replicas:                 {} of {} answered{}\n",
        r.replicas_answered,
        r.replicas_asked,
        if r.partial {
            " (the others' journeys are not counted)"
        } else {
            ""
        }
    );
    o.push_str(&report::render_text(&r.report));
    if r.replicas_answered > 1 {
        o.push_str(
            "(counts and rates are over every replica; a p50/p95 shows only when one replica has samples: percentiles do not add up, see each replica's report)\n",
        );
    }
    o
}
