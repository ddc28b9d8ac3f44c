//! The settings every command shares: where the broker is, which namespace, how to log,
//! which keys, and who the CLI speaks as.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use chrono::Utc;
use clap::{Args, ValueEnum};

use crate::broker::{self, Names};
use crate::wire::auth::{Keyring, Signer};
use crate::wire::protocol::AgentRef;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
#[derive(Debug, Args)]
pub struct Global {
    /// AMQP URL of the broker (amqps:// for TLS); the user and password go in it
    /// [default: amqp://guest:***@127.0.0.1:5672/%2f, RabbitMQ's own guest login].
    // The default is written out above with its password hidden, as every URL is shown.
    #[arg(long, env = "JOURNEYMAN_AMQP_URL", global = true, default_value = DEFAULT_AMQP_URL, hide_env_values = true, hide_default_value = true)]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name, so tenants and tests never collide
    /// [default: a2a; the demo uses a fresh one].
    #[arg(long, env = "JOURNEYMAN_NAMESPACE", global = true)]
    pub namespace: Option<String>,
    /// Log format: readable text, or one JSON object per line for machines.
    #[arg(long, value_enum, global = true, default_value = "text")]
    pub log_format: LogFormat,
    /// The key registry: one `kid=ed25519:PUBLIC sub=AGENT [roles=a,b]` line per sender's
    /// public key (docs/protocol.md §10). Without it, the registry comes from
    /// JOURNEYMAN_AUTH_KEYS (same lines, `;`-separated).
    #[arg(long, env = crate::wire::auth::KEYS_FILE_ENV, global = true)]
    pub auth_keys_file: Option<PathBuf>,
    /// This process's own private key (from `journeyman token keygen --out`): it signs
    /// what this process sends. Several lines: the first signs (key rotation).
    #[arg(long, env = crate::wire::auth::PRIVATE_KEY_FILE_ENV, global = true)]
    pub auth_private_key_file: Option<PathBuf>,
    /// The same private key inline, when there is no file (what a Kubernetes secret
    /// gives as an environment variable). Prefer the variable to the flag: a flag shows
    /// in the process list.
    #[arg(
        long,
        env = crate::wire::auth::PRIVATE_KEY_ENV,
        global = true,
        hide_env_values = true
    )]
    pub auth_private_key: Option<String>,
    /// Accept shared HS256 secrets among the keys (the legacy scheme, for a single-tenant
    /// laptop): whoever can verify such a key can also sign with it.
    #[arg(long, env = crate::wire::auth::ALLOW_HS256_ENV, global = true)]
    pub allow_hs256: bool,
    /// Token put on journey commands (from `journeyman token issue`); without it, a
    /// token is minted with the configured key.
    #[arg(
        long,
        env = "JOURNEYMAN_AUTH_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
    /// The orchestrator's HTTP address: where `orchestrator` serves health, metrics, the
    /// JSON API and the dashboard, and where `journey list|history` and `report` read it.
    /// A host name is resolved (localhost:8080 is 127.0.0.1:8080). The reading commands
    /// take a fleet of replicas too: several host:port, comma-separated, or a name with
    /// several addresses (a headless Service), meaning every one.
    #[arg(long, env = "JOURNEYMAN_HTTP_ADDR", global = true, default_value = crate::http::DEFAULT_ADDR, value_parser = http_addrs)]
    pub http_addr: HttpAddrs,
    /// Queue type every worker declares: quorum (replicated, delivery limit, at-least-once
    /// dead-lettering) or classic. The orchestrator and its agents must agree.
    #[arg(
        long,
        env = "JOURNEYMAN_QUEUE_TYPE",
        global = true,
        default_value = "quorum"
    )]
    pub queue_type: broker::QueueType,
}

impl Global {
    pub fn names(&self) -> Names {
        Names::new(self.namespace.clone().unwrap_or_else(|| "a2a".into()))
            .with_queue_type(self.queue_type)
    }

    /// The configured keys: the registry (key file, else JOURNEYMAN_AUTH_KEYS) joined with
    /// the private key file; none when nothing is configured. Shared HS256 secrets are
    /// refused unless --allow-hs256, and warned about when allowed.
    pub fn keyring(&self) -> Result<Option<Keyring>> {
        let inline = std::env::var(crate::wire::auth::KEYS_ENV).ok();
        let private_inline = self.auth_private_key.clone();
        let ring = Keyring::from_sources(
            self.auth_keys_file.as_deref(),
            inline.as_deref(),
            self.auth_private_key_file.as_deref(),
            private_inline.as_deref(),
        )?;
        if let Some(r) = &ring
            && r.has_hs256()
        {
            if !self.allow_hs256 {
                bail!(
                    "the keys include a shared HS256 secret, which every holder can sign with; \
                     make each sender an Ed25519 key pair with `journeyman token keygen` \
                     (docs/protocol.md §10, migration), or pass --allow-hs256 \
                     ({}=1) to accept shared secrets on a single-tenant machine",
                    crate::wire::auth::ALLOW_HS256_ENV
                );
            }
            tracing::warn!(
                "shared HS256 keys are allowed (--allow-hs256): any holder of such a key can sign as anyone it is bound to; migrate to Ed25519 key pairs"
            );
        }
        Ok(ring)
    }

    /// Who the CLI speaks as on journey commands, and its token (if authentication is
    /// configured): the given token's subject, else `journeyman-cli` as an operator.
    pub(crate) fn command_identity(&self) -> Result<(AgentRef, Option<String>)> {
        if let Some(token) = &self.auth_token {
            let sub = crate::wire::auth::unverified_subject(token).ok_or_else(|| {
                anyhow!("--auth-token (JOURNEYMAN_AUTH_TOKEN) is not a journeyman token")
            })?;
            return Ok((AgentRef::new(sub, "operator"), Some(token.clone())));
        }
        let Some(ring) = self.keyring()? else {
            return Ok((AgentRef::new("journeyman-cli", "operator"), None));
        };
        // The CLI speaks as the subject its private key is bound to; its roles are what
        // the orchestrator's registry grants that key.
        let key = ring.require_signing_key()?.clone();
        let me = AgentRef::new(key.subject().unwrap_or("journeyman-cli"), "operator");
        let token = Signer::new(key, me.agent_id.clone())?
            .with_ttl(Duration::from_secs(300))
            .token(Utc::now());
        Ok((me, Some(token)))
    }
}

/// `--http-addr`: one orchestrator, or the replicas of a fleet, resolved once at start.
#[derive(Debug, Clone)]
pub struct HttpAddrs {
    /// The entries as given (comma-separated).
    pub specs: Vec<String>,
    /// Every replica they name.
    pub peers: Vec<crate::http::fleet::Peer>,
    /// Entries that did not resolve, while others did: replicas that cannot answer.
    pub unresolved: Vec<crate::http::fleet::Unreachable>,
}

impl HttpAddrs {
    /// One replica exactly: the reading commands read and print it as they always have.
    pub fn is_single(&self) -> bool {
        self.peers.len() == 1 && self.unresolved.is_empty()
    }

    /// The one address a server binds or a probe asks (IPv4 preferred, as ever).
    pub fn one(&self, command: &str) -> Result<SocketAddr> {
        match self.specs.as_slice() {
            [spec] => socket_addr(spec).map_err(|e| anyhow!("--http-addr: {e}")),
            specs => bail!(
                "--http-addr lists {} addresses, but `{command}` uses one: give it this process's own address{}",
                specs.len(),
                if command == "orchestrator" {
                    ", and the other replicas with --peers (JOURNEYMAN_PEERS)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// `--http-addr`'s parser: one `host:port` (with today's messages), or several.
pub fn http_addrs(s: &str) -> Result<HttpAddrs, String> {
    use crate::http::fleet;
    let specs = fleet::parse_list(s).map_err(|e| e.to_string())?;
    if let [spec] = specs.as_slice() {
        // One entry: an address that cannot be resolved fails here, as it always has.
        socket_addr(spec)?;
    }
    let (peers, unresolved) = fleet::resolve_blocking(&specs);
    if peers.is_empty() {
        let why: Vec<String> = unresolved.into_iter().map(|u| u.error).collect();
        return Err(format!("no replica resolves: {}", why.join("; ")));
    }
    Ok(HttpAddrs {
        specs,
        peers,
        unresolved,
    })
}

/// `--peers`: one `host:port` (checked here, resolved whenever the fleet is gathered).
pub fn peer_spec(s: &str) -> Result<String, String> {
    crate::http::fleet::check_spec(s.trim())
        .map(|()| s.trim().to_string())
        .map_err(|e| e.to_string())
}

/// An `ip:port`, or a `host:port` resolved once at start. IPv4 is preferred
/// when a name has both (`localhost`), so a server and its clients given the same name
/// meet on the same address.
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let hint = "expected host:port or ip:port, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080";
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{s}': {e} ({hint})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{s}' resolves to no address ({hint})"))
}

/// Every duration option: humantime's forms, with an error that lists them (humantime's
/// own says only "expected number at 0").
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!(
            "'{s}' is not a duration ({e}); use a number and a unit: 500ms, 30s, 15m, 24h, 7d, or combined: 1h30m"
        )
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_resolve_host_names_and_prefer_ipv4() {
        assert_eq!(
            socket_addr("127.0.0.1:8080"),
            Ok(([127, 0, 0, 1], 8080).into())
        );
        assert_eq!(
            socket_addr("localhost:8080"),
            Ok(([127, 0, 0, 1], 8080).into())
        );
        assert!(socket_addr("[::1]:8080").unwrap().is_ipv6());
        let e = socket_addr("localhost").unwrap_err();
        assert!(e.contains("expected host:port"), "{e}");
    }

    #[test]
    fn one_http_addr_is_one_replica_and_a_list_is_each() {
        let one = http_addrs("localhost:8080").unwrap();
        assert!(one.is_single());
        assert_eq!(
            one.one("orchestrator").unwrap(),
            ([127, 0, 0, 1], 8080).into()
        );
        let two = http_addrs("127.0.0.1:1,127.0.0.1:2").unwrap();
        assert!(!two.is_single());
        assert_eq!(two.peers.len(), 2);
        let e = two.one("orchestrator").unwrap_err().to_string();
        assert!(e.contains("--peers"), "{e}");
        let partly = http_addrs("127.0.0.1:1,no-such-host.invalid:2").unwrap();
        assert_eq!((partly.peers.len(), partly.unresolved.len()), (1, 1));
        assert!(
            !partly.is_single(),
            "a replica that cannot answer is reported"
        );
        assert!(http_addrs("no-such-host.invalid:1").is_err());
        assert!(
            http_addrs("a:1,b")
                .unwrap_err()
                .contains("'b' is not host:port")
        );
    }

    #[test]
    fn a_bad_duration_says_which_forms_are_valid() {
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        let e = duration("forever").unwrap_err();
        assert!(
            e.contains("'forever' is not a duration") && e.contains("30s, 15m, 24h, 7d"),
            "{e}"
        );
    }
}
