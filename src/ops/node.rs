//! A throwaway RabbitMQ node of the demo's own, for a broker that lacks what the demo
//! needs (the consistent-hash exchange for several orchestrators): the broker the user
//! pointed at is never changed. Own node name, ports, data directory and Erlang cookie;
//! stopped and removed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The server script itself, not the `/usr/sbin` wrapper (which switches to the rabbitmq
/// user and writes under /var/log).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct PrivateNode {
    name: String,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrivateNode {
    /// Whether this machine can start one.
    pub fn available() -> bool {
        Path::new(SERVER).exists() && Path::new(CTL).exists()
    }

    /// Starts a node with `plugins` enabled and waits until it accepts connections.
    pub async fn start(plugins: &[&str]) -> Result<Self> {
        if !Self::available() {
            bail!("RabbitMQ is not installed here ({SERVER} is missing)");
        }
        let dir = tempfile::Builder::new()
            .prefix("journeyman-node-")
            .tempdir()?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (port, mut dist) = (free_port()?, free_port()?);
        while dist == port {
            dist = free_port()?;
        }
        let root = dir.path();
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let cookie = root.join("home/.erlang.cookie");
        std::fs::write(&cookie, format!("JMDEMO{}", id.to_uppercase()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
        std::fs::write(
            root.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )?;
        std::fs::write(
            root.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\n"),
        )?;
        std::fs::write(
            root.join("rabbitmq-env.conf"),
            "ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )?;
        let node = Self {
            name: format!("jm-demo-{}@localhost", &id[..12]),
            port,
            dir,
        };
        let r = node.root();
        let status = tokio::process::Command::new(SERVER)
            .env("HOME", r.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", r.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", r.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", r.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", r.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", r.join("rabbitmq.conf"))
            .current_dir(&r)
            .arg("-detached")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("cannot run rabbitmq-server")?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed ({status})");
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = node.ctl(&["await_startup", "--timeout", "20"]).await?;
            if out.status.success() {
                return Ok(node);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the private RabbitMQ node did not start within {START_TIMEOUT:?}; its log is in {}",
                    r.join("log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    async fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = tokio::process::Command::new(CTL)
            .env("HOME", self.root().join("home"))
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .context("rabbitmqctl timed out")?
            .context("cannot run rabbitmqctl")
    }
}

/// A broker with the consistent-hash exchange, for `who` (the demo, the bench) running
/// several orchestrators: `url` when it has the exchange, else a private node of its own,
/// said on stderr (the broker at `url` is left as it is). The node, when one was started,
/// must be kept alive while it is used.
pub async fn with_consistent_hash(url: &str, who: &str) -> Result<(String, Option<PrivateNode>)> {
    if crate::broker::has_consistent_hash(url).await? {
        return Ok((url.to_string(), None));
    }
    let shown = crate::broker::redact(url);
    if !PrivateNode::available() {
        bail!(
            "several orchestrators need the broker's consistent-hash exchange, which {shown} lacks: enable it with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` (no restart needed), or run one orchestrator"
        );
    }
    eprintln!(
        "journeyman {who}: {shown} lacks the consistent-hash exchange (rabbitmq_consistent_hash_exchange) that several orchestrators need; starting a private RabbitMQ node with it for this run (to use yours: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
    );
    let node = PrivateNode::start(&["rabbitmq_consistent_hash_exchange"])
        .await
        .context("cannot start a private RabbitMQ node")?;
    Ok((node.url(), Some(node)))
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new(CTL)
            .env("HOME", self.root().join("home"))
            .args(["-n", &self.name, "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
