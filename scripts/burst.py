"""Measures what a burst of oversize, unauthenticated messages costs the orchestrator
(issue 13): N bodies of SIZE MiB published at once as journey commands, then the
orchestrator's peak and settled RSS and the bytes left in its data directory.

    python3 scripts/burst.py [--n 24] [--mib 10] [--settle 15] [--binary target/debug/journeyman]

Needs pika (pip install pika) and the broker at JOURNEYMAN_AMQP_URL (default: local guest).
Starts its own orchestrator in a fresh namespace and data directory, and deletes the
namespace's queues and exchanges when done.
"""
import argparse, os, subprocess, tempfile, time, uuid

import pika

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=24)
ap.add_argument("--mib", type=int, default=10)
ap.add_argument("--settle", type=float, default=15.0)
ap.add_argument("--binary", default="target/debug/journeyman")
a = ap.parse_args()
url = os.environ.get("JOURNEYMAN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ns = "burst-" + uuid.uuid4().hex[:8]
tmp = tempfile.mkdtemp(prefix="journeyman-burst-")
data = os.path.join(tmp, "store")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


log = open(os.path.join(tmp, "orchestrator.log"), "w")
orch = subprocess.Popen(
    [a.binary, "--namespace", ns, "--http-addr", "127.0.0.1:0", "orchestrator",
     "--insecure-no-auth", "--data-dir", data],
    stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
# Ready when the orchestrator's command queue has a consumer (bounded wait).
deadline = time.time() + 60
queue = None
while time.time() < deadline:
    try:
        for q in (f"{ns}.intent.journey.start",):
            probe = conn.channel()
            try:
                r = probe.queue_declare(q, passive=True)
                if r.method.consumer_count > 0:
                    queue = q
                    break
            except pika.exceptions.ChannelClosedByBroker:
                pass
        if queue:
            break
    except Exception:
        pass
    time.sleep(0.2)
assert queue, "the orchestrator did not start consuming; see " + log.name
time.sleep(2)  # let start-up allocations settle before the baseline
start_rss, start_disk = rss_kib(orch.pid), du(data)
body = b'{"x":"' + b"a" * (a.mib * 1024 * 1024) + b'"}'
ch.confirm_delivery()
t0 = time.time()
for i in range(a.n):
    ch.basic_publish(f"{ns}.intents", "journey.start", body,
                     pika.BasicProperties(message_id=str(uuid.uuid4()), delivery_mode=2))
peak = start_rss
end = time.time() + a.settle
while time.time() < end:
    peak = max(peak, rss_kib(orch.pid))
    time.sleep(0.05)
settled_rss, end_disk = rss_kib(orch.pid), du(data)
dlq = f"{ns}.dead-letter"
try:
    dead = conn.channel().queue_declare(dlq, passive=True).method.message_count
except Exception:
    dead = "?"
orch.terminate()
orch.wait(30)
after_stop_disk = du(data)
print(f"burst: {a.n} x {a.mib} MiB published in {time.time() - t0 - a.settle:.1f}s "
      f"(after publishing, sampled for {a.settle:.0f}s)")
print(f"RSS: start {start_rss / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
      f"settled {settled_rss / 1024:.1f} MiB ({(settled_rss - start_rss) / 1024:+.1f} MiB)")
print(f"data dir: start {start_disk} B, after burst {end_disk} B "
      f"({end_disk - start_disk:+d} B), after stop {after_stop_disk} B")
print(f"dead letters in {dlq}: {dead}")
# Clean up the namespace on the shared broker: every queue the orchestrator declared
# (its names: <ns>.intent.<intent>, <ns>.orchestrator.*, <ns>.dead-letter, ...).
c = conn.channel()
names = [f"{ns}.dead-letter", f"{ns}.orchestrator.0.replies"]
names += [f"{ns}.intent.journey.{i}" for i in (
    "start", "status", "evidence", "promote", "rollback", "cancel", "pause", "resume",
    "complete", "report_event", "validate", "list")]
# The task intents' queues, from the default playbook the orchestrator ran.
import re
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "playbooks", "default.yaml")) as f:
    names += sorted({f"{ns}.intent.{m}" for m in re.findall(r"intent:\s*(\S+)", f.read())})
for q in names:
    try:
        c.queue_delete(q)
    except Exception:
        c = conn.channel()
for x in (f"{ns}.intents", f"{ns}.events", f"{ns}.dlx"):
    try:
        c.exchange_delete(x)
    except Exception:
        c = conn.channel()
conn.close()
