//! The settings every command shares: where the broker is, which namespace, how to log,
//! which keys, and who the CLI speaks as.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow};
use chrono::Utc;
use clap::{Args, ValueEnum};

use crate::broker::{self, Names};
use crate::wire::auth::{Keyring, Signer};
use crate::wire::protocol::AgentRef;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
#[derive(Debug, Args)]
pub struct Global {
    /// AMQP URL of the broker (amqps:// for TLS).
    #[arg(long, env = "JOURNEYMAN_AMQP_URL", global = true, default_value = DEFAULT_AMQP_URL, hide_env_values = true, hide_default_value = true)]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name, so tenants and tests never collide
    /// [default: a2a; the demo uses a fresh one].
    #[arg(long, env = "JOURNEYMAN_NAMESPACE", global = true)]
    pub namespace: Option<String>,
    /// Log format: readable text, or one JSON object per line for machines.
    #[arg(long, value_enum, global = true, default_value = "text")]
    pub log_format: LogFormat,
    /// File of authentication keys, one `kid=base64secret` per line; the first signs.
    /// Without it, keys come from JOURNEYMAN_AUTH_KEYS (same format, `;`-separated).
    #[arg(long, env = crate::wire::auth::KEYS_FILE_ENV, global = true)]
    pub auth_keys_file: Option<PathBuf>,
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
    #[arg(long, env = "JOURNEYMAN_HTTP_ADDR", global = true, default_value = crate::http::DEFAULT_ADDR)]
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

    /// The configured keys: the key file if named, else JOURNEYMAN_AUTH_KEYS, else none.
    pub fn keyring(&self) -> Result<Option<Keyring>> {
        let inline = std::env::var(crate::wire::auth::KEYS_ENV).ok();
        Ok(Keyring::from_sources(
            self.auth_keys_file.as_deref(),
            inline.as_deref(),
        )?)
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
        let me = AgentRef::new("journeyman-cli", "operator");
        let token = self.keyring()?.map(|ring| {
            Signer::new(ring.signing_key().clone(), me.agent_id.clone())
                .with_roles(vec![crate::wire::auth::OPERATOR.into()])
                .with_ttl(Duration::from_secs(300))
                .token(Utc::now())
        });
        Ok((me, token))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
