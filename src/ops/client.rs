//! The other side of the API: a small HTTP/1.1 client and the commands that read a running
//! orchestrator through it (`journey list`, `journey history`, `report`).
//!
//! These never open the orchestrator's sled directory (it holds it locked). The client is
//! hyper's, which axum already brings in: plain HTTP to an address the operator gives, no
//! TLS (put a proxy in front to expose the API beyond the host or pod).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::domain::record::HistoryEntry;
use crate::domain::report::{self, Report};
use crate::http::JourneySummary;

pub struct Client {
    addr: SocketAddr,
    inner: HyperClient<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            addr,
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// GETs `path` and decodes its JSON; an error status becomes the API's error message.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self.raw(path).await?;
        let url = format!("http://{}{path}", self.addr);
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("{msg} (HTTP {status} from {url})");
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the answer from {url} is not what this version expects"))
    }

    /// GETs `path`: its status and body, whatever the status.
    pub async fn raw(&self, path: &str) -> Result<(StatusCode, Bytes)> {
        let url = format!("http://{}{path}", self.addr);
        let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow!(
                "cannot reach the orchestrator's HTTP API at http://{}: {e}. Is it running? \
                 Give its address with --http-addr or JOURNEYMAN_HTTP_ADDR",
                self.addr
            )
        };
        let res = tokio::time::timeout(self.timeout, self.inner.get(uri))
            .await
            .map_err(|_| unreachable(&format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(&error_chain(&e)))?;
        let status = res.status();
        let body = tokio::time::timeout(self.timeout, res.into_body().collect())
            .await
            .map_err(|_| unreachable(&"the answer did not finish in time"))?
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok((status, body))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Percent-encodes one path segment or query value.
fn encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// `journeyman journey list`.
pub async fn journey_list(
    client: &Client,
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
    let list: Vec<JourneySummary> = client.get(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_list(&list, chrono::Utc::now()));
    }
    Ok(())
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

/// `journeyman journey status <client> --via-http`: the same view as over the protocol.
pub async fn journey_status(client: &Client, client_id: &str, json: bool) -> Result<()> {
    let state: serde_json::Value = client
        .get(&format!("/api/journeys/{}", encode(client_id)))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        super::show::print_state(&state);
    }
    Ok(())
}

/// `journeyman journey history <client>`.
pub async fn journey_history(client: &Client, client_id: &str, json: bool) -> Result<()> {
    let h: Vec<HistoryEntry> = client
        .get(&format!("/api/journeys/{}/history", encode(client_id)))
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

/// `journeyman report`.
pub async fn report(client: &Client, json: bool) -> Result<()> {
    let r: Report = client.get("/api/report").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::render_text(&r));
    }
    Ok(())
}
