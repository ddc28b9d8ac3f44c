//! The orchestrator's HTTP side: `/healthz`, `/readyz`, `/metrics`, a JSON API over its
//! journeys, and an HTML dashboard, all served from the orchestrator's own process.
//!
//! Everything here reads: the store (sled is safe to read while the orchestrator's loop
//! writes), the [`Stats`] counters and the labelled [`Metrics`]. Nothing here writes the
//! store, publishes, or decides anything about a journey; commands still go through the
//! protocol. Other processes (the CLI's `journey list|history` and `report`) read the
//! orchestrator through this API, never by opening its sled directory, which it holds
//! locked. [`client`] is that other side.
//!
//! With `--peers`, a replica also offers the fleet's view (`/api/fleet/journeys`,
//! `/api/fleet/report`, and the dashboard): it asks its peers' local endpoints, adds its
//! own journeys, and says which peers did not answer (see [`fleet`]).
//!
//! Store scans (every journey record, every history) run on the blocking pool: they are
//! scans of per-client records, fine for thousands of journeys, and must not stall the
//! runtime that also runs the orchestrator.

pub mod client;
pub mod dashboard;
pub mod fleet;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::broker::Names;
use crate::domain::record::{HistoryEntry, JourneyRecord, state_view};
use crate::domain::report::{self, JourneyInput, Report};
use crate::domain::work::TaskStatus;
use crate::orchestrator::Stats;
use crate::store::{Store, StoreError};

pub use crate::orchestrator::stats::Metrics;

/// The default address of `journeyman orchestrator` and of the commands that read it.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot serve HTTP on {addr}: {source} (choose another address with --http-addr or JOURNEYMAN_HTTP_ADDR)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Orchestrator(#[from] crate::orchestrator::OrchestratorError),
}

/// The address the server bound, reported back to whoever holds a clone (tests ask for
/// port 0 and read the real port here).
#[derive(Debug, Clone)]
pub struct BoundAddr(Arc<watch::Sender<Option<SocketAddr>>>);

impl Default for BoundAddr {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl BoundAddr {
    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.borrow()
    }

    /// Waits until the server has bound.
    pub async fn wait(&self) -> SocketAddr {
        let mut rx = self.0.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or_else(|| unreachable!("waited for Some")),
            // The sender lives in `self`: it cannot be dropped while we wait.
            Err(_) => unreachable!("BoundAddr's sender outlives its waiters"),
        }
    }

    fn set(&self, addr: SocketAddr) {
        self.0.send_replace(Some(addr));
    }
}

/// This replica among its peers: whom the fleet endpoints and the dashboard ask.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `--peers`: `host:port` entries, resolved on every gathering (a name with several
    /// addresses means each). May include this replica itself, which is recognised by its
    /// answer and skipped; empty: the dashboard shows this replica only.
    pub peers: Vec<String>,
    /// How long a peer may take before it counts as unreachable; the dashboard waits for
    /// the slowest peer, so this bounds a page load.
    pub timeout: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Who this server is, said on every answer so peers can name it and recognise themselves.
#[derive(Debug, Clone)]
struct Identity {
    /// Random per process (see [`fleet::INSTANCE_HEADER`]).
    instance: String,
    /// `--orchestrator-id`, when this server fronts an orchestrator.
    orchestrator_id: Option<String>,
    /// `--replica` as `i/n`, when this server fronts an orchestrator.
    replica: Option<String>,
}

/// What the handlers read. Cloning shares everything.
#[derive(Clone)]
pub struct AppState {
    store: Store,
    stats: Arc<Stats>,
    /// Counters by intent and reason, fed by the core.
    metrics: Arc<Metrics>,
    names: Names,
    /// The broker, for reading the dead-letter queue (as `journeyman dlq` does); `None`:
    /// the dead-letter endpoints answer 503.
    amqp_url: Option<String>,
    identity: Arc<Identity>,
    fleet: Arc<FleetConfig>,
    /// The address this server bound, to name itself when no peer entry turned out to be it.
    bound: Arc<OnceLock<SocketAddr>>,
    /// Peer entries that answered with this server's own instance id: skipped from then on
    /// (no request to itself on every refresh), and the first one's name is this
    /// replica's name in the fleet view, as its peers know it.
    known_self: Arc<Mutex<Vec<fleet::Peer>>>,
}

impl AppState {
    pub fn new(store: Store, stats: Arc<Stats>, names: Names) -> Self {
        Self::with_metrics(store, stats, Arc::new(Metrics::default()), names)
    }

    pub fn with_metrics(
        store: Store,
        stats: Arc<Stats>,
        metrics: Arc<Metrics>,
        names: Names,
    ) -> Self {
        Self {
            store,
            stats,
            metrics,
            names,
            amqp_url: None,
            identity: Arc::new(Identity {
                instance: uuid::Uuid::new_v4().simple().to_string(),
                orchestrator_id: None,
                replica: None,
            }),
            fleet: Arc::new(FleetConfig::default()),
            bound: Arc::new(OnceLock::new()),
            known_self: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Names the orchestrator this server fronts, on every answer and in the fleet view.
    pub fn with_identity(
        mut self,
        orchestrator_id: &str,
        replica: crate::domain::partition::Replica,
    ) -> Self {
        let identity = Arc::make_mut(&mut self.identity);
        identity.orchestrator_id = Some(orchestrator_id.to_string());
        identity.replica = Some(replica.to_string());
        self
    }

    /// Serves the fleet's view by asking these peers.
    pub fn with_fleet(mut self, fleet: FleetConfig) -> Self {
        self.fleet = Arc::new(fleet);
        self
    }

    /// Serves `/api/dead-letters` by reading the dead-letter queue on this broker.
    pub fn with_broker(mut self, amqp_url: &str) -> Self {
        self.amqp_url = Some(amqp_url.to_string());
        self
    }
}

/// The running server; dropping it stops it (so a restarted orchestrator can bind again).
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// Dropped with the handle: the server stops accepting, frees the port, and closes its
    /// open connections once their request is answered. Aborting the server's task alone
    /// would leave the connections' own tasks serving on browsers' keep-alive connections,
    /// so a stopped orchestrator's dashboard would go on answering "ready".
    _stop: tokio::sync::oneshot::Sender<()>,
    _task: JoinHandle<()>,
}

/// Runs an orchestrator with its HTTP surface on `addr`. The port is bound before the data
/// directory is opened, so a busy port fails fast and leaves nothing behind.
pub async fn serve_orchestrator(
    config: crate::orchestrator::Config,
    stats: Arc<Stats>,
    addr: SocketAddr,
    bound: &BoundAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), HttpError> {
    serve_orchestrator_with(config, stats, addr, FleetConfig::default(), bound, shutdown).await
}

/// [`serve_orchestrator`] as one replica of a fleet: its API and dashboard also show the
/// journeys of `fleet.peers`.
pub async fn serve_orchestrator_with(
    config: crate::orchestrator::Config,
    stats: Arc<Stats>,
    addr: SocketAddr,
    fleet: FleetConfig,
    bound: &BoundAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), HttpError> {
    let listener = bind(addr).await?;
    let (orchestrator_id, replica) = (config.orchestrator_id.clone(), config.replica);
    let names = config.names.clone();
    let amqp_url = config.amqp_url.clone();
    let _ = stats.replica.set(crate::orchestrator::stats::Identity {
        id: config.orchestrator_id.clone(),
        replica: config.replica,
    });
    let orchestrator = crate::orchestrator::Orchestrator::open(config, stats.clone()).await?;
    let state = AppState::with_metrics(
        orchestrator.store().clone(),
        stats.clone(),
        stats.metrics.clone(),
        names,
    )
    .with_broker(&amqp_url)
    .with_identity(&orchestrator_id, replica)
    .with_fleet(fleet);
    // Aborted when this returns, so a restarted orchestrator can bind the same address.
    let _server = serve(listener, state, bound)?;
    orchestrator.run(shutdown).await?;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Binds `addr`, reports the bound address to `bound`, and serves until dropped.
pub async fn spawn(
    addr: SocketAddr,
    state: AppState,
    bound: &BoundAddr,
) -> Result<ServerHandle, HttpError> {
    serve(bind(addr).await?, state, bound)
}

fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    bound: &BoundAddr,
) -> Result<ServerHandle, HttpError> {
    let addr = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    bound.set(addr);
    let _ = state.bound.set(addr);
    info!(%addr, "serving HTTP: /healthz /readyz /metrics /api/journeys /");
    let app = router(state);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            warn!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(ServerHandle {
        addr,
        _stop: stop,
        _task: task,
    })
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/journeys", get(list_journeys))
        .route("/api/journeys/{client}", get(journey))
        .route("/api/journeys/{client}/history", get(history))
        .route("/api/report", get(report))
        .route("/api/fleet/journeys", get(fleet_journeys))
        .route("/api/fleet/report", get(fleet_report))
        .route("/api/stats", get(stats))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/stats", get(dead_letter_stats))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            identify,
        ))
        .with_state(state)
}

/// Puts this server's identity on every answer (see [`fleet::INSTANCE_HEADER`]).
async fn identify(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut res = next.run(req).await;
    let id = &state.identity;
    let headers = res.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(&id.instance) {
        headers.insert(fleet::INSTANCE_HEADER, v);
    }
    if let Some(v) = id
        .orchestrator_id
        .as_deref()
        .and_then(|o| header::HeaderValue::from_str(o).ok())
    {
        headers.insert(fleet::ORCHESTRATOR_HEADER, v);
    }
    res
}

/// An API error: a status and a JSON body `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// Runs a store read on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// The process is up and serving.
async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// Connected to the broker and consuming every queue.
    pub broker: bool,
    /// The store answers reads.
    pub store: bool,
}

fn readiness(state: &AppState) -> Readiness {
    let broker = state.stats.ready.load(Ordering::Relaxed);
    let store = state.store.journey::<Value>("").is_ok();
    Readiness {
        ready: broker && store,
        broker,
        store,
    }
}

/// 200 when connected, consuming, and the store is open; 503 otherwise.
async fn readyz(State(state): State<AppState>) -> Response {
    let r = readiness(&state);
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(r)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let gauges = blocking(move || {
        let mut g = metrics::StoreGauges {
            outbox_depth: store.outbox_len() as u64,
            ..Default::default()
        };
        for rec in store.journeys::<JourneyRecord>() {
            let rec = rec?;
            let key = (
                rec.journey.stage.as_str().to_string(),
                rec.status().to_string(),
            );
            *g.journeys.entry(key).or_default() += 1;
        }
        Ok(g)
    })
    .await?;
    let ready = readiness(&state).ready;
    let text = metrics::render(&state.stats, &state.metrics, &gauges, ready);
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// One line of `GET /api/journeys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JourneySummary {
    pub client_id: String,
    pub stage: String,
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub stage_started_at: DateTime<Utc>,
    /// The unit of work in progress or last run: "stage" or "rollback".
    pub work_kind: Option<String>,
    pub tasks_done: usize,
    pub tasks_total: usize,
    /// The last gate evaluation of the current stage: passed or not.
    pub gate_passed: Option<bool>,
}

impl JourneySummary {
    pub fn of(rec: &JourneyRecord) -> Self {
        let work = rec.work.as_ref();
        Self {
            client_id: rec.journey.client_id.clone(),
            stage: rec.journey.stage.as_str().to_string(),
            status: rec.status().to_string(),
            started_at: rec.journey.started_at,
            stage_started_at: rec.journey.stage_started_at,
            work_kind: work.and_then(|w| {
                serde_json::to_value(w.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
            }),
            tasks_done: work.map_or(0, |w| {
                w.tasks
                    .iter()
                    .filter(|t| t.status == TaskStatus::Completed)
                    .count()
            }),
            tasks_total: work.map_or(0, |w| w.tasks.len()),
            gate_passed: rec.gate.as_ref().map(|g| g.passed),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub stage: Option<String>,
    pub status: Option<String>,
}

fn summaries(store: &Store, q: &ListQuery) -> Result<Vec<JourneySummary>, StoreError> {
    let mut out = Vec::new();
    for rec in store.journeys::<JourneyRecord>() {
        let s = JourneySummary::of(&rec?);
        let keep = q
            .stage
            .as_deref()
            .is_none_or(|v| v.is_empty() || v == s.stage)
            && q.status
                .as_deref()
                .is_none_or(|v| v.is_empty() || v == s.status);
        if keep {
            out.push(s);
        }
    }
    Ok(out)
}

async fn list_journeys(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<Vec<JourneySummary>>, ApiError> {
    let store = state.store.clone();
    Ok(axum::Json(blocking(move || summaries(&store, &q)).await?))
}

fn not_found(client: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no journey for client '{client}'"),
    )
}

async fn journey(
    State(state): State<AppState>,
    Path(client): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let store = state.store.clone();
    let c = client.clone();
    match blocking(move || store.journey::<JourneyRecord>(&c)).await? {
        Some(rec) => Ok(axum::Json(state_view(&rec))),
        None => Err(not_found(&client)),
    }
}

async fn history(
    State(state): State<AppState>,
    Path(client): Path<String>,
) -> Result<axum::Json<Vec<HistoryEntry>>, ApiError> {
    let store = state.store.clone();
    let c = client.clone();
    let (rec, h) = blocking(move || {
        Ok((
            store.journey::<JourneyRecord>(&c)?,
            store.history::<HistoryEntry>(&c)?,
        ))
    })
    .await?;
    match rec {
        Some(_) => Ok(axum::Json(h)),
        None => Err(not_found(&client)),
    }
}

/// Every journey with its history, for the report.
fn report_inputs(store: &Store) -> Result<Vec<JourneyInput>, StoreError> {
    let mut out = Vec::new();
    for rec in store.journeys::<JourneyRecord>() {
        let rec = rec?;
        let history = store.history(&rec.journey.client_id)?;
        out.push(JourneyInput {
            client_id: rec.journey.client_id.clone(),
            stage: rec.journey.stage.as_str().to_string(),
            history,
        });
    }
    Ok(out)
}

async fn report(State(state): State<AppState>) -> Result<axum::Json<Report>, ApiError> {
    let store = state.store.clone();
    let inputs = blocking(move || report_inputs(&store)).await?;
    Ok(axum::Json(report::compute(&inputs, Utc::now())))
}

/// The orchestrator's counters, for the dashboard and scripts.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub namespace: String,
    pub ready: bool,
    pub counters: BTreeMap<String, u64>,
    /// Dead letters by reason, as far as the core has counted them by reason (see
    /// [`Metrics::dead_letter`]); `counters.dead_letters` is the total.
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    /// Task round trips (dispatch to reply applied) over all intents: p50/p99/p99.9/max.
    #[serde(default)]
    pub round_trip: metrics::RoundTripSummary,
    /// Task outcomes and mean round trip per intent, for the dashboard's charts.
    #[serde(default)]
    pub by_intent: BTreeMap<String, IntentStats>,
}

/// One intent's tasks since the orchestrator started.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentStats {
    pub dispatched: u64,
    pub completed: u64,
    /// Attempts after the first.
    pub retried: u64,
    /// Tasks that failed for good (retries exhausted or not retryable): each pauses its
    /// journey and is dead-lettered with reason `task_failed`.
    pub failed: u64,
    pub round_trip_mean_ms: Option<f64>,
}

fn by_intent(m: &Metrics) -> BTreeMap<String, IntentStats> {
    let mut out: BTreeMap<String, IntentStats> = BTreeMap::new();
    for (labels, n) in m.tasks.snapshot() {
        let (Some(intent), Some(outcome)) = (labels.first(), labels.get(1)) else {
            continue;
        };
        let e = out.entry(intent.clone()).or_default();
        match outcome.as_str() {
            "dispatched" => e.dispatched = n,
            "completed" => e.completed = n,
            "retried" => e.retried = n,
            "failed" => e.failed = n,
            _ => {}
        }
    }
    let hs = m.round_trip.lock().unwrap_or_else(|e| e.into_inner());
    for (intent, h) in hs.iter() {
        if h.count > 0 {
            out.entry(intent.clone()).or_default().round_trip_mean_ms =
                Some(h.sum / h.count as f64 * 1000.0);
        }
    }
    out
}

fn stats_view(state: &AppState) -> StatsView {
    let s = &state.stats;
    let c = |a: &std::sync::atomic::AtomicU64| Stats::get(a);
    let counters = [
        ("journeys_started", c(&s.journeys_started)),
        ("tasks_dispatched", c(&s.tasks_dispatched)),
        ("tasks_completed", c(&s.tasks_completed)),
        ("retries", c(&s.retries)),
        ("promotions", c(&s.promotions)),
        ("gate_passed", c(&s.gate_passed)),
        ("gate_failed", c(&s.gate_failed)),
        ("rollbacks_started", c(&s.rollbacks_started)),
        ("rollbacks_automatic", c(&s.rollbacks_automatic)),
        ("rollbacks_completed", c(&s.rollbacks_completed)),
        ("rollbacks_failed", c(&s.rollbacks_failed)),
        ("pauses", c(&s.pauses)),
        ("dead_letters", c(&s.dead_letters)),
        ("duplicates", c(&s.duplicates)),
        ("stale_replies", c(&s.stale_replies)),
        ("refusals", c(&s.refusals)),
        ("conflicts", c(&s.conflicts)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    StatsView {
        namespace: state.names.namespace.clone(),
        ready: readiness(state).ready,
        counters,
        dead_letters_by_reason: state.metrics.dead_letters_by_reason(),
        round_trip: state.metrics.round_trip_summary(),
        by_intent: by_intent(&state.metrics),
    }
}

async fn stats(State(state): State<AppState>) -> axum::Json<StatsView> {
    axum::Json(stats_view(&state))
}

/// How long a read of the dead-letter queue may take before the API gives up.
const DLQ_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the dead-letter queue the way `journeyman dlq` does (without consuming or
/// reordering it), on a connection of its own that is closed afterwards.
async fn read_dead_letters(
    state: &AppState,
    filter: crate::ops::dlq::Filter,
) -> Result<Vec<crate::ops::dlq::DeadLetter>, ApiError> {
    let unavailable = |e: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, e);
    let Some(url) = &state.amqp_url else {
        return Err(unavailable(
            "this server does not read the dead-letter queue (no broker configured)".into(),
        ));
    };
    let read = async {
        let conn = crate::broker::connect(url, "journeyman-http-dlq")
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let r = crate::ops::dlq::Dlq::new(&conn, state.names.clone())
            .list(&filter)
            .await
            .map_err(|e| unavailable(e.to_string()));
        let _ = conn.close(200, "done".into()).await;
        r
    };
    tokio::time::timeout(DLQ_READ_TIMEOUT, read)
        .await
        .map_err(|_| unavailable("reading the dead-letter queue timed out".into()))?
}

#[derive(Debug, Default, Deserialize)]
pub struct DeadLetterQuery {
    pub reason: Option<String>,
    pub intent: Option<String>,
    pub client: Option<String>,
}

/// `GET /api/dead-letters?reason=&intent=&client=`: what `journeyman dlq list --json` shows.
async fn dead_letters(
    State(state): State<AppState>,
    Query(q): Query<DeadLetterQuery>,
) -> Result<axum::Json<Vec<serde_json::Value>>, ApiError> {
    let filter = crate::ops::dlq::Filter {
        reason: q.reason.filter(|s| !s.is_empty()),
        intent: q.intent.filter(|s| !s.is_empty()),
        client: q.client.filter(|s| !s.is_empty()),
    };
    // Redacted: a dead letter's headers and ids are whatever its sender put there.
    let all = read_dead_letters(&state, filter).await?;
    Ok(axum::Json(
        all.iter()
            .map(crate::ops::dlq::DeadLetter::to_summary_json)
            .collect(),
    ))
}

/// Counts of the dead-letter queue by reason and intent (`journeyman dlq stats`).
async fn dead_letter_counts(state: &AppState) -> Result<crate::ops::dlq::Stats, ApiError> {
    let all = read_dead_letters(state, crate::ops::dlq::Filter::default()).await?;
    let mut s = crate::ops::dlq::Stats {
        total: all.len(),
        ..Default::default()
    };
    for d in &all {
        *s.by_reason.entry(d.reason.clone()).or_default() += 1;
        *s.by_intent.entry(d.intent().to_string()).or_default() += 1;
    }
    Ok(s)
}

async fn dead_letter_stats(
    State(state): State<AppState>,
) -> Result<axum::Json<crate::ops::dlq::Stats>, ApiError> {
    Ok(axum::Json(dead_letter_counts(&state).await?))
}

/// What this replica's peers answered to one local endpoint.
struct PeerAnswers<T> {
    /// This replica's name in the fleet: as a peer entry that turned out to be itself
    /// names it, else the address it bound.
    pub self_name: String,
    /// (peer, its `--orchestrator-id`, its answer), in `--peers` order.
    pub answered: Vec<(fleet::Peer, Option<String>, T)>,
    pub unreachable: Vec<fleet::Unreachable>,
}

/// Asks every peer for `path` (a local endpoint: replicas never ask each other for the
/// fleet's view, so nothing recurses), skipping this server itself.
async fn ask_peers<T: serde::de::DeserializeOwned>(state: &AppState, path: &str) -> PeerAnswers<T> {
    let (mut peers, mut unreachable) = fleet::resolve(&state.fleet.peers).await;
    let known: Vec<fleet::Peer> = state
        .known_self
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    peers.retain(|p| !known.iter().any(|k| k.addr == p.addr));
    let mut self_name = known.first().map(|p| p.name.clone());
    let mut answered = Vec::new();
    // Two entries reaching the same server (a pod's name and its IP) count once.
    let mut instances = std::collections::HashSet::new();
    for f in fleet::fetch_all::<T>(&peers, path, state.fleet.timeout).await {
        if let (Ok(_), Some(i)) = (&f.result, &f.instance)
            && !instances.insert(i.clone())
        {
            continue;
        }
        if f.instance.as_deref() == Some(state.identity.instance.as_str()) {
            self_name.get_or_insert_with(|| f.peer.name.clone());
            state
                .known_self
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(f.peer);
            continue;
        }
        match f.result {
            Ok(v) => answered.push((f.peer, f.orchestrator_id, v)),
            Err(e) => {
                // Not a warning: the view shows it, and a dashboard asks on every refresh.
                tracing::debug!(peer = %f.peer.name, error = %e.detail(), "a peer did not answer");
                unreachable.push(fleet::Unreachable {
                    replica: f.peer.name,
                    error: format!(
                        "{}; check that this replica runs and that --peers (JOURNEYMAN_PEERS) names it",
                        e.detail()
                    ),
                });
            }
        }
    }
    let self_name = self_name.unwrap_or_else(|| match state.bound.get() {
        Some(a) => a.to_string(),
        None => state
            .identity
            .orchestrator_id
            .clone()
            .unwrap_or_else(|| "this replica".into()),
    });
    PeerAnswers {
        self_name,
        answered,
        unreachable,
    }
}

impl AppState {
    /// This replica, as the fleet view shows it.
    fn self_view(&self, name: &str, journeys: usize) -> fleet::ReplicaView {
        fleet::ReplicaView {
            name: name.to_string(),
            orchestrator_id: self.identity.orchestrator_id.clone(),
            this: true,
            answered: true,
            journeys: Some(journeys),
            error: None,
        }
    }

    fn has_peers(&self) -> bool {
        !self.fleet.peers.is_empty()
    }
}

/// Every replica's journeys: this one's from its store, its peers' over HTTP.
async fn fleet_list(state: &AppState, q: ListQuery) -> Result<fleet::FleetList, ApiError> {
    let mut query = Vec::new();
    for (k, v) in [("stage", &q.stage), ("status", &q.status)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            query.push(format!("{k}={}", client::encode(v)));
        }
    }
    let path = if query.is_empty() {
        "/api/journeys".to_string()
    } else {
        format!("/api/journeys?{}", query.join("&"))
    };
    let store = state.store.clone();
    let local = blocking(move || summaries(&store, &q)).await?;
    let peers = ask_peers::<Vec<JourneySummary>>(state, &path).await;
    let mut replicas = vec![state.self_view(&peers.self_name, local.len())];
    let mut journeys: Vec<fleet::FleetJourney> = local
        .into_iter()
        .map(|summary| fleet::FleetJourney {
            replica: peers.self_name.clone(),
            summary,
        })
        .collect();
    for (peer, orchestrator_id, list) in peers.answered {
        replicas.push(fleet::ReplicaView {
            name: peer.name.clone(),
            orchestrator_id,
            this: false,
            answered: true,
            journeys: Some(list.len()),
            error: None,
        });
        journeys.extend(list.into_iter().map(|summary| fleet::FleetJourney {
            replica: peer.name.clone(),
            summary,
        }));
    }
    for u in &peers.unreachable {
        replicas.push(fleet::ReplicaView {
            name: u.replica.clone(),
            orchestrator_id: None,
            this: false,
            answered: false,
            journeys: None,
            error: Some(u.error.clone()),
        });
    }
    Ok(fleet::FleetList {
        journeys: fleet::merge_lists(journeys),
        replicas,
        partial: !peers.unreachable.is_empty(),
        unreachable: peers.unreachable,
    })
}

/// `GET /api/fleet/journeys?stage=&status=`: every replica's journeys and where each lives.
async fn fleet_journeys(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<fleet::FleetList>, ApiError> {
    Ok(axum::Json(fleet_list(&state, q).await?))
}

/// `GET /api/fleet/report`: the report over every replica's journeys (see
/// [`report::merge`] for what cannot be summed).
async fn fleet_report(
    State(state): State<AppState>,
) -> Result<axum::Json<fleet::FleetReport>, ApiError> {
    let store = state.store.clone();
    let inputs = blocking(move || report_inputs(&store)).await?;
    let mut parts = vec![report::compute(&inputs, Utc::now())];
    let peers = ask_peers::<Report>(&state, "/api/report").await;
    let asked = 1 + peers.answered.len() + peers.unreachable.len();
    parts.extend(peers.answered.into_iter().map(|(_, _, r)| r));
    Ok(axum::Json(fleet::FleetReport {
        report: report::merge(&parts),
        replicas_answered: parts.len(),
        replicas_asked: asked,
        partial: !peers.unreachable.is_empty(),
        unreachable: peers.unreachable,
    }))
}

/// What the dashboard shows, read in one go.
async fn page_data(
    state: &AppState,
    client: Option<String>,
) -> Result<dashboard::PageData, ApiError> {
    let store = state.store.clone();
    let (cards, selected) = blocking(move || {
        let mut cards = Vec::new();
        for rec in store.journeys::<JourneyRecord>() {
            cards.push(dashboard::Card::of(&rec?));
        }
        let selected = match client {
            Some(c) => match store.journey::<JourneyRecord>(&c)? {
                Some(rec) => {
                    let history = store.history::<HistoryEntry>(&c)?;
                    // The pinned version, for what its gate's checks ask for.
                    let playbook = store
                        .playbook::<crate::domain::playbook::Playbook>(&rec.playbook)
                        .ok()
                        .flatten();
                    Some(dashboard::Selected {
                        rec,
                        history,
                        playbook,
                    })
                }
                None => None,
            },
            None => None,
        };
        Ok((cards, selected))
    })
    .await?;
    // The other replicas' journeys, when this one has peers: the board shows the fleet.
    let mut cards = cards;
    let fleet = if state.has_peers() {
        let peers = ask_peers::<Vec<JourneySummary>>(state, "/api/journeys").await;
        let mut replicas = vec![state.self_view(&peers.self_name, cards.len())];
        for c in &mut cards {
            c.replica = Some(peers.self_name.clone());
        }
        for (peer, orchestrator_id, list) in peers.answered {
            replicas.push(fleet::ReplicaView {
                name: peer.name.clone(),
                orchestrator_id,
                this: false,
                answered: true,
                journeys: Some(list.len()),
                error: None,
            });
            cards.extend(list.into_iter().map(|s| dashboard::Card::remote(s, &peer)));
        }
        replicas.extend(peers.unreachable.into_iter().map(|u| fleet::ReplicaView {
            name: u.replica,
            orchestrator_id: None,
            this: false,
            answered: false,
            journeys: None,
            error: Some(u.error),
        }));
        cards.sort_by(|a, b| a.summary.client_id.cmp(&b.summary.client_id));
        Some(replicas)
    } else {
        None
    };
    // The queue itself, when a broker is configured; the page says when it could not.
    let queue = match state.amqp_url {
        Some(_) => Some(dead_letter_counts(state).await.map_err(|e| e.1)),
        None => None,
    };
    Ok(dashboard::PageData {
        dead_letter_queue: queue,
        readiness: readiness(state),
        stats: stats_view(state),
        cards,
        selected,
        fleet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn readyz_follows_the_broker_session_and_unknown_journeys_are_404() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stats = Arc::new(Stats::default());
        let state = AppState::new(store, stats.clone(), Names::new("unit"));
        let bound = BoundAddr::default();
        let server = spawn(([127, 0, 0, 1], 0).into(), state, &bound)
            .await
            .unwrap();
        assert_eq!(bound.wait().await, server.addr);
        let c = crate::ops::client::Client::new(server.addr, Duration::from_secs(5));

        let (s, body) = c.raw("/healthz").await.unwrap();
        assert_eq!((s.as_u16(), &body[..]), (200, &b"ok\n"[..]));
        let (s, body) = c.raw("/readyz").await.unwrap();
        assert_eq!(s.as_u16(), 503, "not consuming yet");
        let r: Readiness = serde_json::from_slice(&body).unwrap();
        assert!(!r.broker && r.store && !r.ready);

        stats.ready.store(true, Ordering::Relaxed);
        let (s, _) = c.raw("/readyz").await.unwrap();
        assert_eq!(s.as_u16(), 200);
        let (_, m) = c.raw("/metrics").await.unwrap();
        assert!(String::from_utf8_lossy(&m).contains("\njourneyman_up{replica=\"0\"} 1\n"));

        let e = c.get::<Value>("/api/journeys/nobody").await.unwrap_err();
        assert!(
            e.to_string().contains("no journey for client 'nobody'"),
            "{e}"
        );
        let list: Vec<JourneySummary> = c.get("/api/journeys").await.unwrap();
        assert!(list.is_empty());
        let r: Report = c.get("/api/report").await.unwrap();
        assert_eq!(r.journeys, 0);
        let s: StatsView = c.get("/api/stats").await.unwrap();
        assert_eq!(s.round_trip.count, 0);

        // Dropping the handle frees the port.
        let addr = server.addr;
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = crate::ops::client::Client::new(addr, Duration::from_secs(2))
            .raw("/healthz")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Is it running?"), "{e}");
    }
}
