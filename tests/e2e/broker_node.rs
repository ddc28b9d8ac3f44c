//! A RabbitMQ node of a test's own, for tests that stop, kill or throttle the broker: the
//! shared broker at 127.0.0.1:5672 serves other tests and people, so it is never touched.
//!
//! The node gets free ports (AMQP and Erlang distribution; only the consistent-hash
//! exchange plugin, so no management or Prometheus listener), a node name of its own, and a temp dir for its data, logs, config
//! and Erlang cookie (`HOME`, shared with the `rabbitmqctl` calls). It is stopped and its
//! directory removed on drop, and by a watchdog process if the test process dies first.
//!
//! Starting a node takes seconds (more on a busy machine), so the tests share one node,
//! [`BrokerNode::shared`], and take turns: each holds it for its whole run, in a namespace
//! of its own, and leaves it running and unthrottled (a test that fails half-way is
//! cleaned up after by the next one). The watchdog stops it when the test process exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// The server script itself, not the `/usr/sbin` wrapper (which switches to the rabbitmq
/// user and writes its logs under /var/log).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// Bound on a node (re)start and on any one rabbitmqctl call.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct BrokerNode {
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    /// The beam process, for `kill` and as a last resort on drop.
    beam_pid: Option<i32>,
    watchdog: Option<std::process::Child>,
    /// Faults in effect, undone before the next test gets the node.
    app_stopped: bool,
    throttled: bool,
}

static SHARED: tokio::sync::Mutex<Option<BrokerNode>> = tokio::sync::Mutex::const_new(None);

/// The shared node, held by one test at a time.
pub struct SharedNode(tokio::sync::MutexGuard<'static, Option<BrokerNode>>);

impl std::ops::Deref for SharedNode {
    type Target = BrokerNode;
    fn deref(&self) -> &BrokerNode {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for SharedNode {
    fn deref_mut(&mut self) -> &mut BrokerNode {
        self.0.as_mut().unwrap()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl BrokerNode {
    /// The node shared by this test binary's broker-fault tests, started on first use and
    /// healed if an earlier test left it stopped, killed or throttled.
    pub async fn shared() -> SharedNode {
        let mut guard = SHARED.lock().await;
        match guard.as_mut() {
            None => *guard = Some(Self::start().await),
            Some(node) => {
                if node.beam_pid.is_none() {
                    node.restart().await;
                } else if node.app_stopped {
                    node.start_app().await;
                }
                if node.throttled {
                    node.set_vm_memory_high_watermark(0.4).await;
                }
            }
        }
        SharedNode(guard)
    }

    /// Starts a fresh node and waits until it accepts AMQP connections.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("jm-broker-")
            .tempdir()
            .unwrap();
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        let (amqp_port, mut dist_port) = (free_port(), free_port());
        while dist_port == amqp_port {
            dist_port = free_port();
        }
        let mut node = Self {
            name: format!("jm-test-{}@localhost", &uuid[..12]),
            amqp_port,
            dist_port,
            dir,
            beam_pid: None,
            watchdog: None,
            app_stopped: false,
            throttled: false,
        };
        let root = node.root().to_path_buf();
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let cookie = root.join("home/.erlang.cookie");
        std::fs::write(&cookie, format!("JMTEST{}", uuid.to_uppercase())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        // Only the consistent-hash exchange (partitioned journeys): no management or
        // Prometheus listeners to collide with anything.
        std::fs::write(
            root.join("enabled_plugins"),
            "[rabbitmq_consistent_hash_exchange].\n",
        )
        .unwrap();
        std::fs::write(
            root.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{amqp_port}\nloopback_users.guest = true\n"),
        )
        .unwrap();
        // Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (NODENAME of the shared
        // broker) does not apply.
        std::fs::write(
            root.join("rabbitmq-env.conf"),
            "ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .unwrap();
        node.watchdog = node.spawn_watchdog();
        node.launch().await;
        node
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn home(&self) -> PathBuf {
        self.root().join("home")
    }

    pub fn log(&self) -> String {
        let f = self.root().join("log").join(format!("{}.log", self.name));
        std::fs::read_to_string(f).unwrap_or_default()
    }

    fn server_env(&self, cmd: &mut Command) {
        let r = self.root();
        cmd.env("HOME", self.home())
            .env("RABBITMQ_CONF_ENV_FILE", r.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", r.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", r.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", r.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", r.join("rabbitmq.conf"))
            .current_dir(r);
    }

    /// Runs `rabbitmqctl -n <node> args…` (bounded) and returns its stdout.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(CTL);
        cmd.env("HOME", self.home())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(CTL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| format!("rabbitmqctl {args:?} timed out"))?
            .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn ctl_ok(&self, args: &[&str]) -> String {
        self.ctl(args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// `rabbitmq-server -detached` on this node's data dir, then waits for the startup.
    async fn launch(&mut self) {
        let mut cmd = Command::new(SERVER);
        self.server_env(&mut cmd);
        let status = cmd
            .arg("-detached")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("run rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        self.await_startup().await;
        let pid = self.ctl_ok(&["eval", "os:getpid()."]).await;
        self.beam_pid = pid.trim().trim_matches('"').parse().ok();
    }

    /// Waits (bounded) until the node runs the rabbit application. `await_startup` fails at
    /// once while the node is not registered yet, hence the loop.
    pub async fn await_startup(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.ctl(&["await_startup", "--timeout", "20"]).await {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "node {} did not start within {START_TIMEOUT:?}: {e}\nlog:\n{}",
                    self.name,
                    self.log()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Stops the rabbit application (the Erlang node stays up): every client connection is
    /// closed and no new one is accepted.
    pub async fn stop_app(&mut self) {
        self.app_stopped = true;
        self.ctl_ok(&["stop_app"]).await;
    }

    pub async fn start_app(&mut self) {
        self.ctl_ok(&["start_app"]).await;
        self.await_startup().await;
        self.app_stopped = false;
    }

    /// SIGKILLs the broker's Erlang VM (no clean shutdown) and waits until it is gone.
    pub async fn kill(&mut self) {
        let pid = self.beam_pid.take().expect("the node's pid is known");
        // SAFETY: kill(2) on a pid this helper started and read back from the node itself.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {pid}");
        let deadline = Instant::now() + START_TIMEOUT;
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "beam {pid} survives SIGKILL");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the node again on the same data directory (after `kill`).
    pub async fn restart(&mut self) {
        self.launch().await;
        self.app_stopped = false;
        self.throttled = false;
    }

    pub async fn close_all_connections(&self) {
        self.ctl_ok(&["close_all_connections", "test: injected fault"])
            .await;
    }

    /// 0 raises the memory alarm at once: every publishing connection is blocked.
    pub async fn set_vm_memory_high_watermark(&mut self, fraction: f64) {
        self.throttled = true;
        self.ctl_ok(&["set_vm_memory_high_watermark", &fraction.to_string()])
            .await;
        self.throttled = fraction < 0.4;
    }

    /// Whether a memory alarm is in effect on the node.
    pub async fn memory_alarm(&self) -> bool {
        let out = self.ctl_ok(&["eval", "rabbit_alarm:get_alarms()."]).await;
        out.contains("memory")
    }

    /// (messages ready, messages unacknowledged) of a queue, from the broker itself.
    pub async fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        let out = self
            .ctl_ok(&[
                "-q",
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .await;
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [n, r, u] if *n == queue => Some((r.parse().ok()?, u.parse().ok()?)),
                _ => None,
            }
        })
    }

    /// Unacknowledged messages over every queue whose name starts with `prefix`.
    pub async fn unacked_total(&self, prefix: &str) -> u64 {
        let out = self
            .ctl_ok(&["-q", "list_queues", "name", "messages_unacknowledged"])
            .await;
        out.lines()
            .filter_map(|l| {
                let (n, u) = l.split_once('\t')?;
                n.starts_with(prefix)
                    .then(|| u.trim().parse::<u64>().ok())?
            })
            .sum()
    }

    /// How many open connections carry `name` as their client-provided connection name.
    pub async fn connections_named(&self, name: &str) -> usize {
        let out = self
            .ctl_ok(&["-q", "list_connections", "client_properties"])
            .await;
        let needle = format!("\"{name}\"");
        out.lines().filter(|l| l.contains(&needle)).count()
    }

    /// Connections, channels and queues as the broker sees them, for failure messages.
    pub async fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &[
                "-q",
                "list_connections",
                "name",
                "state",
                "channels",
                "client_properties",
            ][..],
            &[
                "-q",
                "list_channels",
                "name",
                "prefetch_count",
                "consumer_count",
                "messages_unacknowledged",
            ][..],
            &[
                "-q",
                "list_queues",
                "name",
                "type",
                "state",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ][..],
        ] {
            out.push_str(&format!("$ rabbitmqctl {}\n", args.join(" ")));
            out.push_str(&self.ctl(args).await.unwrap_or_else(|e| e));
        }
        out
    }

    /// Closes (broker side) every connection named `name`; returns how many.
    pub async fn close_connections_named(&self, name: &str) -> usize {
        let out = self
            .ctl_ok(&["-q", "list_connections", "pid", "client_properties"])
            .await;
        let needle = format!("\"{name}\"");
        let pids: Vec<String> = out
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split('\t').next().map(|p| p.trim().to_string()))
            .collect();
        for pid in &pids {
            self.ctl_ok(&["close_connection", pid, "test: injected fault"])
                .await;
        }
        pids.len()
    }

    /// The prefetch of every channel that has a consumer: (channel name, prefetch).
    pub async fn consumer_prefetches(&self) -> Vec<(String, u64)> {
        let out = self
            .ctl_ok(&[
                "-q",
                "list_channels",
                "name",
                "prefetch_count",
                "consumer_count",
            ])
            .await;
        out.lines()
            .filter_map(|l| {
                // The name has spaces in it: "127.0.0.1:1234 -> 127.0.0.1:5672 (1)".
                let f: Vec<&str> = l.rsplitn(3, '\t').collect();
                match f.as_slice() {
                    [consumers, prefetch, name] if consumers.trim() != "0" => {
                        Some((name.to_string(), prefetch.trim().parse().ok()?))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Stops the node and removes the temp dir if the test process dies without dropping
    /// the node (SIGKILL, abort).
    fn spawn_watchdog(&self) -> Option<std::process::Child> {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             HOME='{home}' timeout 30 {CTL} -n '{node}' stop >/dev/null 2>&1; rm -rf '{root}'",
            pid = std::process::id(),
            home = self.home().display(),
            node = self.name,
            root = self.root().display(),
        );
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok()
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("timeout")
            .arg("30")
            .arg(CTL)
            .env("HOME", self.home())
            .args(["-n", &self.name, "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.beam_pid {
            // SAFETY: the node's own VM, in case `stop` did not get through.
            unsafe {
                if libc::kill(pid, 0) == 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        // The temp dir is removed when `dir` drops, right after this.
    }
}
