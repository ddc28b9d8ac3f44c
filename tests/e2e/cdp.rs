//! A headless Chromium driven over the Chrome DevTools Protocol, through a WebSocket client
//! of a few dozen lines (no crate for it in the tree): enough to evaluate JavaScript in a
//! page, wait for a condition the page reaches on its own clock (its 5 s refresh), and take
//! screenshots. A one-shot `--dump-dom` cannot do that: it runs on virtual time, so the
//! test could not stop the orchestrator between two of the page's refreshes.
//!
//! Every read and wait is bounded; the browser is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one DevTools call may take (a full-page screenshot is the slowest).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The flags the machine notes require, plus a fresh profile directory.
pub fn base_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

pub struct Browser {
    ws: TcpStream,
    next_id: u64,
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on `url` and attaches to its page.
    pub async fn launch(bin: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(bin)
            .args(base_args(profile.path()))
            .args([
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1400,1000",
                url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // Chromium says where DevTools listen on stderr; the rest of stderr is drained so
        // the pipe never fills and blocks it.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let find = async {
            let mut seen = String::new();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.split("DevTools listening on ws://").nth(1) {
                    return Ok(rest.trim().to_string());
                }
                seen.push_str(&l);
                seen.push('\n');
            }
            Err(seen)
        };
        let endpoint = match tokio::time::timeout(CALL_TIMEOUT, find).await {
            Ok(Ok(e)) => e,
            Ok(Err(stderr)) => panic!("chromium exited before DevTools listened:\n{stderr}"),
            Err(_) => panic!("chromium did not start DevTools within {CALL_TIMEOUT:?}"),
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let host_port = endpoint.split('/').next().unwrap().to_string();

        // The page target for `url` (it shows up in the list as soon as the tab exists).
        let addr: std::net::SocketAddr = host_port.parse().unwrap();
        let list = journeyman::ops::client::Client::new(addr, Duration::from_secs(5));
        let find_page = async {
            loop {
                let targets: Vec<Value> = list.get("/json/list").await.unwrap_or_default();
                if let Some(ws) = targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                {
                    return ws.to_string();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let page = tokio::time::timeout(CALL_TIMEOUT, find_page)
            .await
            .expect("chromium lists its page");
        let path = page
            .strip_prefix(&format!("ws://{host_port}"))
            .unwrap()
            .to_string();
        let ws = handshake(&host_port, &path).await;
        let mut b = Browser {
            ws,
            next_id: 1,
            _child: child,
            _profile: profile,
        };
        b.call("Runtime.enable", json!({})).await;
        b
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        let ws = &mut self.ws;
        let exchange = async {
            send_text(ws, msg.as_bytes()).await;
            loop {
                let text = read_message(ws).await;
                let v: Value = serde_json::from_slice(&text).expect("DevTools sends JSON");
                if v["id"] == id {
                    return v;
                }
            }
        };
        let v = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("DevTools did not answer {method} within {CALL_TIMEOUT:?}"));
        assert!(v["error"].is_null(), "{method} failed: {v}");
        v["result"].clone()
    }

    /// Evaluates `expr` in the page and returns its value (JSON-serialisable values only).
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            r["exceptionDetails"].is_null(),
            "the page threw on {expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the page, checking a few times a second. While the
    /// page is still loading (`document.body` is null on a busy machine) it counts as false.
    pub async fn wait_for(&mut self, what: &str, expr: &str, within: Duration) {
        let guarded =
            format!("(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()");
        let wait = async {
            while self.eval(&guarded).await != Value::Bool(true) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        if tokio::time::timeout(within, wait).await.is_err() {
            let body = self
                .eval("document.body ? document.body.innerText : document.readyState")
                .await;
            panic!("the page did not show {what} within {within:?}; it shows:\n{body}");
        }
    }

    /// Saves a PNG of the whole page.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "a real PNG"
        );
        std::fs::write(path, png).unwrap();
    }
}

async fn handshake(host_port: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(host_port).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Byte by byte up to the blank line, so no frame bytes are read into a buffer here.
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .expect("DevTools answers the WebSocket handshake");
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "handshake refused: {head}"
    );
    s
}

/// One masked text frame (clients must mask, RFC 6455 §5.3).
async fn send_text(s: &mut TcpStream, payload: &[u8]) {
    let mask = [0x5a, 0x17, 0xc3, 0x8e];
    let mut f = vec![0x81u8];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).await.unwrap();
}

/// The next whole message (continuation frames joined; pings answered).
async fn read_message(s: &mut TcpStream) -> Vec<u8> {
    let mut message = Vec::new();
    loop {
        let b0 = s.read_u8().await.unwrap();
        let b1 = s.read_u8().await.unwrap();
        let len = match b1 & 0x7f {
            126 => s.read_u16().await.unwrap() as usize,
            127 => s.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mask = if b1 & 0x80 != 0 {
            let mut m = [0u8; 4];
            s.read_exact(&mut m).await.unwrap();
            Some(m)
        } else {
            None
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        match b0 & 0x0f {
            0x8 => panic!("DevTools closed the WebSocket"),
            0x9 => {
                // Pong with the same payload, masked like every client frame.
                let mask = [1u8, 2, 3, 4];
                let mut f = vec![0x8a, 0x80 | payload.len() as u8];
                f.extend_from_slice(&mask);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
                s.write_all(&f).await.unwrap();
                continue;
            }
            0xa => continue,
            _ => message.extend_from_slice(&payload),
        }
        if b0 & 0x80 != 0 {
            return message;
        }
    }
}
