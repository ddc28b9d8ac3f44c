//! The command line: argument parsing and the commands that are not workers.
//!
//! The CLI is an upstream agent like any other: `journey start|status` publish protocol
//! messages and print the orchestrator's answer; they never open the orchestrator's
//! store. Errors say what went wrong and what to do next.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::broker::{self};
use crate::domain::journey::Stage;
use crate::domain::playbook::Playbook;
use crate::orchestrator::{self, Stats};
use crate::store::Store;
use crate::wire::auth::{Guard, Key, Policy, Signer};
use crate::wire::protocol::{
    AgentRef, CancelPayload, ClientPayload, Command, EvidenceEvent, EvidencePayload,
    RollbackPayload, StartPayload,
};

pub use super::request::{request, request_as};
pub use super::settings::{DEFAULT_AMQP_URL, Global, LogFormat};
use super::show::print_reply;

#[derive(Debug, Parser)]
#[command(
    name = "journeyman",
    version,
    about = "Client journeys (Sandbox → Pilot → Production) orchestrated over RabbitMQ"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

impl Cli {
    /// Parses the command line; each command's `--help` lists only the shared options it
    /// reads (see [`shared_options_used`]).
    pub fn parse_per_command() -> Self {
        let matches = Self::command_per_command().get_matches();
        <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// The clap command with the shared options hidden where they do nothing. They stay
    /// global (accepted before or after the command name, as scripts and deploy files pass
    /// them), so they are only hidden from the help, not refused.
    pub fn command_per_command() -> clap::Command {
        let mut cmd = <Self as clap::CommandFactory>::command();
        // Propagates the global options into every subcommand, where they can be hidden.
        cmd.build();
        for sc in cmd.get_subcommands_mut() {
            hide_unused(sc, sc.get_name().to_string());
        }
        cmd
    }
}

/// The shared (global) options, by their clap id.
const SHARED_OPTIONS: [&str; 6] = [
    "amqp_url",
    "namespace",
    "auth_keys_file",
    "auth_token",
    "http_addr",
    "queue_type",
];

/// Which shared options the command at `path` (e.g. `journey list`) reads; a command
/// with subcommands shows those its subcommands read. `--log-format` is used by all.
fn shared_options_used(path: &str) -> &'static [&'static str] {
    const BROKER: [&str; 2] = ["amqp_url", "namespace"];
    match path {
        "orchestrator" => &[
            "amqp_url",
            "namespace",
            "auth_keys_file",
            "http_addr",
            "queue_type",
        ],
        "agents" => &["amqp_url", "namespace", "auth_keys_file", "queue_type"],
        "demo" | "topology declare" => &["amqp_url", "namespace", "queue_type"],
        "bench" => &["amqp_url", "queue_type"],
        "chaos" => &["amqp_url"],
        "journey list" | "journey history" | "report" | "health" => &["http_addr"],
        "journey status" => &[
            "amqp_url",
            "namespace",
            "auth_keys_file",
            "auth_token",
            "http_addr",
        ],
        p if p.starts_with("journey ") => {
            &["amqp_url", "namespace", "auth_keys_file", "auth_token"]
        }
        p if p.starts_with("dlq ") => &BROKER,
        "token issue" => &["auth_keys_file"],
        _ => &[],
    }
}

/// Hides the shared options `cmd` (at `path`) does not read; returns those it reads.
fn hide_unused(cmd: &mut clap::Command, path: String) -> Vec<&'static str> {
    let mut used: Vec<&'static str> = shared_options_used(&path).to_vec();
    for sc in cmd.get_subcommands_mut() {
        if sc.get_name() != "help" {
            used.extend(hide_unused(sc, format!("{path} {}", sc.get_name())));
        }
    }
    // `mut_args` keeps the arguments in place: the command is built, and its index of
    // arguments by name must stay valid (`mut_arg` would move the argument to the end).
    let unused = |id: &str| SHARED_OPTIONS.contains(&id) && !used.contains(&id);
    *cmd = std::mem::take(cmd).mut_args(|a| {
        if unused(a.get_id().as_str()) {
            a.hide(true)
        } else {
            a
        }
    });
    used
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the orchestrator worker.
    Orchestrator(OrchestratorArgs),
    /// Run simulated agents for every intent of the playbook.
    Agents(AgentsArgs),
    /// Run orchestrator and simulated agents in-process, start N journeys and watch them.
    Demo(crate::ops::demo::DemoArgs),
    /// Measure the broker's request/reply limit and the orchestrator against it (tasks/s,
    /// round-trip p50/p99/p99.9, CPU per 1,000 tasks, peak RSS, store bytes per journey).
    Bench(crate::ops::bench::BenchArgs),
    /// Start or inspect a journey (publishes protocol messages to the orchestrator).
    Journey {
        #[command(subcommand)]
        command: JourneyCmd,
    },
    /// Dead letters: list, stats, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: crate::ops::dlq::DlqCmd,
    },
    /// Chaos run: journeys while the orchestrator is killed repeatedly, agents fail and
    /// duplicate replies, poison is mixed in; checks nothing is lost or applied twice.
    Chaos(ChaosArgs),
    /// DES-002 §7.1 metrics over every journey (reads the orchestrator's HTTP API).
    Report {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a playbook asks of agents and upstream, and whether it is valid.
    Playbook {
        #[command(subcommand)]
        command: crate::ops::playbook::PlaybookCmd,
    },
    /// Broker topology.
    Topology {
        #[command(subcommand)]
        command: TopologyCmd,
    },
    /// The orchestrator's data directory, offline (stop the orchestrator first).
    Store {
        #[command(subcommand)]
        command: StoreCmd,
    },
    /// Authentication tokens and keys.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Probe the orchestrator's HTTP server at --http-addr: exits 0 when /healthz (or
    /// /readyz with --ready) answers 200. For container health checks (the image has no
    /// curl); an unspecified address (0.0.0.0) is probed on loopback.
    Health {
        /// Probe readiness (/readyz: broker connected, consuming, store open) instead.
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a token with this sender's private key (--auth-private-key-file) and print it
    /// on stdout. The orchestrator grants the roles its registry gives the key, and
    /// refuses a token claiming more as `forbidden`.
    Issue {
        /// The agent id the token names (its messages must carry it as source_agent);
        /// default: the subject the key is bound to.
        #[arg(long)]
        agent: Option<String>,
        /// A role the token claims, e.g. operator (repeatable). Optional: the registry's
        /// roles for the key apply anyway.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "24h", value_parser = super::settings::duration)]
        ttl: Duration,
        /// Sign with this key id (default: the first private key).
        #[arg(long)]
        kid: Option<String>,
    },
    /// Generate an Ed25519 key pair for one sender: the private key goes to --out (mode
    /// 0600), its registry line (public) to --out.pub and to stdout.
    Keygen {
        /// Key id (default: <sub>-<today>).
        #[arg(long)]
        kid: Option<String>,
        /// The sender the key belongs to: its agent id (journey-orchestrator for the
        /// orchestrator).
        #[arg(long)]
        sub: String,
        /// A role the registry line grants, e.g. operator (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Where to write the private key; refused if the file exists.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct PlaybookArg {
    /// Playbook file (YAML); the built-in default when absent.
    #[arg(long, env = "JOURNEYMAN_PLAYBOOK")]
    pub playbook: Option<PathBuf>,
}

impl PlaybookArg {
    pub fn load(&self) -> Result<Playbook> {
        match &self.playbook {
            None => Ok(Playbook::default_playbook()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the playbook {}", p.display()))?;
                Playbook::from_yaml(&text)
                    .map_err(|e| anyhow!("the playbook {} is invalid: {e}", p.display()))
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct OrchestratorArgs {
    /// Directory of the orchestrator's store (sled); one orchestrator per directory.
    #[arg(long, env = "JOURNEYMAN_DATA_DIR", default_value = "./journeyman-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub playbook: PlaybookArg,
    /// Names this orchestrator in logs, metrics and connection names; default: its
    /// replica index.
    #[arg(long, env = "JOURNEYMAN_ORCHESTRATOR_ID")]
    pub orchestrator_id: Option<String>,
    /// This replica's index and the fleet's size, e.g. 2/3: it consumes the partitions
    /// p with p % 3 == 2 and keeps their journeys in its own data directory.
    #[arg(long, env = "JOURNEYMAN_REPLICA", conflicts_with = "replicas")]
    pub replica: Option<crate::domain::partition::Replica>,
    /// The fleet's size, the index coming from the pod name's ordinal
    /// (journeyman-orchestrator-2 is replica 2): what a StatefulSet sets.
    #[arg(long, env = "JOURNEYMAN_REPLICAS")]
    pub replicas: Option<u16>,
    /// Partitions of the namespace (fixed once its topology is declared). Default: the
    /// count its topology records; for a new namespace 16, or 1 when the broker has no
    /// consistent-hash exchange (rabbitmq_consistent_hash_exchange).
    #[arg(long, env = "JOURNEYMAN_PARTITIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: Option<u16>,
    /// The other replicas' HTTP addresses (host:port, comma-separated; a name with
    /// several addresses, such as a headless Service, means each; this replica's own
    /// address may be among them). The dashboard and /api/fleet/* then show every
    /// replica's journeys and mark those that do not answer.
    #[arg(long, env = "JOURNEYMAN_PEERS", value_delimiter = ',', value_parser = super::settings::peer_spec)]
    pub peers: Vec<String>,
    /// How long a peer may take to answer the fleet view before it is marked unreachable.
    #[arg(long, default_value = "2s", value_parser = super::settings::duration)]
    pub peer_timeout: Duration,
    /// Unacknowledged messages per queue (each journey command queue and the reply
    /// queue): how many inputs a group commit can gather.
    #[arg(long, env = "JOURNEYMAN_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Dashboard webhook: every status card is POSTed here (JSON), retried until accepted.
    #[arg(long, env = "JOURNEYMAN_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Bearer token for the webhook.
    #[arg(long, env = "JOURNEYMAN_WEBHOOK_TOKEN", hide_env_values = true)]
    pub webhook_token: Option<String>,
    /// Promote only on journey.promote, never automatically.
    #[arg(long)]
    pub no_auto_promote: bool,
    /// Allow-list file: which agents may send which journey commands (`intent = rule`
    /// lines, see docs/protocol.md §10). Default: anyone authenticated, cancel by operators.
    #[arg(long, env = "JOURNEYMAN_ALLOW_LIST")]
    pub allow_list: Option<PathBuf>,
    /// Accept unsigned messages when no key is configured (logs a warning). Without it,
    /// the orchestrator refuses to start without keys.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// How long message ids are remembered, so a redelivered duplicate is dropped.
    #[arg(long, default_value = "7d", value_parser = super::settings::duration)]
    pub dedup_retention: Duration,
    /// How long a finished journey keeps its last unit of work in full (task outputs,
    /// correlation ids). The journey and its history are kept for good.
    #[arg(long, default_value = "7d", value_parser = super::settings::duration)]
    pub finished_retention: Duration,
    /// How often expired records are pruned (also once at start-up).
    #[arg(long, default_value = "1h", value_parser = super::settings::duration)]
    pub housekeeping_every: Duration,
    /// sled's page cache in MiB: most of the orchestrator's memory. Hot journeys stay in
    /// it; finished ones are read from disk when asked for.
    #[arg(long, env = "JOURNEYMAN_STORE_CACHE_MB", default_value_t = 32)]
    pub store_cache_mb: u64,
    /// Pause between rounds of `dashboard.status_card` events: each changed journey
    /// publishes one card per round, however many times it changed.
    #[arg(long, default_value = "250ms", value_parser = super::settings::duration)]
    pub status_card_interval: Duration,
    /// Journeys with work running at once. Further `journey.start` commands wait in
    /// their durable queue until running journeys finish or pause, so a burst of starts
    /// cannot push task waits past their deadlines. 0: no limit.
    #[arg(long, env = "JOURNEYMAN_MAX_ACTIVE_JOURNEYS", default_value_t = orchestrator::DEFAULT_MAX_ACTIVE_JOURNEYS)]
    pub max_active_journeys: usize,
    /// Bound on a graceful stop (SIGTERM/SIGINT): cancel the consumers, store and ack what
    /// was delivered, wait for publisher confirms, flush. Keep it below the pod's grace
    /// period (Kubernetes' default is 30s).
    #[arg(long, env = "JOURNEYMAN_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = super::settings::duration)]
    pub shutdown_timeout: Duration,
}

impl OrchestratorArgs {
    /// The replica this process is: --replica, else --replicas with the pod name's
    /// ordinal ($HOSTNAME), else the only one.
    pub fn replica(&self) -> Result<crate::domain::partition::Replica> {
        use crate::domain::partition::Replica;
        if let Some(r) = self.replica {
            return Ok(r);
        }
        let Some(count) = self.replicas else {
            return Ok(Replica::default());
        };
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_default();
        Ok(Replica::from_pod_name(&host, count)?)
    }

    /// The orchestrator's authentication: a guard for its inputs and a signer for its task
    /// requests, or `None` when turned off explicitly with --insecure-no-auth.
    pub fn auth(&self, g: &Global) -> Result<Option<(Guard, Signer)>> {
        let Some(ring) = g.keyring()? else {
            if self.insecure_no_auth {
                tracing::warn!(
                    "authentication is OFF (--insecure-no-auth): any agent on the broker can send commands"
                );
                return Ok(None);
            }
            bail!(
                "{}; or pass --insecure-no-auth to run without authentication",
                crate::wire::auth::KeyError::NoKeys
            );
        };
        let policy = match &self.allow_list {
            Some(p) => Policy::from_file(p)?,
            None => Policy::default(),
        };
        let me = AgentRef::orchestrator().agent_id;
        let key = ring.require_signing_key()?.clone();
        if let Some(sub) = key.subject()
            && sub != me
        {
            bail!(
                "the signing key '{}' belongs to '{sub}', not to the orchestrator ('{me}'): give the orchestrator its own key pair (`journeyman token keygen --sub {me} --role orchestrator`) with --auth-private-key-file",
                key.kid()
            );
        }
        let signer = Signer::new(key, me)?;
        Ok(Some((Guard::new(Arc::new(ring), policy), signer)))
    }
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub playbook: PlaybookArg,
    /// Serve only these intents (comma-separated); default: every intent of the playbook.
    #[arg(long, value_delimiter = ',')]
    pub intents: Vec<String>,
    /// Shortest simulated task latency, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub min_latency_ms: u64,
    /// Longest simulated task latency, in milliseconds.
    #[arg(long, default_value_t = 40)]
    pub max_latency_ms: u64,
    /// Fraction of attempts that fail with a retryable error (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Requests in flight per intent.
    #[arg(long, default_value_t = 32)]
    pub prefetch: u16,
    /// Agent id reported on replies and in the broker's connection names (e.g. the pod
    /// name, to tell replicas apart).
    #[arg(long, env = "JOURNEYMAN_AGENT_ID", default_value = "sim-agent")]
    pub agent_id: String,
    /// Bound on a graceful stop (SIGTERM/SIGINT): cancel the consumers, finish and ack the
    /// requests in flight. Past it the connection closes and the broker requeues the rest.
    #[arg(long, env = "JOURNEYMAN_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = super::settings::duration)]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[arg(long, default_value_t = 500)]
    pub journeys: usize,
    /// Times the orchestrator is SIGKILLed (and restarted on the same directory).
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// Share of task attempts the agents fail.
    #[arg(long, default_value_t = 0.1)]
    pub failure_rate: f64,
    /// Share of replies the agents publish twice.
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Poison messages (malformed, schema-invalid) mixed among the commands.
    #[arg(long, default_value_t = 10)]
    pub poison: usize,
    /// A shell command that restarts the broker, run once mid-run. Point it at a broker
    /// of your own (e.g. `rabbitmqctl -n jm-chaos@localhost stop_app && rabbitmqctl -n
    /// jm-chaos@localhost start_app`), never a shared one.
    #[arg(long)]
    pub broker_restart_cmd: Option<String>,
    #[arg(long, default_value = "10m", value_parser = super::settings::duration)]
    pub timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JourneyCmd {
    /// Start a client's journey.
    Start {
        client_id: String,
        /// Journey context as a JSON object (data sources, connectors, ...).
        #[arg(long)]
        context: Option<String>,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// List journeys (reads the orchestrator's HTTP API).
    List {
        #[arg(long)]
        stage: Option<Stage>,
        #[arg(long, value_parser = ["running", "awaiting_gate", "paused", "live", "rolling_back", "rollback_failed", "completed", "cancelled"])]
        status: Option<String>,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every transition, gate evaluation, rollback, task outcome and refusal of a journey,
    /// with time and cause (reads the orchestrator's HTTP API).
    History {
        client_id: String,
        /// Print the history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a client's journey.
    Status {
        client_id: String,
        /// Read it from the orchestrator's HTTP API instead of asking over the broker.
        #[arg(long)]
        via_http: bool,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// Promote through the current stage's exit gate (refused with the failing checks).
    Promote {
        client_id: String,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// Roll back to the stage before, or to --to; on a failed rollback, retry it.
    Rollback {
        client_id: String,
        /// Why: recorded in the journey's history and the notification event.
        #[arg(long)]
        reason: String,
        /// An earlier stage to land on (default: the stage before; sandbox restarts sandbox).
        #[arg(long)]
        to: Option<Stage>,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// Retry a paused journey from its failed task, keeping completed tasks.
    Resume {
        client_id: String,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// End a journey (from any non-terminal stage).
    Cancel {
        client_id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// Mark a production journey complete (gated by production's success metrics).
    Complete {
        client_id: String,
        #[command(flatten)]
        out: ReplyArgs,
    },
    /// Report evidence: --metric name=value, --flag name=true|false, --event name[:severity].
    Evidence {
        client_id: String,
        #[arg(long = "metric", value_parser = parse_metric)]
        metrics: Vec<(String, f64)>,
        #[arg(long = "flag", value_parser = parse_flag)]
        flags: Vec<(String, bool)>,
        #[arg(long = "event")]
        events: Vec<String>,
        #[command(flatten)]
        out: ReplyArgs,
    },
}

fn parse_metric(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=value, e.g. search.precision=0.87, got '{s}'"))?;
    let v: f64 = v
        .parse()
        .map_err(|_| format!("'{v}' is not a number (in '{s}')"))?;
    Ok((k.to_string(), v))
}

fn parse_flag(s: &str) -> Result<(String, bool), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=true|false, e.g. demo.approved=true, got '{s}'"))?;
    let v: bool = v
        .parse()
        .map_err(|_| format!("'{v}' is not true or false (in '{s}')"))?;
    Ok((k.to_string(), v))
}

#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the orchestrator's answer.
    #[arg(long, default_value = "10s", value_parser = super::settings::duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Records per kind and their bytes, against the directory's size on disk.
    Stats {
        #[arg(long, env = "JOURNEYMAN_DATA_DIR", default_value = "./journeyman-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the store with only its live records, returning the space sled's log holds
    /// in superseded versions. The old directory is kept as <dir>.before-compact-<time>
    /// unless --remove-old. Needs the orchestrator stopped and the directory's parent
    /// writable (not a volume's mount point itself).
    Compact {
        #[arg(long, env = "JOURNEYMAN_DATA_DIR", default_value = "./journeyman-data")]
        data_dir: PathBuf,
        /// Delete the old directory once the compacted one is in place.
        #[arg(long)]
        remove_old: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move journeys between replicas' data directories after the replica count changes
    /// (N -> M), with every orchestrator stopped: each journey goes to the directory of the
    /// replica owning its partition under M (partition p: replica p % M). Give every
    /// directory, replica 0's first, max(N, M) of them; missing ones are created. An
    /// interrupted run is finished by running it again; until then orchestrators refuse
    /// the directories.
    Repartition {
        /// The namespace's partition count (`journeyman topology declare` prints it).
        #[arg(long, env = "JOURNEYMAN_PARTITIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        partitions: u16,
        /// The new number of orchestrator replicas, M.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        replicas: u16,
        /// The data directories, replica 0's first.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// Declare exchanges and queues (idempotent; every worker also does it at start).
    /// Declare before traffic starts: the partition count is fixed from then on.
    Declare {
        #[command(flatten)]
        playbook: PlaybookArg,
        /// Partitions of journey commands (fixed once declared). Default: the recorded
        /// count, else 16, or 1 when the broker has no consistent-hash exchange.
        #[arg(long, env = "JOURNEYMAN_PARTITIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        partitions: Option<u16>,
    },
    /// Delete a namespace: its exchanges, the playbook's intent queues, the dead-letter
    /// queue and the orchestrator's reply queue, with the messages in them. Asks first.
    Delete {
        #[command(flatten)]
        playbook: PlaybookArg,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// A data directory that is a file: said as such, before sled reports it as an unreadable
/// (corrupt-looking) store.
fn ensure_not_a_file(dir: &std::path::Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "the data directory {} is not a directory (it is a file); pass a directory with --data-dir or JOURNEYMAN_DATA_DIR",
            dir.display()
        );
    }
    Ok(())
}

/// A store command on a directory that holds no store would create an empty one.
fn ensure_store_dir(dir: &std::path::Path) -> Result<()> {
    ensure_not_a_file(dir)?;
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        bail!(
            "{} holds no journeyman store; pass the orchestrator's --data-dir (or JOURNEYMAN_DATA_DIR)",
            dir.display()
        );
    }
    Ok(())
}

/// Logs to stderr; `RUST_LOG` overrides `default` (e.g. `info`, `journeyman=debug`).
///
/// lapin's own log lines are off: it logs a refused login three times at ERROR, and
/// routine connection closes too, while our errors already say what went wrong (once, and
/// with the setting to change). `RUST_LOG=lapin=debug` brings them back when needed.
/// Colours only on a terminal: in a file or a CI log the escape codes are noise.
///
/// Spans are also exported over OTLP when the `OTEL_*` environment asks for it (see
/// [`crate::telemetry`]); the same filter decides which. The returned pipeline must be
/// shut down before the process exits, or the last spans are lost. A malformed OTLP
/// setting is logged and the process runs without export: traces are not worth an outage.
pub fn init_tracing(format: LogFormat, default: &str) -> Option<crate::telemetry::Pipeline> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},lapin=off")));
    let (pipeline, failed) = match crate::telemetry::Pipeline::from_env() {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    let ansi = std::io::stderr().is_terminal();
    let json = matches!(format, LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let text = matches!(format, LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(pipeline.as_ref().map(|p| p.layer()))
        .with(json)
        .with(text)
        .init();
    if let Some(e) = failed {
        tracing::warn!("{e}; traces are not exported");
    }
    pipeline
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a SIGTERM that arrives while the worker is still
/// connecting must start a graceful stop, not kill the process (the default action).
#[cfg(unix)]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Cmd::Orchestrator(a) => {
            ensure_not_a_file(&a.data_dir)?;
            let auth = a.auth(g)?;
            let replica = a.replica()?;
            let mut config =
                orchestrator::Config::new(&g.amqp_url, &g.names().namespace, a.data_dir.clone());
            config.names = g.names();
            config.playbook = a.playbook.load()?;
            config.replica = replica;
            config.orchestrator_id = a
                .orchestrator_id
                .clone()
                .unwrap_or_else(|| config.replica.index.to_string());
            config.partitions = a.partitions;
            config.prefetch = a.prefetch;
            config.policy.auto_promote = !a.no_auto_promote;
            config.policy.dedup_retention = chrono::Duration::from_std(a.dedup_retention)
                .context("--dedup-retention is too long")?;
            config.policy.finished_retention = chrono::Duration::from_std(a.finished_retention)
                .context("--finished-retention is too long")?;
            config.housekeeping_every = a.housekeeping_every;
            config.store_cache_bytes = a.store_cache_mb.saturating_mul(1 << 20);
            config.card_interval = a.status_card_interval;
            config.max_active_journeys = a.max_active_journeys;
            config.webhook = a
                .webhook_url
                .map(|url| crate::orchestrator::webhook::WebhookConfig {
                    url,
                    token: a
                        .webhook_token
                        .map(crate::orchestrator::webhook::Secret::new),
                    timeout: Duration::from_secs(10),
                });
            config.auth = auth;
            config.shutdown_timeout = a.shutdown_timeout;
            let fleet = crate::http::FleetConfig {
                peers: a.peers.into_iter().filter(|p| !p.is_empty()).collect(),
                timeout: a.peer_timeout,
            };
            crate::http::serve_orchestrator_with(
                config,
                Arc::new(Stats::default()),
                g.http_addr.one("orchestrator")?,
                fleet,
                &Default::default(),
                shutdown_signal(),
            )
            .await
            .context("the orchestrator stopped")?;
            Ok(())
        }
        Cmd::Agents(a) => {
            let playbook = a.playbook.load()?;
            let intents = if a.intents.is_empty() {
                playbook.intents().into_iter().collect()
            } else {
                a.intents
            };
            let keyring = g.keyring()?;
            let signing_key = match &keyring {
                None => {
                    tracing::warn!(
                        "authentication is off: no keys configured, task requests are not verified"
                    );
                    None
                }
                Some(ring) => {
                    let key = ring.require_signing_key()?.clone();
                    if let Some(sub) = key.subject()
                        && !key.may_sign_as(&a.agent_id)
                    {
                        bail!(
                            "the signing key '{}' belongs to '{sub}', but --agent-id is '{}': run the agents with --agent-id {sub}, or give them their own key pair",
                            key.kid(),
                            a.agent_id
                        );
                    }
                    Some(key)
                }
            };
            let sim = crate::agent::sim::SimAgent {
                min_latency: Duration::from_millis(a.min_latency_ms),
                max_latency: Duration::from_millis(a.max_latency_ms.max(a.min_latency_ms)),
                failure_rate: a.failure_rate.clamp(0.0, 1.0),
                duplicate_rate: 0.0,
            };
            let config = crate::agent::AgentConfig {
                amqp_url: g.amqp_url.clone(),
                names: g.names(),
                agent_id: a.agent_id,
                intents,
                prefetch: a.prefetch,
                max_message_bytes: crate::wire::protocol::DEFAULT_MAX_MESSAGE_BYTES,
                keyring: keyring.map(Arc::new),
                signing_key,
                shutdown_timeout: a.shutdown_timeout,
            };
            crate::agent::run(config, Arc::new(sim), Default::default(), shutdown_signal())
                .await
                .context("the agents stopped")?;
            Ok(())
        }
        Cmd::Demo(a) => crate::ops::demo::run(g, a).await,
        Cmd::Bench(a) => {
            let binary = std::env::current_exe().context("cannot find the journeyman binary")?;
            let mut cfg =
                crate::ops::bench::BenchConfig::from_args(&g.amqp_url, binary, g.queue_type, &a);
            // Ctrl-C or a SIGTERM stops the part in progress, which deletes its namespace
            // and stops its orchestrator, instead of leaving them on the user's broker.
            let (interrupt, interrupted) = tokio::sync::watch::channel(false);
            let signal = shutdown_signal();
            tokio::spawn(async move {
                signal.await;
                let _ = interrupt.send(true);
            });
            cfg.interrupt = interrupted;
            // Several orchestrators need the consistent-hash exchange; the whole bench
            // runs where it is.
            let mut _private = None;
            if cfg.orchestrators.iter().any(|n| *n > 1) {
                let (url, node) =
                    crate::ops::node::with_consistent_hash(&cfg.amqp_url, "bench").await?;
                cfg.amqp_url = url;
                _private = node;
            }
            let report = crate::ops::bench::run(&cfg)
                .await
                .context("the bench failed")?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::ops::bench::render_text(&report));
            }
            Ok(())
        }
        Cmd::Token { command } => token(g, command),
        Cmd::Health { ready } => {
            let mut addr = g.http_addr.one("health")?;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let path = if ready { "/readyz" } else { "/healthz" };
            let client = crate::ops::client::Client::new(addr, Duration::from_secs(3));
            let (status, _) = client.raw(path).await?;
            if !status.is_success() {
                bail!("http://{addr}{path} answered {status}");
            }
            println!("ok: http://{addr}{path} answered {status}");
            Ok(())
        }
        Cmd::Chaos(a) => {
            let restart: Option<crate::ops::chaos::BrokerRestart> =
                a.broker_restart_cmd.map(|cmd| {
                    let f: crate::ops::chaos::BrokerRestart = Box::new(move || {
                        let cmd = cmd.clone();
                        Box::pin(async move {
                            eprintln!("chaos: restarting the broker: {cmd}");
                            let status = tokio::process::Command::new("sh")
                                .arg("-c")
                                .arg(&cmd)
                                .status()
                                .await;
                            if !matches!(status, Ok(s) if s.success()) {
                                eprintln!("chaos: the broker restart command failed: {status:?}");
                            }
                        })
                    });
                    f
                });
            let report = crate::ops::chaos::run(crate::ops::chaos::ChaosConfig {
                amqp_url: g.amqp_url.clone(),
                binary: std::env::current_exe().context("cannot find the journeyman binary")?,
                journeys: a.journeys,
                kills: a.kills,
                failure_rate: a.failure_rate.clamp(0.0, 1.0),
                duplicate_rate: a.duplicate_rate.clamp(0.0, 1.0),
                poison: a.poison,
                timeout: a.timeout,
                broker_restart: restart,
            })
            .await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.line());
            }
            if !report.ok() {
                bail!("the chaos run found lost, duplicated or unexpected messages; see above");
            }
            Ok(())
        }
        Cmd::Dlq { command } => Ok(crate::ops::dlq::run(&g.amqp_url, g.names(), command).await?),
        Cmd::Report { json } => crate::ops::client::report(&g.http_addr, json).await,
        Cmd::Store {
            command: StoreCmd::Stats { data_dir, json },
        } => {
            ensure_store_dir(&data_dir)?;
            let census = Store::open(&data_dir)
                .and_then(|s| s.census())
                .with_context(|| format!("cannot read the store in {}", data_dir.display()))?;
            let on_disk = crate::ops::bench::dir_size(&data_dir)
                .with_context(|| format!("cannot measure {}", data_dir.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"records": census, "live_bytes": census.total_bytes(), "bytes_on_disk": on_disk})
                    )?
                );
            } else {
                let c = &census;
                for (what, (n, b)) in [
                    ("journeys", c.journeys),
                    ("history lines", c.history),
                    ("dedup marks", c.dedup_marks),
                    ("outbox (unpublished)", c.outbox),
                    ("rollback snapshots", c.snapshots),
                    ("webhook cards", c.cards),
                    ("status cards due", c.cards_due),
                    ("correlation entries", c.correlations),
                    ("other", c.other),
                ] {
                    println!("{what:<22} {n:>10} records {:>12} bytes", b);
                }
                println!(
                    "live: {} bytes; on disk: {} bytes ({}x); `journeyman store compact` returns the difference",
                    census.total_bytes(),
                    on_disk,
                    on_disk / census.total_bytes().max(1)
                );
            }
            Ok(())
        }
        Cmd::Store {
            command:
                StoreCmd::Compact {
                    data_dir,
                    remove_old,
                    json,
                },
        } => {
            ensure_store_dir(&data_dir)?;
            eprintln!("compacting {} ...", data_dir.display());
            let done = Store::compact(&data_dir).with_context(|| {
                format!(
                    "cannot compact {} (is the orchestrator stopped?)",
                    data_dir.display()
                )
            })?;
            if remove_old {
                std::fs::remove_dir_all(&done.old_dir).with_context(|| {
                    format!("compacted, but cannot remove {}", done.old_dir.display())
                })?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "compacted {}: {} records, {} -> {} bytes{}",
                    data_dir.display(),
                    done.records,
                    done.bytes_before,
                    done.bytes_after,
                    if remove_old {
                        String::new()
                    } else {
                        format!(
                            "; the old directory is kept at {} (remove it once the orchestrator runs)",
                            done.old_dir.display()
                        )
                    }
                );
            }
            Ok(())
        }
        Cmd::Store {
            command:
                StoreCmd::Repartition {
                    partitions,
                    replicas,
                    dirs,
                    json,
                },
        } => {
            if dirs.len() < usize::from(replicas) {
                bail!(
                    "{} directories for {replicas} replicas: give one per replica (replica 0's first), and also those of replicas being removed",
                    dirs.len()
                );
            }
            if replicas > partitions {
                bail!(
                    "{replicas} replicas but {partitions} partitions: some replicas would own nothing; use at most {partitions}"
                );
            }
            for d in &dirs {
                ensure_not_a_file(d)?;
            }
            eprintln!(
                "repartitioning {} directories for {replicas} replicas of {partitions} partitions ...",
                dirs.len()
            );
            let started = std::time::Instant::now();
            let mut n = 0u64;
            let done = crate::store::repartition::repartition(&dirs, partitions, replicas, |_, _, _| {
                n += 1;
                if n.is_multiple_of(1000) {
                    eprintln!("  {n} journeys moved ({:.0?})", started.elapsed());
                }
            })
            .context("the repartition stopped; run the same command again to finish it (are the orchestrators stopped?)")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                for (from, to, k) in &done.moves {
                    println!(
                        "moved {k} journeys: {} -> {}",
                        dirs[*from].display(),
                        dirs[*to].display()
                    );
                }
                if done.moves.is_empty() {
                    println!("nothing to move: every journey is with its owner");
                }
                for (i, k) in done.journeys.iter().enumerate() {
                    let role = if i < usize::from(replicas) {
                        format!("replica {i}/{replicas}")
                    } else {
                        "no longer a replica: delete it".to_string()
                    };
                    println!("{}: {k} journeys ({role})", dirs[i].display());
                }
                if done.untagged > 0 {
                    println!(
                        "{} journeys predate partitions (no partition recorded) and stayed where they were",
                        done.untagged
                    );
                }
            }
            Ok(())
        }
        Cmd::Playbook { command } => {
            use crate::ops::playbook::{PlaybookCmd, describe, print};
            match command {
                PlaybookCmd::Show { playbook, json } => {
                    let d = describe(&playbook.load()?);
                    if json {
                        println!("{}", serde_json::to_string_pretty(&d)?);
                    } else {
                        print(&d);
                    }
                }
                PlaybookCmd::Validate { playbook } => {
                    let p = playbook.load()?;
                    println!("valid: playbook {} ({})", p.name, p.content_hash());
                }
            }
            Ok(())
        }
        Cmd::Topology {
            command: TopologyCmd::Delete { playbook, yes },
        } => {
            let playbook = playbook.load()?;
            let names = g.names();
            let mut queues: Vec<String> = playbook
                .namespace_intents()
                .iter()
                .map(|i| names.intent_queue(i))
                .collect();
            queues.push(names.dead_letter());
            queues.push(names.replies("0"));
            if !yes {
                use std::io::{BufRead, Write};
                eprintln!(
                    "this deletes namespace '{}': exchanges {}, {}, {} and {} queues, with every message in them (dead letters included).",
                    names.namespace,
                    names.intents(),
                    names.events(),
                    names.dlx(),
                    queues.len()
                );
                eprint!("type the namespace to confirm: ");
                std::io::stderr().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != names.namespace {
                    bail!("not confirmed; nothing deleted");
                }
            }
            let conn = broker::connect(&g.amqp_url, "journeyman-cli").await?;
            broker::delete_namespace(&conn, &names, &queues).await;
            println!("deleted namespace '{}'", names.namespace);
            Ok(())
        }
        Cmd::Topology {
            command:
                TopologyCmd::Declare {
                    playbook,
                    partitions,
                },
        } => {
            let playbook = playbook.load()?;
            let names = g.names();
            let conn = broker::connect(&g.amqp_url, "journeyman-cli").await?;
            let ch = conn.create_channel().await?;
            let intents = playbook.namespace_intents();
            let partitions =
                broker::resolve_partitions(&conn, &g.amqp_url, &names, partitions, 1).await?;
            let queues = broker::declare_topology(&ch, &names, intents, partitions).await?;
            println!(
                "declared in namespace '{}' ({partitions} partitions):",
                names.namespace
            );
            println!(
                "  exchanges: {}, {}, {}, {}, {}",
                names.intents(),
                names.events(),
                names.dlx(),
                names.journey_starts(),
                names.journey_commands()
            );
            for q in queues {
                println!("  queue: {q}");
            }
            Ok(())
        }
        Cmd::Journey { command } => {
            let names = g.names();
            let (cmd, out) = match command {
                JourneyCmd::List {
                    stage,
                    status,
                    json,
                } => {
                    let stage = stage.map(|s| s.as_str());
                    return crate::ops::client::journey_list(
                        &g.http_addr,
                        stage,
                        status.as_deref(),
                        json,
                    )
                    .await;
                }
                JourneyCmd::History { client_id, json } => {
                    return crate::ops::client::journey_history(&g.http_addr, &client_id, json)
                        .await;
                }
                JourneyCmd::Start {
                    client_id,
                    context,
                    out,
                } => {
                    let context = match context {
                        None => None,
                        Some(text) => match serde_json::from_str::<Value>(&text) {
                            Ok(Value::Object(m)) => Some(m),
                            Ok(_) => bail!(
                                "--context must be a JSON object, e.g. '{{\"data_sources\": [\"drive\"]}}'"
                            ),
                            Err(e) => bail!("--context is not valid JSON: {e}"),
                        },
                    };
                    (Command::Start(StartPayload { client_id, context }), out)
                }
                JourneyCmd::Status {
                    client_id,
                    via_http: true,
                    out,
                } => {
                    return crate::ops::client::journey_status(&g.http_addr, &client_id, out.json)
                        .await;
                }
                JourneyCmd::Status { client_id, out, .. } => {
                    (Command::Status(ClientPayload { client_id }), out)
                }
                JourneyCmd::Promote { client_id, out } => {
                    (Command::Promote(ClientPayload { client_id }), out)
                }
                JourneyCmd::Resume { client_id, out } => {
                    (Command::Resume(ClientPayload { client_id }), out)
                }
                JourneyCmd::Complete { client_id, out } => {
                    (Command::Complete(ClientPayload { client_id }), out)
                }
                JourneyCmd::Cancel {
                    client_id,
                    reason,
                    out,
                } => (Command::Cancel(CancelPayload { client_id, reason }), out),
                JourneyCmd::Rollback {
                    client_id,
                    reason,
                    to,
                    out,
                } => (
                    Command::Rollback(RollbackPayload {
                        client_id,
                        reason,
                        rollback_to: to,
                    }),
                    out,
                ),
                JourneyCmd::Evidence {
                    client_id,
                    metrics,
                    flags,
                    events,
                    out,
                } => {
                    if metrics.is_empty() && flags.is_empty() && events.is_empty() {
                        bail!("nothing to report: give at least one --metric, --flag or --event");
                    }
                    let events = events
                        .into_iter()
                        .map(|e| {
                            let (name, severity) = match e.split_once(':') {
                                Some((n, s)) => (n.to_string(), Some(s.to_string())),
                                None => (e, None),
                            };
                            EvidenceEvent {
                                name,
                                at: Some(Utc::now()),
                                severity,
                                detail: None,
                            }
                        })
                        .collect();
                    (
                        Command::Evidence(EvidencePayload {
                            client_id,
                            metrics: metrics.into_iter().collect(),
                            flags: flags.into_iter().collect(),
                            events,
                        }),
                        out,
                    )
                }
            };
            let (me, token) = g.command_identity()?;
            let conn = broker::connect(&g.amqp_url, "journeyman-cli").await?;
            let reply = request_as(&conn, &names, &cmd, out.timeout, me, token).await?;
            print_reply(&reply, out.json)
        }
    }
}

fn token(g: &Global, command: TokenCmd) -> Result<()> {
    match command {
        TokenCmd::Keygen {
            kid,
            sub,
            roles,
            out,
        } => {
            let kid = kid.unwrap_or_else(|| format!("{sub}-{}", Utc::now().format("%Y%m%d")));
            let key = Key::generate(kid, sub)?.with_roles(roles);
            write_private(&out, &format!("{}\n", key.expose_line()))?;
            let public = key
                .public_line()
                .context("an Ed25519 key always has a public half")?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&pub_path, format!("{public}\n"))
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
            eprintln!(
                "private key written to {} (mode 0600); add this line to every registry (--auth-keys-file), also in {}:",
                out.display(),
                pub_path.display()
            );
            println!("{public}");
        }
        TokenCmd::Issue {
            agent,
            roles,
            ttl,
            kid,
        } => {
            let ring = g.keyring()?.ok_or(crate::wire::auth::KeyError::NoKeys)?;
            let key = match &kid {
                None => ring.require_signing_key()?,
                Some(kid) => ring.get(kid).ok_or_else(|| {
                    anyhow!(
                        "no key '{kid}' among the configured keys ({})",
                        ring.kids().join(", ")
                    )
                })?,
            };
            let bound = key.subject().filter(|s| !s.ends_with('*'));
            let agent = match agent.or_else(|| bound.map(str::to_string)) {
                Some(a) => a,
                None => bail!("key '{}' is bound to no agent: give --agent", key.kid()),
            };
            println!(
                "{}",
                crate::wire::auth::mint(key, &agent, &roles, Utc::now(), ttl)?
            );
        }
    }
    Ok(())
}

/// Writes a private key readable by its owner only, never over an existing file (a
/// second keygen must not silently replace a deployed key).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        format!(
            "cannot create the private key file {} (it must not exist yet: choose another --out)",
            path.display()
        )
    })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
