//! A small HTTP/1.1 client for the orchestrator's own API: what the CLI's read commands and
//! a replica gathering its peers (see [`super::fleet`]) both speak.
//!
//! It is hyper's, which axum already brings in: plain HTTP to an address the operator
//! gives, no TLS (put a proxy in front to expose the API beyond the host or pod). It lives
//! in the library, with a `thiserror` error, because the HTTP server itself reads its peers
//! through it; `ops::client` builds the commands on top.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{HeaderMap, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at all: not running, wrong address, or too slow.
    #[error(
        "cannot reach the orchestrator's HTTP API at http://{addr}: {detail}. Is it running? \
         Give its address with --http-addr or JOURNEYMAN_HTTP_ADDR"
    )]
    Unreachable { addr: SocketAddr, detail: String },
    /// It answered with an error status; `message` is the API's own `error` text.
    #[error("{message} (HTTP {status} from {url})")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    /// It answered 2xx with a body this version cannot read (another version's API).
    #[error("the answer from {url} is not what this version expects: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("bad URL {url}")]
    BadUrl { url: String },
}

impl ClientError {
    /// The API answered 404: the thing asked for is not there (a journey another replica
    /// holds), which a fleet read treats as "ask the next one", not as a failure.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// What went wrong, without the advice about `--http-addr`: a replica reading its
    /// peers words its own advice (they come from `--peers`).
    pub fn detail(&self) -> String {
        match self {
            ClientError::Unreachable { detail, .. } => format!("no answer: {detail}"),
            other => other.to_string(),
        }
    }
}

/// An answer: status, headers and the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

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

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GETs `path` and decodes its JSON; an error status becomes the API's error message.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Ok(self.get_with_headers(path).await?.0)
    }

    /// Like [`Client::get`], with the answer's headers (a replica's identity is in them).
    pub async fn get_with_headers<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, HeaderMap), ClientError> {
        let a = self.fetch(path).await?;
        let url = format!("http://{}{path}", self.addr);
        if !a.status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&a.body).into_owned());
            return Err(ClientError::Status {
                url,
                status: a.status,
                message,
            });
        }
        let value = serde_json::from_slice(&a.body)
            .map_err(|source| ClientError::Decode { url, source })?;
        Ok((value, a.headers))
    }

    /// GETs `path`: its status and body, whatever the status.
    pub async fn raw(&self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        let a = self.fetch(path).await?;
        Ok((a.status, a.body))
    }

    /// GETs `path`: the whole answer, whatever the status.
    pub async fn fetch(&self, path: &str) -> Result<Answer, ClientError> {
        let url = format!("http://{}{path}", self.addr);
        let uri: hyper::Uri = url.parse().map_err(|_| ClientError::BadUrl { url })?;
        let unreachable = |detail: String| ClientError::Unreachable {
            addr: self.addr,
            detail,
        };
        let res = tokio::time::timeout(self.timeout, self.inner.get(uri))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = res.status();
        let headers = res.headers().clone();
        let body = tokio::time::timeout(self.timeout, res.into_body().collect())
            .await
            .map_err(|_| unreachable("the answer did not finish in time".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
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
pub fn encode(s: &str) -> String {
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
