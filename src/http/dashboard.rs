//! The HTML dashboard at `/`: journeys by stage, one journey's timeline and gate checks
//! (`/?client=<id>`), and dead-letter counts.
//!
//! Rendered on the server, so the page is complete without JavaScript (and a headless
//! browser's `--dump-dom` sees it at once); a few lines of vanilla JS then refresh the
//! board from `/api/journeys` every few seconds. No build step, no assets.

use std::fmt::Write;

use axum::extract::{Query, State};
use axum::response::Html;
use chrono::Utc;
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, JourneySummary, StatsView};
use crate::domain::gate::ValidationResult;
use crate::domain::journey::Stage;
use crate::domain::record::{HistoryEntry, JourneyRecord};
use crate::domain::report::human;

pub(super) struct PageData {
    /// Counts read from the dead-letter queue (or why not), when a broker is configured.
    pub dead_letter_queue: Option<Result<crate::ops::dlq::Stats, String>>,
    pub stats: StatsView,
    pub journeys: Vec<JourneySummary>,
    pub selected: Option<(JourneyRecord, Vec<HistoryEntry>)>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    client: Option<String>,
}

pub(super) async fn page(
    State(state): State<AppState>,
    Query(q): Query<PageQuery>,
) -> Result<Html<String>, ApiError> {
    let client = q.client.filter(|c| !c.is_empty());
    let data = super::page_data(&state, client.clone()).await?;
    Ok(Html(render(&data, client.as_deref())))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Percent-encodes a client id for a query string.
fn url_component(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2430;background:#f6f7f9}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
.muted{color:#6b7380;font-size:.85rem}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.6rem;font-size:.8rem;background:#dde3ea}
.ok{background:#cdeccf}.bad{background:#f6d0d0}.warn{background:#f8e7b8}
.board{display:grid;grid-template-columns:repeat(6,1fr);gap:.6rem}
.col{background:#fff;border:1px solid #dde3ea;border-radius:.4rem;padding:.5rem;min-height:4rem}
.col h3{font-size:.95rem;margin:0 0 .4rem;display:flex;justify-content:space-between}
.card{border-top:1px solid #eef1f4;padding:.3rem 0;font-size:.85rem}
.card a{font-weight:600;color:#1f4f99;text-decoration:none}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
td,th{border:1px solid #dde3ea;padding:.25rem .5rem;text-align:left;vertical-align:top}
.counters{display:flex;gap:1rem;flex-wrap:wrap}
.counters div{background:#fff;border:1px solid #dde3ea;border-radius:.4rem;padding:.4rem .7rem}
.counters b{display:block;font-size:1.2rem}
code{font-size:.8rem}
"#;

const SCRIPT: &str = r#"
// Refreshes the board from the JSON API; the server already rendered it once.
const STAGES = ["sandbox","pilot","production","rollback","completed","cancelled"];
function esc(s){return String(s).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));}
async function refresh(){
  try{
    const r = await fetch("/api/journeys"); if(!r.ok) return;
    const js = await r.json();
    for(const st of STAGES){
      const mine = js.filter(j=>j.stage===st);
      const col = document.getElementById("stage-"+st); if(!col) continue;
      col.querySelector(".count").textContent = mine.length;
      col.querySelector(".cards").innerHTML = mine.map(j =>
        `<div class="card" data-client="${esc(j.client_id)}"><a href="/?client=${encodeURIComponent(j.client_id)}">${esc(j.client_id)}</a> `+
        `<span class="badge">${esc(j.status)}</span><br><span class="muted">${j.tasks_done}/${j.tasks_total} tasks</span></div>`).join("");
    }
    document.getElementById("updated").textContent = new Date().toISOString();
  }catch(e){}
}
setInterval(refresh, 5000);
"#;

fn status_class(status: &str) -> &'static str {
    match status {
        "live" | "completed" | "awaiting_gate" => "ok",
        "paused" | "rollback_failed" | "cancelled" => "bad",
        "rolling_back" => "warn",
        _ => "",
    }
}

pub(super) fn render(d: &PageData, client: Option<&str>) -> String {
    let now = Utc::now();
    let mut o = String::with_capacity(32 * 1024);
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>journeyman: {ns}</title><style>{STYLE}</style></head><body>\
         <h1>journeyman <span class=\"muted\">namespace {ns}</span> \
         <span id=\"readiness\" class=\"badge {rc}\">{rt}</span></h1>\
         <div class=\"muted\">rendered {now} · refreshed every 5 s, last <span id=\"updated\">never</span></div>",
        ns = esc(&d.stats.namespace),
        rc = if d.stats.ready { "ok" } else { "bad" },
        rt = if d.stats.ready { "ready" } else { "not ready" },
        now = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );

    // Counters, and dead letters by reason.
    let c = |k: &str| d.stats.counters.get(k).copied().unwrap_or(0);
    o.push_str("<h2>Fleet</h2><div class=\"counters\" id=\"counters\">");
    for (label, key) in [
        ("journeys", ""),
        ("started", "journeys_started"),
        ("promotions", "promotions"),
        ("tasks dispatched", "tasks_dispatched"),
        ("retries", "retries"),
        ("rollbacks", "rollbacks_started"),
        ("paused", "pauses"),
        ("dead letters", "dead_letters"),
    ] {
        let v = if key.is_empty() {
            d.journeys.len() as u64
        } else {
            c(key)
        };
        let _ = write!(o, "<div><b>{v}</b>{label}</div>");
    }
    o.push_str("</div>");

    o.push_str("<h2>Journeys by stage</h2><div class=\"board\" id=\"board\">");
    for stage in Stage::ALL {
        let st = stage.as_str();
        let mine: Vec<&JourneySummary> = d.journeys.iter().filter(|j| j.stage == st).collect();
        let _ = write!(
            o,
            "<div class=\"col\" id=\"stage-{st}\"><h3>{st} <span class=\"count badge\">{}</span></h3><div class=\"cards\">",
            mine.len()
        );
        for j in mine {
            let days = human((now - j.stage_started_at).num_milliseconds().max(0) as f64 / 1e3);
            let _ = write!(
                o,
                "<div class=\"card\" data-client=\"{c}\"><a href=\"/?client={u}\">{c}</a> \
                 <span class=\"badge {sc}\">{s}</span><br><span class=\"muted\">{done}/{total} tasks · in stage {days}</span></div>",
                c = esc(&j.client_id),
                u = url_component(&j.client_id),
                sc = status_class(&j.status),
                s = esc(&j.status),
                done = j.tasks_done,
                total = j.tasks_total,
            );
        }
        o.push_str("</div></div>");
    }
    o.push_str("</div>");

    o.push_str("<h2>Dead letters by reason</h2>");
    let _ = write!(
        o,
        "<p id=\"dead-letters\">{} dead-lettered by this orchestrator since it started</p>",
        c("dead_letters")
    );
    // The queue is the truth (it holds what every process dead-lettered, minus what was
    // replayed or purged); the core's own counts by reason are the fallback.
    let (caption, by_reason): (String, Vec<(String, u64)>) = match &d.dead_letter_queue {
        Some(Ok(q)) => (
            format!("In the dead-letter queue now: {}", q.total),
            q.by_reason
                .iter()
                .map(|(k, v)| (k.clone(), *v as u64))
                .collect(),
        ),
        Some(Err(e)) => (
            format!("The dead-letter queue could not be read: {e}"),
            Vec::new(),
        ),
        None => (
            "Counted by this orchestrator by reason".to_string(),
            d.stats
                .dead_letters_by_reason
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        ),
    };
    let caption = crate::wire::redact::redact_text(&caption);
    let _ = write!(o, "<p class=\"muted\">{}</p>", esc(&caption));
    if !by_reason.is_empty() {
        o.push_str("<table id=\"dead-letter-reasons\"><tr><th>reason</th><th>count</th></tr>");
        for (reason, n) in &by_reason {
            // A broker-side reason is whatever the dead-lettered message's sender wrote.
            let reason = crate::wire::redact::redact_text(reason);
            let _ = write!(o, "<tr><td>{}</td><td>{n}</td></tr>", esc(&reason));
        }
        o.push_str("</table>");
    }

    match (&d.selected, client) {
        (Some((rec, history)), _) => selected(&mut o, rec, history),
        (None, Some(c)) => {
            let _ = write!(o, "<h2>Journey {}</h2><p>No such journey.</p>", esc(c));
        }
        (None, None) => {
            o.push_str("<p class=\"muted\">Pick a journey to see its timeline and gate checks.</p>")
        }
    }
    let _ = write!(o, "<script>{SCRIPT}</script></body></html>");
    o
}

fn selected(o: &mut String, rec: &JourneyRecord, history: &[HistoryEntry]) {
    let status = rec.status();
    let _ = write!(
        o,
        "<h2 id=\"journey\">Journey {c} <span class=\"badge\">{stage}</span> \
         <span class=\"badge {sc}\">{status}</span></h2>\
         <p class=\"muted\">started {started} · in {stage} since {since} · playbook <code>{pb}</code></p>",
        c = esc(&rec.journey.client_id),
        stage = rec.journey.stage.as_str(),
        sc = status_class(status),
        started = rec
            .journey
            .started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        since = rec
            .journey
            .stage_started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        pb = esc(&rec.playbook),
    );
    if let Some(w) = &rec.work {
        o.push_str("<h3>Unit of work</h3><table id=\"work\"><tr><th>task</th><th>intent</th><th>status</th><th>attempts</th><th>last error</th></tr>");
        for t in &w.tasks {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&t.task_id),
                esc(&t.intent),
                esc(&json_word(&t.status)),
                t.attempts,
                esc(t.last_error.as_deref().unwrap_or(""))
            );
        }
        o.push_str("</table>");
    }
    // Every evaluation is in the history; the latest per stage is what mattered. (The
    // record's own `gate` is reset when the journey enters a new stage.)
    let mut gates: Vec<ValidationResult> = Vec::new();
    for e in history.iter().filter(|e| e.kind == "gate_evaluation") {
        if let Ok(g) = serde_json::from_value::<ValidationResult>(e.detail.clone()) {
            gates.retain(|x| x.stage != g.stage);
            gates.push(g);
        }
    }
    o.push_str("<h3>Gate checks</h3><div id=\"gate\">");
    if gates.is_empty() {
        o.push_str("<p class=\"muted\">No gate evaluated yet.</p>");
    }
    for g in gates.iter().rev() {
        let _ = write!(
            o,
            "<p>{} gate: <span class=\"badge {}\">{}</span> <span class=\"muted\">at {}</span></p>\
             <table class=\"gate\"><tr><th>check</th><th>result</th><th>detail</th></tr>",
            esc(&g.stage),
            if g.passed { "ok" } else { "bad" },
            if g.passed { "passed" } else { "not passed" },
            g.evaluated_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        for ch in &g.checks {
            let _ = write!(
                o,
                "<tr><td>{}</td><td><span class=\"badge {}\">{}</span></td><td>{}</td></tr>",
                esc(&ch.name),
                if ch.passed { "ok" } else { "bad" },
                if ch.passed { "pass" } else { "FAIL" },
                esc(&ch.message)
            );
        }
        o.push_str("</table>");
    }
    o.push_str("</div>");
    o.push_str("<h3>Timeline</h3><table id=\"timeline\"><tr><th>at</th><th>what</th><th>detail</th><th>cause</th></tr>");
    for e in history {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            esc(&e.kind),
            esc(&summary(&e.kind, &e.detail)),
            esc(e.cause.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</table>");
}

fn json_word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => String::new(),
    }
}

/// One line for a history entry's detail.
pub fn summary(kind: &str, d: &Value) -> String {
    let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
    match kind {
        "transition" => {
            let mut t = format!("{} → {}", s("from"), s("to"));
            if let Some(r) = d["reason"].as_str() {
                let _ = write!(t, " ({r})");
            }
            t
        }
        "gate_evaluation" => {
            let checks = d["checks"].as_array().map_or(0, Vec::len);
            let failed = d["checks"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|c| c["passed"] != true).count());
            if d["passed"] == true {
                format!("{} gate passed ({checks} checks)", s("stage"))
            } else {
                format!(
                    "{} gate not passed ({failed} of {checks} failed)",
                    s("stage")
                )
            }
        }
        "task_completed" => s("task_id"),
        "task_retry" => format!("{} attempt {}: {}", s("task_id"), d["attempt"], s("error")),
        "work_failed" => format!("{}: {}", s("task_id"), s("failure")),
        "started" | "work_completed" => s("stage"),
        _ => {
            let t = d.to_string();
            if t.chars().count() > 160 {
                format!("{}…", t.chars().take(160).collect::<String>())
            } else {
                t
            }
        }
    }
}
