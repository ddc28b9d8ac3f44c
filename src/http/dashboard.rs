//! The HTML dashboard at `/`: journeys by stage, counters, dead letters, small charts, and
//! one journey's page (`/?client=<id>`): what blocks it, what to run, its evidence and its
//! timeline.
//!
//! Rendered on the server, so the page is complete without JavaScript (and a headless
//! browser's `--dump-dom` sees it at once). Every 5 s a few lines of vanilla JS fetch the
//! same page's live part again (`?fragment=1`) and swap it in: one renderer for the first
//! load and every refresh, so a refresh cannot drop a colour or a column the first load
//! had. A failed fetch turns the readiness badge into "unreachable" and says since when
//! the page is stale. The charts are inline SVG drawn here (and, for journeys per stage
//! over time, by the page from its own samples): no build step, no CDN, works offline.

use std::fmt::Write;

use axum::extract::{Query, State};
use axum::response::Html;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, JourneySummary, Readiness, StatsView};
use crate::domain::gate::{Check, ValidationResult};
use crate::domain::journey::Stage;
use crate::domain::playbook::Playbook;
use crate::domain::record::{HistoryEntry, JourneyRecord};
use crate::domain::report::human;

pub(super) struct PageData {
    /// Counts read from the dead-letter queue (or why not), when a broker is configured.
    pub dead_letter_queue: Option<Result<crate::ops::dlq::Stats, String>>,
    pub readiness: Readiness,
    pub stats: StatsView,
    pub cards: Vec<Card>,
    pub selected: Option<Selected>,
    /// Every replica and whether it answered, when this one has `--peers`: the board
    /// then holds their journeys too.
    pub fleet: Option<Vec<super::fleet::ReplicaView>>,
}

/// One journey on the board: its summary and what a person needs to know at a glance.
pub(super) struct Card {
    pub summary: JourneySummary,
    /// The current stage's failing gate checks (name, message), for `awaiting_gate`.
    pub failing: Vec<(String, String)>,
    /// The failed task of a paused journey: (task, attempts, last error).
    pub failed_task: Option<(String, u32, String)>,
    /// The replica holding it, in a fleet view (`None`: a single orchestrator's page).
    pub replica: Option<String>,
    /// Another replica's journey: its page is on that replica's dashboard.
    pub elsewhere: Option<std::net::SocketAddr>,
}

impl Card {
    pub fn of(rec: &JourneyRecord) -> Self {
        Self {
            summary: JourneySummary::of(rec),
            failing: rec
                .gate
                .iter()
                .flat_map(|g| g.failed_checks())
                .map(|c| (c.name.clone(), c.message.clone()))
                .collect(),
            failed_task: rec
                .failed_task()
                .map(|(t, n, e)| (t.to_string(), n, e.to_string())),
            replica: None,
            elsewhere: None,
        }
    }

    /// A peer's journey, from its summary (the gate's checks and a failed task's error
    /// are on its own page).
    pub fn remote(summary: JourneySummary, peer: &super::fleet::Peer) -> Self {
        Self {
            summary,
            failing: Vec::new(),
            failed_task: None,
            replica: Some(peer.name.clone()),
            elsewhere: Some(peer.addr),
        }
    }
}

/// The journey a page is about.
pub(super) struct Selected {
    pub rec: JourneyRecord,
    pub history: Vec<HistoryEntry>,
    /// The playbook the journey is pinned to (what its gates ask for), if the store has it.
    pub playbook: Option<Playbook>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    client: Option<String>,
    /// `1`: only the live part, for the page's own refresh.
    fragment: Option<String>,
}

pub(super) async fn page(
    State(state): State<AppState>,
    Query(q): Query<PageQuery>,
) -> Result<Html<String>, ApiError> {
    let client = q.client.filter(|c| !c.is_empty());
    let data = super::page_data(&state, client.clone()).await?;
    let now = Utc::now();
    Ok(Html(if q.fragment.as_deref() == Some("1") {
        live(&data, client.as_deref(), now)
    } else {
        render(&data, client.as_deref(), now)
    }))
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

/// A client id as a shell word in a command to copy.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The colour of a status, by meaning: the page's CSS gives each class its colour, and the
/// browser test checks them.
pub fn status_class(status: &str) -> &'static str {
    match status {
        "live" | "completed" => "ok",
        // Waiting for evidence or a person: needs attention, is not broken.
        "awaiting_gate" | "rolling_back" => "warn",
        "paused" | "rollback_failed" => "bad",
        "cancelled" => "off",
        _ => "run",
    }
}

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2430;background:#f6f7f9}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.4rem 0 .5rem} h3{font-size:1rem;margin:1rem 0 .4rem}
.muted{color:#5f6775;font-size:.85rem}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.6rem;font-size:.8rem;background:#dde3ea}
.ok{background:rgb(205,236,207)}.warn{background:rgb(248,217,139)}.bad{background:rgb(246,196,196)}
.off{background:rgb(226,228,232);color:#5f6775}.run{background:rgb(219,232,251)}
.board{display:grid;grid-template-columns:repeat(6,minmax(0,1fr));gap:.6rem}
.col{background:#fff;border:1px solid #dde3ea;border-radius:.4rem;padding:.5rem;min-height:4rem}
.col h3{font-size:.95rem;margin:0 0 .4rem;display:flex;justify-content:space-between}
.card{border-top:1px solid #eef1f4;padding:.3rem 0;font-size:.85rem}
.card a{font-weight:600;color:#1f4f99;text-decoration:none}
.note{font-size:.78rem;margin-top:.15rem}.note code{font-size:.75rem}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
td,th{border:1px solid #dde3ea;padding:.25rem .5rem;text-align:left;vertical-align:top}
.counters{display:flex;gap:.6rem;flex-wrap:wrap;align-items:stretch}
.counters div{background:#fff;border:1px solid #dde3ea;border-radius:.4rem;padding:.4rem .7rem}
.counters b{display:block;font-size:1.2rem}
.sep{border:none!important;background:none!important;align-self:center;color:#5f6775;font-size:.8rem}
.charts{display:flex;gap:1rem;flex-wrap:wrap}
.chart{background:#fff;border:1px solid #dde3ea;border-radius:.4rem;padding:.5rem .7rem}
.chart h3{margin:0 0 .3rem;font-size:.9rem}
.todo{background:#fff;border-left:4px solid rgb(248,217,139);padding:.5rem .8rem;margin:.6rem 0}
.todo.bad{border-left-color:rgb(220,90,90);background:#fff}
pre.cmd{background:#1d2430;color:#e8edf3;padding:.4rem .6rem;border-radius:.3rem;font-size:.8rem;margin:.3rem 0;white-space:pre-wrap}
#fetch-error{background:rgb(246,196,196);border:1px solid #d08080;padding:.4rem .7rem;border-radius:.3rem;margin:.5rem 0}
code{font-size:.8rem}
"#;

/// Stage colours of the journeys-over-time chart, shared by the legend and the lines.
const STAGE_COLOURS: [(&str, &str); 6] = [
    ("sandbox", "#4c78a8"),
    ("pilot", "#f58518"),
    ("production", "#54a24b"),
    ("rollback", "#e45756"),
    ("completed", "#72b7b2"),
    ("cancelled", "#9d9da0"),
];

const SCRIPT: &str = r##"
// Every 5 s: fetch this page's live part again and swap it in; on failure say so.
const REFRESH_MS = 5000, FETCH_TIMEOUT_MS = 4000;
const COLOURS = __COLOURS__;
const KEY = "journeyman-stages-" + document.body.dataset.namespace;
let series = []; try { series = JSON.parse(sessionStorage.getItem(KEY) || "[]"); } catch (e) {}
let lastOk = new Date(), attempts = 0, ok = 0;
function sample() {
  const row = {t: Date.now()};
  document.querySelectorAll("#board .col").forEach(c => row[c.dataset.stage] = +c.dataset.count);
  series.push(row); series = series.slice(-360);
  try { sessionStorage.setItem(KEY, JSON.stringify(series)); } catch (e) {}
  draw();
}
function draw() {
  const svg = document.getElementById("stages-chart"); if (!svg) return;
  const W = 420, H = 120, L = 28, B = 16;
  const max = Math.max(1, ...series.flatMap(r => Object.keys(COLOURS).map(s => r[s] || 0)));
  const t0 = series.length ? series[0].t : 0, t1 = series.length ? series[series.length-1].t : 1;
  const x = t => L + (W - L - 4) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = v => H - B - (H - B - 6) * v / max;
  let out = `<line x1="${L}" y1="${H-B}" x2="${W-4}" y2="${H-B}" stroke="#aab"/>` +
    `<text x="${L-4}" y="${y(max)+4}" font-size="10" text-anchor="end">${max}</text>` +
    `<text x="${L-4}" y="${H-B}" font-size="10" text-anchor="end">0</text>` +
    `<text x="${L}" y="${H-2}" font-size="10">${series.length ? new Date(t0).toLocaleTimeString() : ""}</text>` +
    `<text x="${W-4}" y="${H-2}" font-size="10" text-anchor="end">${series.length ? new Date(t1).toLocaleTimeString() : ""}</text>`;
  for (const [stage, colour] of Object.entries(COLOURS)) {
    const pts = series.map(r => `${x(r.t).toFixed(1)},${y(r[stage] || 0).toFixed(1)}`).join(" ");
    if (series.length > 1) out += `<polyline fill="none" stroke="${colour}" stroke-width="2" points="${pts}"><title>${stage}</title></polyline>`;
    else if (series.length) out += `<circle cx="${x(series[0].t)}" cy="${y(series[0][stage] || 0)}" r="3" fill="${colour}"/>`;
  }
  svg.innerHTML = out;
}
function failed(word, why) {
  const b = document.getElementById("readiness");
  if (b) { b.textContent = word; b.className = "badge bad"; b.title = why; }
  const box = document.getElementById("fetch-error");
  box.hidden = false;
  box.textContent = `The orchestrator is ${word}: ${why} (at ${new Date().toLocaleTimeString()}). ` +
    `Everything below is as of ${lastOk.toLocaleTimeString()}; the page keeps trying every 5 s.`;
}
async function refresh() {
  const url = new URL(location.href); url.searchParams.set("fragment", "1");
  const ctl = new AbortController(); const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  attempts++;
  try {
    const r = await fetch(url, {cache: "no-store", signal: ctl.signal});
    const body = await r.text();
    if (!r.ok) { failed("erroring", `HTTP ${r.status}: ${body.slice(0, 200)}`); return; }
    document.getElementById("live").innerHTML = body;
    lastOk = new Date(); ok++;
    document.getElementById("fetch-error").hidden = true;
    document.getElementById("updated").textContent = lastOk.toLocaleTimeString();
  } catch (e) {
    failed("unreachable", e.name === "AbortError" ? `no answer within ${FETCH_TIMEOUT_MS / 1000} s` : `${e.message || e}`);
  } finally {
    clearTimeout(timer);
    document.body.dataset.refreshes = attempts; document.body.dataset.refreshesOk = ok;
    sample();
  }
}
sample();
setInterval(refresh, REFRESH_MS);
"##;

/// The whole page: a frame that stays, and the live part the script refreshes.
pub(super) fn render(d: &PageData, client: Option<&str>, now: DateTime<Utc>) -> String {
    let colours = format!(
        "{{{}}}",
        STAGE_COLOURS
            .iter()
            .map(|(s, c)| format!("\"{s}\":\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut o = String::with_capacity(48 * 1024);
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>journeyman: {ns}</title><style>{STYLE}</style></head>\
         <body data-namespace=\"{ns}\" data-refreshes=\"0\" data-refreshes-ok=\"0\">\
         <div class=\"muted\">rendered {at} · refreshed every 5 s, last <span id=\"updated\">never</span></div>\
         <div id=\"fetch-error\" role=\"alert\" hidden></div>\
         <div id=\"live\">{live}</div>",
        ns = esc(&d.stats.namespace),
        at = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        live = live(d, client, now),
    );
    let _ = write!(
        o,
        "<script>{}</script></body></html>",
        SCRIPT.replace("__COLOURS__", &colours)
    );
    o
}

/// The part of the page that every refresh replaces.
pub(super) fn live(d: &PageData, client: Option<&str>, now: DateTime<Utc>) -> String {
    let mut o = String::with_capacity(32 * 1024);
    let r = &d.readiness;
    let why = if r.ready {
        "connected to the broker, consuming, store open".to_string()
    } else {
        format!(
            "broker: {}, store: {}",
            if r.broker {
                "connected"
            } else {
                "not connected or not consuming"
            },
            if r.store { "open" } else { "not answering" }
        )
    };
    let _ = write!(
        o,
        "<h1>journeyman <span class=\"muted\">namespace {ns}</span> \
         <span id=\"readiness\" class=\"badge {rc}\" title=\"{why}\">{rt}</span></h1>",
        ns = esc(&d.stats.namespace),
        rc = if r.ready { "ok" } else { "bad" },
        rt = if r.ready { "ready" } else { "not ready" },
        why = esc(&why),
    );
    if let Some(replicas) = &d.fleet {
        replicas_table(&mut o, replicas);
    }
    counters(&mut o, d);
    charts(&mut o, d);
    board(&mut o, d, now);
    dead_letters(&mut o, d);
    match (&d.selected, client) {
        (Some(sel), _) => selected(&mut o, sel, now),
        (None, Some(c)) => {
            let held = d
                .cards
                .iter()
                .find(|k| k.summary.client_id == c && k.elsewhere.is_some());
            match held {
                Some(Card {
                    replica: Some(r),
                    elsewhere: Some(a),
                    ..
                }) => {
                    let _ = write!(
                        o,
                        "<h2>Journey {}</h2><p>Held by replica {}: see <a href=\"http://{}/?client={}\">its page there</a>.</p>",
                        esc(c),
                        esc(r),
                        esc(&a.to_string()),
                        url_component(c)
                    );
                }
                _ => {
                    let _ = write!(o, "<h2>Journey {}</h2><p>No such journey.</p>", esc(c));
                }
            }
        }
        (None, None) => o.push_str(
            "<p class=\"muted\">Pick a journey to see what blocks it, its evidence and its timeline.</p>",
        ),
    }
    o
}

/// The fleet's replicas: which answered, how many journeys each holds, and why one did
/// not (its journeys are missing from the board until it answers again).
fn replicas_table(o: &mut String, replicas: &[super::fleet::ReplicaView]) {
    let missing = replicas.iter().filter(|r| !r.answered).count();
    let _ = write!(
        o,
        "<h2>Replicas <span class=\"muted\">{} of {} answered</span></h2>",
        replicas.len() - missing,
        replicas.len()
    );
    if missing > 0 {
        let _ = write!(
            o,
            "<p class=\"todo bad\" id=\"fleet-partial\">{missing} replica{s} did not answer: \
             {their} journeys are missing below. The page asks again at every refresh.</p>",
            s = if missing == 1 { "" } else { "s" },
            their = if missing == 1 { "its" } else { "their" },
        );
    }
    o.push_str(
        "<table id=\"replicas\"><tr><th>replica</th><th>orchestrator</th><th>journeys</th><th>state</th></tr>",
    );
    for r in replicas {
        let (class, state) = match (&r.error, r.this) {
            (Some(e), _) => ("bad", format!("unreachable: {e}")),
            (None, true) => ("ok", "this replica".to_string()),
            (None, false) => ("ok", "answered".to_string()),
        };
        let _ = write!(
            o,
            "<tr class=\"replica\" data-replica=\"{n}\" data-answered=\"{a}\"><td>{n}</td><td>{id}</td><td>{j}</td>\
             <td><span class=\"badge {class}\">{st}</span></td></tr>",
            n = esc(&r.name),
            a = r.answered,
            id = esc(r.orchestrator_id.as_deref().unwrap_or("")),
            j = r.journeys.map_or("-".to_string(), |n| n.to_string()),
            st = esc(&state),
        );
    }
    o.push_str("</table>");
}

fn counters(o: &mut String, d: &PageData) {
    let c = |k: &str| d.stats.counters.get(k).copied().unwrap_or(0);
    let now = |status: &str| {
        d.cards
            .iter()
            .filter(|j| j.summary.status == status)
            .count()
    };
    o.push_str("<h2>Fleet</h2><div class=\"counters\" id=\"counters\">");
    // Now, from the store: what the journeys are doing at this moment.
    for (label, id, v, class) in [
        ("journeys", "journeys", d.cards.len(), ""),
        ("paused now", "paused-now", now("paused"), "bad"),
        (
            "rollback failed now",
            "rollback-failed-now",
            now("rollback_failed"),
            "bad",
        ),
        (
            "awaiting gate now",
            "awaiting-now",
            now("awaiting_gate"),
            "warn",
        ),
        (
            "rolling back now",
            "rolling-back-now",
            now("rolling_back"),
            "warn",
        ),
    ] {
        let class = if v > 0 { class } else { "" };
        let _ = write!(
            o,
            "<div id=\"count-{id}\" class=\"{class}\"><b>{v}</b>{label}</div>"
        );
    }
    o.push_str("<div class=\"sep\">since this orchestrator started:</div>");
    for (label, key) in [
        ("started", "journeys_started"),
        ("promotions", "promotions"),
        ("tasks dispatched", "tasks_dispatched"),
        ("retries", "retries"),
        ("rollbacks", "rollbacks_started"),
        ("pauses", "pauses"),
        ("dead-lettered", "dead_letters"),
    ] {
        let _ = write!(o, "<div id=\"count-{key}\"><b>{}</b>{label}</div>", c(key));
    }
    o.push_str("</div>");
}

/// Horizontal bars: (label, value, colour, text shown after the bar).
fn bars(o: &mut String, id: &str, rows: &[(String, f64, &str, String)]) {
    let label_w = 210.0;
    let bar_w = 170.0;
    let h = 16.0;
    let height = (rows.len().max(1) as f64) * (h + 4.0) + 4.0;
    let max = rows.iter().map(|r| r.1).fold(0.0_f64, f64::max).max(1e-9);
    let _ = write!(
        o,
        "<svg id=\"{id}\" width=\"{w}\" height=\"{height}\" role=\"img\">",
        w = label_w + bar_w + 90.0
    );
    if rows.is_empty() {
        o.push_str("<text x=\"0\" y=\"14\" font-size=\"11\" fill=\"#5f6775\">none so far</text>");
    }
    for (i, (label, v, colour, text)) in rows.iter().enumerate() {
        let y = 4.0 + i as f64 * (h + 4.0);
        let w = (bar_w * v / max).max(if *v > 0.0 { 1.0 } else { 0.0 });
        let _ = write!(
            o,
            "<text x=\"{lx}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{l}</text>\
             <rect x=\"{bx}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{colour}\"><title>{l}: {t}</title></rect>\
             <text x=\"{tx:.1}\" y=\"{ty}\" font-size=\"11\">{t}</text>",
            lx = label_w - 6.0,
            ty = y + 12.0,
            l = esc(label),
            bx = label_w,
            tx = label_w + w + 4.0,
            t = esc(text),
        );
    }
    o.push_str("</svg>");
}

fn charts(o: &mut String, d: &PageData) {
    o.push_str("<div class=\"charts\" id=\"charts\">");
    // Drawn by the page from its own samples of the board, one per refresh.
    o.push_str(
        "<div class=\"chart\"><h3>Journeys per stage over time</h3>\
         <svg id=\"stages-chart\" width=\"420\" height=\"120\" role=\"img\"></svg><div class=\"muted\">",
    );
    for (s, c) in STAGE_COLOURS {
        let _ = write!(o, "<span style=\"color:{c}\">■</span> {s} ");
    }
    o.push_str("<br>sampled by this page every 5 s while it is open</div></div>");

    let rt = &d.stats.round_trip;
    o.push_str("<div class=\"chart\"><h3>Task round trip (dispatch to reply)</h3>");
    let rows: Vec<(String, f64, &str, String)> = if rt.count == 0 {
        Vec::new()
    } else {
        [
            ("p50", rt.p50_ms),
            ("p99", rt.p99_ms),
            ("p99.9", rt.p999_ms),
            ("max", rt.max_ms),
        ]
        .into_iter()
        .map(|(l, v)| (l.to_string(), v, "#4c78a8", format!("{v:.1} ms")))
        .collect()
    };
    bars(o, "round-trip-chart", &rows);
    let _ = write!(
        o,
        "<div class=\"muted\">over {} round trips, all intents</div></div>",
        rt.count
    );

    // Per intent: retries (the orchestrator's counters) and dead letters (the queue's).
    let queue_by_intent = match &d.dead_letter_queue {
        Some(Ok(q)) => Some(&q.by_intent),
        _ => None,
    };
    let mut intents: Vec<&String> = d.stats.by_intent.keys().collect();
    if let Some(q) = queue_by_intent {
        intents.extend(q.keys());
    }
    intents.sort();
    intents.dedup();
    let mut rows = Vec::new();
    for intent in intents {
        let s = d.stats.by_intent.get(intent).cloned().unwrap_or_default();
        let dead = match queue_by_intent {
            Some(q) => q.get(intent).copied().unwrap_or(0) as u64,
            None => s.failed,
        };
        // Only the intents with something to look at: a row of zeros per intent would
        // bury the one that matters.
        if s.retried == 0 && dead == 0 {
            continue;
        }
        let name = if intent.is_empty() {
            "(intent not recorded)"
        } else {
            intent.as_str()
        };
        rows.push((
            format!("{name} retries"),
            s.retried as f64,
            "rgb(230,170,40)",
            format!("{} of {} dispatched", s.retried, s.dispatched),
        ));
        rows.push((
            format!("{name} dead letters"),
            dead as f64,
            "rgb(220,90,90)",
            dead.to_string(),
        ));
    }
    o.push_str("<div class=\"chart\"><h3>Retries and dead letters per intent</h3>");
    bars(o, "intent-chart", &rows);
    let _ = write!(
        o,
        "<div class=\"muted\">retries since this orchestrator started; dead letters {}</div></div>",
        if queue_by_intent.is_some() {
            "in the queue now"
        } else {
            "as failed tasks counted by this orchestrator"
        }
    );
    o.push_str("</div>");
}

fn board(o: &mut String, d: &PageData, now: DateTime<Utc>) {
    o.push_str("<h2>Journeys by stage</h2><div class=\"board\" id=\"board\">");
    for stage in Stage::ALL {
        let st = stage.as_str();
        let mine: Vec<&Card> = d.cards.iter().filter(|j| j.summary.stage == st).collect();
        let _ = write!(
            o,
            "<div class=\"col\" id=\"stage-{st}\" data-stage=\"{st}\" data-count=\"{n}\">\
             <h3>{st} <span class=\"count badge\">{n}</span></h3><div class=\"cards\">",
            n = mine.len()
        );
        for card in mine {
            let j = &card.summary;
            let in_stage = human((now - j.stage_started_at).num_milliseconds().max(0) as f64 / 1e3);
            // Another replica's journey links to its own dashboard, which holds its page.
            let base = card
                .elsewhere
                .map(|a| format!("http://{a}"))
                .unwrap_or_default();
            let _ = write!(
                o,
                "<div class=\"card\" data-client=\"{c}\" data-status=\"{s}\" data-replica=\"{r}\"><a href=\"{base}/?client={u}\">{c}</a> \
                 <span class=\"badge status {sc}\">{s}</span>{rb}<br>\
                 <span class=\"muted\">{done}/{total} tasks · in stage {in_stage}</span>",
                c = esc(&j.client_id),
                r = esc(card.replica.as_deref().unwrap_or("")),
                rb = card
                    .replica
                    .as_deref()
                    .map(|r| format!(" <span class=\"badge replica\" title=\"the replica that holds it\">{}</span>", esc(r)))
                    .unwrap_or_default(),
                base = esc(&base),
                u = url_component(&j.client_id),
                sc = status_class(&j.status),
                s = esc(&j.status),
                done = j.tasks_done,
                total = j.tasks_total,
            );
            card_note(o, card);
            o.push_str("</div>");
        }
        o.push_str("</div></div>");
    }
    o.push_str("</div>");
}

/// Under a card: why it waits and what to run.
fn card_note(o: &mut String, card: &Card) {
    let j = &card.summary;
    let c = shell_word(&j.client_id);
    match j.status.as_str() {
        "awaiting_gate" if !card.failing.is_empty() => {
            o.push_str("<div class=\"note failing\">gate: ");
            let shown: Vec<String> = card
                .failing
                .iter()
                .take(3)
                .map(|(n, m)| format!("<b>{}</b> {}", esc(n), esc(m)))
                .collect();
            o.push_str(&shown.join("; "));
            if card.failing.len() > 3 {
                let _ = write!(o, "; and {} more", card.failing.len() - 3);
            }
            o.push_str("</div>");
        }
        "paused" => {
            if let Some((task, attempts, err)) = &card.failed_task {
                let _ = write!(
                    o,
                    "<div class=\"note\">{} failed after {attempts} attempts: {}</div>",
                    esc(task),
                    esc(err)
                );
            }
            let _ = write!(
                o,
                "<div class=\"note\">resume: <code>journeyman journey resume {}</code></div>",
                esc(&c)
            );
        }
        "rollback_failed" => {
            let _ = write!(
                o,
                "<div class=\"note\">retry: <code>journeyman journey rollback {} --reason …</code></div>",
                esc(&c)
            );
        }
        _ => {}
    }
}

fn dead_letters(o: &mut String, d: &PageData) {
    let c = d.stats.counters.get("dead_letters").copied().unwrap_or(0);
    o.push_str("<h2>Dead letters</h2><div id=\"dead-letters\">");
    let _ = write!(
        o,
        "<p><b>{c}</b> dead-lettered by this orchestrator since it started: a counter, \
         back to 0 when it restarts, never lower when letters are replayed or purged.</p>"
    );
    // The queue is the truth (it holds what every process dead-lettered, minus what was
    // replayed or purged); the core's own counts by reason are the fallback.
    let (caption, by_reason): (String, Vec<(String, u64)>) = match &d.dead_letter_queue {
        Some(Ok(q)) => (
            format!(
                "<b>{}</b> in the dead-letter queue now: what waits for someone, from every \
                 process in the namespace (agents too) and from before this orchestrator \
                 started, minus what was replayed or purged. So the two numbers differ.",
                q.total
            ),
            q.by_reason
                .iter()
                .map(|(k, v)| (k.clone(), *v as u64))
                .collect(),
        ),
        Some(Err(e)) => (
            format!("The dead-letter queue could not be read: {}", esc(e)),
            Vec::new(),
        ),
        None => (
            "Counted by this orchestrator, by reason (no broker to read the queue from):"
                .to_string(),
            d.stats
                .dead_letters_by_reason
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        ),
    };
    let caption = crate::wire::redact::redact_text(&caption);
    let _ = write!(o, "<p id=\"dead-letter-queue\">{caption}</p>");
    if !by_reason.is_empty() {
        o.push_str("<table id=\"dead-letter-reasons\"><tr><th>reason</th><th>count</th></tr>");
        for (reason, n) in &by_reason {
            // A broker-side reason is whatever the dead-lettered message's sender wrote.
            let reason = crate::wire::redact::redact_text(reason);
            let _ = write!(o, "<tr><td>{}</td><td>{n}</td></tr>", esc(&reason));
        }
        o.push_str("</table>");
    }
    o.push_str(
        "<p class=\"muted\">Look at them with <code>journeyman dlq list</code> (or \
         <code>dlq show ID</code>), put them back with <code>dlq replay</code>.</p></div>",
    );
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "{} ago",
        human((now - t).num_milliseconds().max(0) as f64 / 1e3)
    )
}

fn selected(o: &mut String, sel: &Selected, now: DateTime<Utc>) {
    let rec = &sel.rec;
    let status = rec.status();
    let client = &rec.journey.client_id;
    let _ = write!(
        o,
        "<h2 id=\"journey\">Journey {c} <span class=\"badge\">{stage}</span> \
         <span class=\"badge status {sc}\">{status}</span></h2>\
         <p class=\"muted\">started {started} · in {stage} since {since} ({in_stage}) · playbook <code>{pb}</code></p>",
        c = esc(client),
        stage = rec.journey.stage.as_str(),
        sc = status_class(status),
        started = ts(rec.journey.started_at),
        since = ts(rec.journey.stage_started_at),
        in_stage = ago(rec.journey.stage_started_at, now),
        pb = esc(&rec.playbook),
    );
    what_to_do(o, sel, now);
    gate(o, sel);
    evidence(o, rec, now);
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
    timeline(o, &sel.history);
}

/// What blocks the journey and the commands that unblock it.
fn what_to_do(o: &mut String, sel: &Selected, now: DateTime<Utc>) {
    let rec = &sel.rec;
    let c = shell_word(&rec.journey.client_id);
    let cmd = |o: &mut String, lines: &[String]| {
        let _ = write!(o, "<pre class=\"cmd\">{}</pre>", esc(&lines.join("\n")));
    };
    o.push_str("<div id=\"what-to-do\">");
    match rec.status() {
        "paused" => {
            o.push_str("<div class=\"todo bad\"><b>Paused:</b> ");
            if let Some((task, attempts, err)) = rec.failed_task() {
                let _ = write!(
                    o,
                    "task <code>{}</code> failed after {attempts} attempts: {}. ",
                    esc(task),
                    esc(err)
                );
            }
            o.push_str(
                "Fix the cause (the agent, its input), then resume: the failed task runs again, \
                 the completed ones are kept.",
            );
            cmd(o, &[format!("journeyman journey resume {c}")]);
            o.push_str("</div>");
        }
        "rollback_failed" => {
            o.push_str("<div class=\"todo bad\"><b>The rollback failed.</b> Retry it:");
            cmd(
                o,
                &[format!(
                    "journeyman journey rollback {c} --reason \"retry after fixing …\""
                )],
            );
            o.push_str("</div>");
        }
        "awaiting_gate" | "live" => {
            let Some(g) = &rec.gate else {
                return o.push_str("</div>");
            };
            if g.passed {
                let next = if rec.journey.stage == Stage::Production {
                    format!("journeyman journey complete {c}")
                } else {
                    format!("journeyman journey promote {c}")
                };
                o.push_str("<div class=\"todo\"><b>The gate has passed.</b> Without auto-promotion, move it on:");
                cmd(o, &[next]);
                o.push_str("</div>");
                return o.push_str("</div>");
            }
            let _ = write!(
                o,
                "<div class=\"todo\"><b>Blocked by the {} gate:</b> {} of {} checks fail. ",
                esc(&g.stage),
                g.failed_checks().count(),
                g.checks.len()
            );
            let criteria = sel
                .playbook
                .as_ref()
                .and_then(|p| p.stages.get(&g.stage))
                .map(|s| s.exit_criteria.clone())
                .unwrap_or_default();
            let mut lines = Vec::new();
            o.push_str("<ul>");
            for check in g.failed_checks() {
                let spec = criteria.iter().find(|c| c.name == check.name);
                let (needs, command) = match spec.map(|s| &s.check) {
                    Some(Check::Metric { metric, op, value }) => (
                        format!("the metric {metric} {} {value}", op_word(op)),
                        Some(format!("--metric {metric}=<value>")),
                    ),
                    Some(Check::Flag { flag, equals }) => (
                        format!("the flag {flag} = {equals}"),
                        Some(format!("--flag {flag}={equals}")),
                    ),
                    Some(Check::AllFlags { prefix }) => (
                        format!("every {prefix}* flag true (at least one)"),
                        Some(format!("--flag {prefix}<name>=true")),
                    ),
                    Some(Check::Events { event, max, .. }) => (
                        format!(
                            "at most {max} {event} events in its window: wait for them to age out"
                        ),
                        None,
                    ),
                    Some(Check::MinTimeInStage { min_time_in_stage }) => {
                        let at = chrono::Duration::from_std(*min_time_in_stage)
                            .ok()
                            .map(|d| ts(rec.journey.stage_started_at + d))
                            .unwrap_or_default();
                        (format!("time in the stage: wait until {at}"), None)
                    }
                    None => ("see the check's message".to_string(), None),
                };
                let _ = write!(
                    o,
                    "<li><b>{}</b>: {} <span class=\"muted\">(needs {})</span></li>",
                    esc(&check.name),
                    esc(&check.message),
                    esc(&needs)
                );
                if let Some(c) = command {
                    lines.push(c);
                }
            }
            o.push_str("</ul>");
            if !lines.is_empty() {
                o.push_str("Report the evidence (an upstream agent does it with <code>journey.evidence</code>; by hand:)");
                let mut all = vec![format!(
                    "journeyman journey evidence {c} {}",
                    lines.join(" ")
                )];
                all.push(format!(
                    "journeyman journey status {c}      # the gate is evaluated again on new evidence"
                ));
                cmd(o, &all);
            }
            let _ = write!(
                o,
                "<span class=\"muted\">last evaluated {}</span></div>",
                ago(g.evaluated_at, now)
            );
        }
        _ => {}
    }
    o.push_str("</div>");
}

fn op_word(op: &crate::domain::gate::Op) -> String {
    match serde_json::to_value(op) {
        Ok(Value::String(s)) => s,
        _ => format!("{op:?}"),
    }
}

/// The latest evaluation of each stage's gate, newest first.
fn gate(o: &mut String, sel: &Selected) {
    // Every evaluation is in the history; the latest per stage is what mattered. (The
    // record's own `gate` is reset when the journey enters a new stage.)
    let mut gates: Vec<ValidationResult> = Vec::new();
    for e in sel.history.iter().filter(|e| e.kind == "gate_evaluation") {
        if let Ok(g) = serde_json::from_value::<ValidationResult>(e.detail.clone()) {
            gates.retain(|x| x.stage != g.stage);
            gates.push(g);
        }
    }
    o.push_str("<h3>Gate checks</h3><div id=\"gate\">");
    if gates.is_empty() {
        o.push_str("<p class=\"muted\">No gate evaluated yet (it is, once the stage's work completes).</p>");
    }
    for g in gates.iter().rev() {
        let _ = write!(
            o,
            "<p>{} gate: <span class=\"badge {}\">{}</span> <span class=\"muted\">at {}</span></p>\
             <table class=\"gate\"><tr><th>check</th><th>result</th><th>detail</th></tr>",
            esc(&g.stage),
            if g.passed { "ok" } else { "bad" },
            if g.passed { "passed" } else { "not passed" },
            ts(g.evaluated_at)
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
}

fn evidence(o: &mut String, rec: &JourneyRecord, now: DateTime<Utc>) {
    let e = &rec.evidence;
    o.push_str("<h3>Evidence</h3>");
    if e.metrics.is_empty() && e.flags.is_empty() && e.events.is_empty() {
        o.push_str("<p class=\"muted\" id=\"evidence\">None reported yet.</p>");
        return;
    }
    o.push_str(
        "<table id=\"evidence\"><tr><th>name</th><th>value</th><th>source</th><th>when</th></tr>",
    );
    let row = |o: &mut String, name: &str, value: String, source: &str, at: DateTime<Utc>| {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
            esc(name),
            esc(&value),
            esc(source),
            ts(at),
            ago(at, now)
        );
    };
    for (name, m) in &e.metrics {
        row(o, name, m.value.to_string(), &m.source, m.at);
    }
    for (name, f) in &e.flags {
        row(o, name, f.value.to_string(), &f.source, f.at);
    }
    for ev in &e.events {
        let value = match (&ev.severity, &ev.detail) {
            (Some(s), Some(d)) => format!("event, {s}: {d}"),
            (Some(s), None) => format!("event, {s}"),
            (None, Some(d)) => format!("event: {d}"),
            (None, None) => "event".to_string(),
        };
        row(o, &ev.name, value, &ev.source, ev.at);
    }
    o.push_str("</table>");
}

/// What a message that caused history entries was, from the first entry it caused.
fn describe_cause(first: &HistoryEntry) -> String {
    let d = &first.detail;
    let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
    match first.kind.as_str() {
        "started" => "the journey.start command".into(),
        "evidence" => format!("evidence from {}", s("reported_by")),
        "task_completed" => format!("the reply of task {}", s("task_id")),
        "task_retry" => format!("an error reply of task {}", s("task_id")),
        "reply_ignored" => "a reply that was ignored".into(),
        "resumed" => "the journey.resume command".into(),
        "replayed" | "replayed_with_edit" => format!("a replayed {}", s("intent")),
        "transition" => match d["reason"].as_str() {
            Some(r) => format!("a {} command ({r})", s("to")),
            None => format!("the move to {}", s("to")),
        },
        other => format!("a message ({})", other.replace('_', " ")),
    }
}

fn timeline(o: &mut String, history: &[HistoryEntry]) {
    use std::collections::HashMap;
    let mut first: HashMap<&str, &HistoryEntry> = HashMap::new();
    for e in history {
        if let Some(c) = e.cause.as_deref() {
            first.entry(c).or_insert(e);
        }
    }
    o.push_str(
        "<h3>Timeline <span class=\"muted\">newest first</span></h3>\
         <table id=\"timeline\"><tr><th>at</th><th>what</th><th>detail</th><th>caused by</th></tr>",
    );
    for e in history.iter().rev() {
        let cause = match e.cause.as_deref() {
            // Not a message id: the orchestrator's own cause (e.g. a timer), readable as is.
            Some(c) if uuid::Uuid::parse_str(c).is_err() => esc(c),
            Some(c) => {
                let what = first
                    .get(c)
                    .map(|f| describe_cause(f))
                    .unwrap_or_else(|| "a message".into());
                let short: String = c.chars().take(8).collect();
                format!(
                    "{} <span class=\"muted\" title=\"message id {}\">{}</span>",
                    esc(&what),
                    esc(c),
                    esc(&short)
                )
            }
            None => "<span class=\"muted\">the orchestrator</span>".into(),
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{cause}</td></tr>",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            esc(&e.kind.replace('_', " ")),
            esc(&summary(&e.kind, &e.detail)),
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
        "evidence" => {
            let e = &d["evidence"];
            let mut parts = Vec::new();
            for (k, v) in e["metrics"].as_object().into_iter().flatten() {
                parts.push(format!("{k}={v}"));
            }
            for (k, v) in e["flags"].as_object().into_iter().flatten() {
                parts.push(format!("{k}={v}"));
            }
            for ev in e["events"].as_array().into_iter().flatten() {
                parts.push(format!("event {}", ev["name"].as_str().unwrap_or("")));
            }
            format!("from {}: {}", s("reported_by"), parts.join(", "))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_colour() {
        assert_eq!(status_class("live"), "ok");
        assert_eq!(status_class("awaiting_gate"), "warn");
        assert_eq!(status_class("paused"), "bad");
        assert_eq!(status_class("cancelled"), "off");
        assert_eq!(status_class("running"), "run");
        for class in ["ok", "warn", "bad", "off", "run"] {
            assert!(STYLE.contains(&format!(".{class}{{background:")), "{class}");
        }
    }

    #[test]
    fn client_ids_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(shell_word("client-001"), "client-001");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("o'neil"), r"'o'\''neil'");
    }
}
