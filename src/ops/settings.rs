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
    /// A host name is resolved (localhost:8080 is 127.0.0.1:8080).
    #[arg(long, env = "JOURNEYMAN_HTTP_ADDR", global = true, default_value = crate::http::DEFAULT_ADDR, value_parser = socket_addr)]
    pub http_addr: SocketAddr,
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

/// `--http-addr`: an `ip:port`, or a `host:port` resolved once at start. IPv4 is preferred
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
    fn a_bad_duration_says_which_forms_are_valid() {
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        let e = duration("forever").unwrap_err();
        assert!(
            e.contains("'forever' is not a duration") && e.contains("30s, 15m, 24h, 7d"),
            "{e}"
        );
    }
}
