//! The embedded store: one sled tree, key prefixes per kind of record, atomic batches.
//!
//! Why one tree: sled's `apply_batch` on a single tree is atomic and crash-safe, which is
//! exactly the "state change and outbox in one transaction" the orchestrator needs, at a
//! fraction of the cost of multi-tree transactions (whose closures may rerun). Few trees
//! also keeps sled's space amplification down.
//!
//! Every piece of journey state is keyed by client id (`j/<client>`, `h/<client>/<seq>`),
//! so journeys can later be partitioned across orchestrators, each with its own directory;
//! cross-journey views are scans over those per-client records.
//!
//! This module owns encoding and durability (`flush`); it knows nothing about the broker
//! and makes no decisions.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::wire::outgoing::Outgoing;

mod codec;
pub mod repartition;

pub use repartition::{Layout, Moved};

const JOURNEY: &[u8] = b"j/";
const INFLIGHT: &[u8] = b"i/";
const DEDUP: &[u8] = b"d/";
const OUTBOX: &[u8] = b"o/";
const HISTORY: &[u8] = b"h/";
const PLAYBOOK: &[u8] = b"p/";
const SNAPSHOT: &[u8] = b"s/";
/// Written when a store is created. sled recovers from a torn or garbled log by dropping
/// what it cannot read, so a store whose files exist but whose marker is gone has lost
/// data: that is reported, never silently started empty.
const CARD: &[u8] = b"w/";
/// Clients whose status card is due on the events exchange: coalesced, so a journey that
/// changes ten times between two rounds publishes one card.
const CARD_DUE: &[u8] = b"c/";
const FORMAT_KEY: &[u8] = b"meta/format";
/// Ids (history order, outbox order, cards) continue from here after a compaction, which
/// starts a fresh sled database whose own counter starts again at zero.
const ID_BASE_KEY: &[u8] = b"meta/id-base";
/// Set once the per-intent journey queues of before partitions were retired.
const LEGACY_RETIRED_KEY: &[u8] = b"meta/legacy-queues-retired";
/// Format 2: journey records and snapshots packed (see `codec`), task requests in the
/// outbox by reference. Format 1 stores are migrated when opened.
const FORMAT: &[u8] = b"journeyman-store-2";
const FORMAT_1: &[u8] = b"journeyman-store-1";

/// sled's page cache unless configured: enough for the hot journeys of a busy
/// orchestrator, small enough for a 256 MiB container.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {path} is locked by another process (is another orchestrator running on it?): {source}"
    )]
    Locked { path: String, source: sled::Error },
    #[error(
        "cannot open the data directory {path}: {source}. If it is corrupt, move it aside and restart; journeys in flight will need to be restarted"
    )]
    Open { path: String, source: sled::Error },
    #[error(
        "the data directory {path} is corrupt: {detail}. Move it aside (keep it for analysis) and start with an empty directory; journeys in flight must then be restarted"
    )]
    Corrupted { path: String, detail: String },
    #[error(
        "{path} holds no store, but its parent {parent} does (the data directory moved, e.g. from /data to /data/store). Move the store into {path} (mkdir -p {path} && mv {parent}/db {parent}/conf {parent}/blobs {parent}/snap.* {path}/) or set the data directory back to {parent}"
    )]
    Misplaced { path: String, parent: String },
    #[error(
        "a repartition of {path} has not finished: run the same `journeyman store repartition` command again (it resumes), then start the orchestrators"
    )]
    Repartitioning { path: String },
    #[error(
        "{path} holds the journeys of {stored}, but this orchestrator is {configured}: after changing the replica count, move the journeys with `journeyman store repartition` first (deploy/README.md, changing the replica count)"
    )]
    LayoutMismatch {
        path: String,
        stored: Layout,
        configured: Layout,
    },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("a stored {what} record could not be decoded: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl StoreError {
    /// Store failures are never retried in place: the worker stops and its messages are
    /// redelivered to a healthy one.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A message waiting to be published: recorded with the state change that caused it,
/// removed once the broker confirmed it.
///
/// Task requests are stored by reference only (client and correlation id): the journey's
/// record already says what the attempt is, and the runtime rebuilds the request from it
/// after a restart (same message id), so the outbox need not copy its body.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Position in the outbox, assigned by the store on write.
    pub id: u64,
    pub purpose: Purpose,
    /// Shared with the publisher: handing it over copies nothing.
    pub message: Arc<Outgoing>,
}

/// Why an outbox entry exists, so a returned (unroutable) publish can be handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Purpose {
    TaskRequest {
        client_id: String,
        correlation_id: String,
    },
    Reply,
    Event,
    DeadLetter,
}

/// Marks an outbox value that names a task request instead of holding it: an impossible
/// properties length in the place where full entries keep theirs.
const TASK_REF: [u8; 4] = [0xff; 4];

/// How an outbox entry is stored: its properties as JSON (the layout every format of the
/// store has used), then the raw body.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    message_id: String,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    message_type: String,
    headers: Vec<(String, String)>,
    purpose: Purpose,
}

impl OutboxEntry {
    pub fn new(purpose: Purpose, message: Outgoing) -> Self {
        Self {
            id: 0,
            purpose,
            message: Arc::new(message),
        }
    }

    /// Whether this entry is a task request the store knows by reference only, still to
    /// be rebuilt from its journey's record (see [`OutboxEntry`]).
    pub fn is_reference(&self) -> bool {
        matches!(self.purpose, Purpose::TaskRequest { .. }) && self.message.body.is_empty()
    }

    fn encode(&self) -> Vec<u8> {
        if let Purpose::TaskRequest {
            client_id,
            correlation_id,
        } = &self.purpose
        {
            let mut out = Vec::with_capacity(5 + client_id.len() + correlation_id.len());
            out.extend_from_slice(&TASK_REF);
            out.extend_from_slice(client_id.as_bytes());
            out.push(0);
            out.extend_from_slice(correlation_id.as_bytes());
            return out;
        }
        let m = &self.message;
        let meta = StoredMeta {
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            mandatory: m.mandatory,
            message_id: m.message_id.clone(),
            correlation_id: m.correlation_id.clone(),
            reply_to: m.reply_to.clone(),
            message_type: m.message_type.clone(),
            headers: m.headers.clone(),
            purpose: self.purpose.clone(),
        };
        let meta = serde_json::to_vec(&meta).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + meta.len() + m.body.len());
        out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&m.body);
        out
    }

    fn decode(id: u64, raw: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            what: "outbox",
            detail,
        };
        if raw.len() < 4 {
            return Err(corrupt("entry shorter than its header".into()));
        }
        if raw[..4] == TASK_REF {
            let rest = String::from_utf8_lossy(&raw[4..]);
            let (client_id, correlation_id) = rest
                .split_once('\0')
                .ok_or_else(|| corrupt("task reference without its correlation id".into()))?;
            return Ok(Self {
                id,
                purpose: Purpose::TaskRequest {
                    client_id: client_id.to_string(),
                    correlation_id: correlation_id.to_string(),
                },
                message: Arc::new(Outgoing::default()),
            });
        }
        let n = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        let meta = raw
            .get(4..4 + n)
            .ok_or_else(|| corrupt("truncated entry".into()))?;
        let m: StoredMeta = serde_json::from_slice(meta).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            id,
            purpose: m.purpose,
            message: Arc::new(Outgoing {
                exchange: m.exchange,
                routing_key: m.routing_key,
                mandatory: m.mandatory,
                message_id: m.message_id,
                correlation_id: m.correlation_id,
                reply_to: m.reply_to,
                message_type: m.message_type,
                headers: m.headers,
                body: raw[4 + n..].to_vec(),
            }),
        })
    }
}

/// One atomic change: every write of one handled message or timer.
#[derive(Default, Debug)]
pub struct Change {
    batch: sled::Batch,
    outbox: Vec<OutboxEntry>,
    /// History lines this change adds, per client: status cards show recent activity
    /// without reading back what is not committed yet.
    /// Kept encoded: only the webhook's cards read them back.
    history: Vec<(String, Vec<u8>)>,
    /// Nothing was written.
    pub empty: bool,
}

impl Change {
    pub fn new() -> Self {
        Self {
            empty: true,
            ..Default::default()
        }
    }

    pub fn put_journey<T: Serialize>(&mut self, client_id: &str, record: &T) {
        self.empty = false;
        self.batch
            .insert(key(JOURNEY, client_id.as_bytes()), codec::packed(record));
    }

    pub fn put_inflight(&mut self, correlation_id: &str, client_id: &str) {
        self.empty = false;
        self.batch.insert(
            key(INFLIGHT, correlation_id.as_bytes()),
            client_id.as_bytes(),
        );
    }

    pub fn remove_inflight(&mut self, correlation_id: &str) {
        self.empty = false;
        self.batch.remove(key(INFLIGHT, correlation_id.as_bytes()));
    }

    /// Marks a message id as handled; `value` is what a duplicate needs to know.
    pub fn put_dedup<T: Serialize>(&mut self, message_id: &str, value: &T) {
        self.empty = false;
        self.batch
            .insert(key(DEDUP, message_id.as_bytes()), codec::json(value));
    }

    pub fn push_outbox(&mut self, entry: OutboxEntry) {
        self.empty = false;
        self.outbox.push(entry);
    }

    pub fn remove_outbox(&mut self, id: u64) {
        self.empty = false;
        self.batch.remove(key(OUTBOX, &id.to_be_bytes()));
    }

    pub fn push_history<T: Serialize>(&mut self, client_id: &str, seq: u64, entry: &T) {
        self.empty = false;
        let mut k = key(HISTORY, client_id.as_bytes());
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        let json = codec::json(entry);
        self.batch.insert(k, json.as_slice());
        self.history.push((client_id.to_string(), json));
    }

    /// History lines this change adds for `client_id`, oldest first.
    pub fn history_of<'a>(
        &'a self,
        client_id: &'a str,
    ) -> impl Iterator<Item = serde_json::Value> + 'a {
        self.history
            .iter()
            .filter(move |(c, _)| c == client_id)
            .filter_map(|(_, v)| serde_json::from_slice(v).ok())
    }

    /// The client's status card is due (published by the next card round).
    pub fn mark_card_due(&mut self, client_id: &str) {
        self.empty = false;
        self.batch.insert(key(CARD_DUE, client_id.as_bytes()), &[]);
    }

    /// The client's status card was built and queued in this change.
    pub fn clear_card_due(&mut self, client_id: &str) {
        self.empty = false;
        self.batch.remove(key(CARD_DUE, client_id.as_bytes()));
    }

    /// A status card waiting for webhook delivery, in order.
    pub fn push_card<T: Serialize>(&mut self, seq: u64, card: &T) {
        self.empty = false;
        self.batch
            .insert(key(CARD, &seq.to_be_bytes()), codec::json(card));
    }

    /// A rollback snapshot, under the client like the rest of its journey.
    pub fn put_snapshot<T: Serialize>(&mut self, client_id: &str, seq: u64, snapshot: &T) {
        self.empty = false;
        let mut k = key(SNAPSHOT, client_id.as_bytes());
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        self.batch.insert(k, codec::packed(snapshot));
    }

    pub fn put_playbook<T: Serialize>(&mut self, hash: &str, playbook: &T) {
        self.empty = false;
        self.batch
            .insert(key(PLAYBOOK, hash.as_bytes()), codec::json(playbook));
    }
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

/// Rewrites a format 1 store in place: journey records and snapshots packed, then the new
/// marker, in batches and flushed. Readers take both layouts, so a migration cut short by
/// a crash leaves a readable store, and runs again (marker still 1) on the next open.
fn migrate_from_1(tree: &sled::Tree) -> Result<u64, StoreError> {
    let mut batch = sled::Batch::default();
    let mut n = 0u64;
    for prefix in [JOURNEY, SNAPSHOT] {
        for r in tree.scan_prefix(prefix) {
            let (k, v) = r?;
            if codec::is_packed(&v) {
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    what: "format 1 record",
                    detail: e.to_string(),
                })?;
            batch.insert(k, codec::packed(&value));
            n += 1;
            if n.is_multiple_of(10_000) {
                tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
    }
    batch.insert(FORMAT_KEY, FORMAT);
    tree.apply_batch(batch)?;
    tree.flush()?;
    Ok(n)
}

/// What [`Store::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Compaction {
    pub records: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The directory as it was, kept until the caller removes it.
    pub old_dir: std::path::PathBuf,
}

fn dir_bytes(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Records per kind: (count, key + value bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    pub journeys: (u64, u64),
    pub correlations: (u64, u64),
    pub dedup_marks: (u64, u64),
    pub outbox: (u64, u64),
    pub history: (u64, u64),
    pub snapshots: (u64, u64),
    pub cards: (u64, u64),
    pub cards_due: (u64, u64),
    pub other: (u64, u64),
}

impl Census {
    /// Key and value bytes of every record: the live data, without sled's log overhead.
    pub fn total_bytes(&self) -> u64 {
        [
            self.journeys,
            self.correlations,
            self.dedup_marks,
            self.outbox,
            self.history,
            self.snapshots,
            self.cards,
            self.cards_due,
            self.other,
        ]
        .iter()
        .map(|(_, b)| b)
        .sum()
    }
}

/// The store handle. Cloning shares the same database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    id_base: u64,
}

impl Store {
    /// Opens (creating) the data directory. A directory held by another process is a clear
    /// error, not a hang; a corrupt one is a clear fatal error, never a panic.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens with a page cache of `cache_bytes` (sled's own default is 1 GiB, far more
    /// than a journey's hot data needs).
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        repartition::check_not_repartitioning(path)?;
        Self::open_unchecked(path, cache_bytes)
    }

    /// Opens without the repartition marker check: for the repartition itself.
    fn open_unchecked(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let existed = path.join("db").exists() || path.join("conf").exists();
        // Starting empty beside the real store would look like every journey vanished.
        if !existed
            && let Some(parent) = path.parent()
            && parent.join("db").exists()
            && parent.join("conf").exists()
        {
            return Err(StoreError::Misplaced {
                path: shown,
                parent: parent.display().to_string(),
            });
        }
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // Durability comes from the orchestrator's own group-commit flushes; sled's timer
            // would add log writes of its own in between.
            .flush_every_ms(None);
        // sled may panic on some corrupt files; that must be a clear error, not a crash.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
            .map_err(|panic| {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled panicked while reading it".into());
                StoreError::Corrupted {
                    path: shown.clone(),
                    detail,
                }
            })?;
        let db = opened.map_err(|source| match &source {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked {
                    path: shown.clone(),
                    source,
                }
            }
            sled::Error::Io(io) if io.to_string().contains("lock") => StoreError::Locked {
                path: shown.clone(),
                source,
            },
            sled::Error::Corruption { .. } => StoreError::Corrupted {
                path: shown.clone(),
                detail: source.to_string(),
            },
            _ => StoreError::Open {
                path: shown.clone(),
                source,
            },
        })?;
        let tree = db.open_tree("journeyman")?;
        match tree.get(FORMAT_KEY)? {
            Some(v) if v.as_ref() == FORMAT => {}
            Some(v) if v.as_ref() == FORMAT_1 => {
                let n = migrate_from_1(&tree)?;
                tracing::info!(path = %shown, records = n, "store migrated from format 1 to format 2");
            }
            Some(v) => {
                return Err(StoreError::Corrupted {
                    path: shown,
                    detail: format!(
                        "unknown store format {:?} (this build reads {:?} and migrates {:?}); was it written by a newer journeyman? Run that version, or restore a backup",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(FORMAT),
                        String::from_utf8_lossy(FORMAT_1),
                    ),
                });
            }
            None if existed => {
                return Err(StoreError::Corrupted {
                    path: shown,
                    detail: "its files exist but its format marker is gone: the log was truncated or damaged".into(),
                });
            }
            None => {
                tree.insert(FORMAT_KEY, FORMAT)?;
                tree.flush()?;
            }
        }
        let id_base = tree
            .get(ID_BASE_KEY)?
            .and_then(|v| v.as_ref().try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        Ok(Self { db, tree, id_base })
    }

    /// Rewrites the store at `path` into a fresh directory holding only its live records,
    /// then swaps it in; the old directory is kept beside it as `<path>.before-compact-<ts>`
    /// until the caller removes it. sled's log keeps superseded versions of rewritten
    /// records (tens of KB per finished journey against a few KB live); this returns the
    /// space. The orchestrator must be stopped (sled's lock refuses a running one).
    pub fn compact(path: &Path) -> Result<Compaction, StoreError> {
        let shown = path.display().to_string();
        let io = |e: std::io::Error| StoreError::Open {
            path: shown.clone(),
            source: sled::Error::Io(e),
        };
        let before = dir_bytes(path).map_err(io)?;
        let staging = path.with_extension("compacting");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io)?;
        }
        let records;
        {
            let old = Self::open(path)?;
            let next = old.next_id()?;
            let fresh = Self::open(&staging)?;
            let mut batch = sled::Batch::default();
            let mut n = 0u64;
            for r in old.tree.iter() {
                let (k, v) = r?;
                if k.as_ref() == ID_BASE_KEY {
                    continue;
                }
                batch.insert(k, v);
                n += 1;
                if n.is_multiple_of(10_000) {
                    fresh.tree.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            batch.insert(ID_BASE_KEY, &next.to_be_bytes());
            fresh.tree.apply_batch(batch)?;
            fresh.tree.flush()?;
            records = n;
        }
        let kept = path.with_extension(format!(
            "before-compact-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ));
        std::fs::rename(path, &kept).map_err(io)?;
        std::fs::rename(&staging, path).map_err(io)?;
        let after = dir_bytes(path).map_err(io)?;
        Ok(Compaction {
            records,
            bytes_before: before,
            bytes_after: after,
            old_dir: kept,
        })
    }

    /// Applies a change atomically and returns its outbox entries with their ids.
    /// Not durable until [`Store::flush`] returns.
    pub fn commit(&self, mut change: Change) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut outbox = std::mem::take(&mut change.outbox);
        for e in &mut outbox {
            e.id = self.next_id()?;
            change
                .batch
                .insert(key(OUTBOX, &e.id.to_be_bytes()), e.encode());
        }
        self.tree.apply_batch(change.batch)?;
        Ok(outbox)
    }

    /// One fsync for everything committed so far: callers group many commits per flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    pub fn journey<T: DeserializeOwned>(&self, client_id: &str) -> Result<Option<T>, StoreError> {
        self.get_json(&key(JOURNEY, client_id.as_bytes()), "journey")
    }

    pub fn journeys<T: DeserializeOwned>(
        &self,
    ) -> impl Iterator<Item = Result<T, StoreError>> + '_ {
        self.tree.scan_prefix(JOURNEY).map(|r| {
            let (_, v) = r?;
            codec::decode(&v).map_err(|detail| StoreError::Corrupt {
                what: "journey",
                detail,
            })
        })
    }

    pub fn inflight(&self, correlation_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(key(INFLIGHT, correlation_id.as_bytes()))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn dedup<T: DeserializeOwned>(&self, message_id: &str) -> Result<Option<T>, StoreError> {
        self.get_json(&key(DEDUP, message_id.as_bytes()), "dedup")
    }

    pub fn playbook<T: DeserializeOwned>(&self, hash: &str) -> Result<Option<T>, StoreError> {
        self.get_json(&key(PLAYBOOK, hash.as_bytes()), "playbook")
    }

    /// Every entry still waiting to be published, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut out = Vec::new();
        for r in self.tree.scan_prefix(OUTBOX) {
            let (k, v) = r?;
            let id = k
                .get(OUTBOX.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    what: "outbox",
                    detail: "bad key".into(),
                })?;
            out.push(OutboxEntry::decode(id, &v)?);
        }
        Ok(out)
    }

    pub fn outbox_len(&self) -> usize {
        self.tree.scan_prefix(OUTBOX).count()
    }

    /// Removes published entries. Not flushed on purpose: if the removal is lost in a
    /// crash the entry is published again with the same message id, which consumers absorb.
    pub fn clear_outbox(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for id in ids {
            b.remove(key(OUTBOX, &id.to_be_bytes()));
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    /// A client's history, oldest first.
    pub fn history<T: DeserializeOwned>(&self, client_id: &str) -> Result<Vec<T>, StoreError> {
        self.per_client(HISTORY, client_id, "history")
    }

    /// Drops dedup marks judged old by `is_old` on the stored value.
    pub fn prune_dedup<T: DeserializeOwned>(
        &self,
        is_old: impl Fn(&T) -> bool,
    ) -> Result<usize, StoreError> {
        self.prune(DEDUP, is_old)
    }

    /// Drops rollback snapshots judged old by `is_old`.
    pub fn prune_snapshots<T: DeserializeOwned>(
        &self,
        is_old: impl Fn(&T) -> bool,
    ) -> Result<usize, StoreError> {
        self.prune(SNAPSHOT, is_old)
    }

    /// Drops correlation entries (correlation id -> client) that `keep` rejects.
    pub fn prune_inflight(
        &self,
        mut keep: impl FnMut(&str, &str) -> bool,
    ) -> Result<usize, StoreError> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for r in self.tree.scan_prefix(INFLIGHT) {
            let (k, v) = r?;
            let corr = String::from_utf8_lossy(&k[INFLIGHT.len()..]);
            if !keep(&corr, &String::from_utf8_lossy(&v)) {
                b.remove(k);
                n += 1;
            }
        }
        self.tree.apply_batch(b)?;
        Ok(n)
    }

    /// How many records of each kind the store holds, for `journeyman bench` and ops.
    pub fn census(&self) -> Result<Census, StoreError> {
        let mut c = Census::default();
        for r in self.tree.iter() {
            let (k, v) = r?;
            let slot = match k.get(..2) {
                Some(JOURNEY) => &mut c.journeys,
                Some(INFLIGHT) => &mut c.correlations,
                Some(DEDUP) => &mut c.dedup_marks,
                Some(OUTBOX) => &mut c.outbox,
                Some(HISTORY) => &mut c.history,
                Some(SNAPSHOT) => &mut c.snapshots,
                Some(CARD) => &mut c.cards,
                Some(CARD_DUE) => &mut c.cards_due,
                _ => &mut c.other,
            };
            slot.0 += 1;
            slot.1 += (k.len() + v.len()) as u64;
        }
        Ok(c)
    }

    /// Every snapshot of a client's journey, oldest first.
    pub fn snapshots<T: DeserializeOwned>(&self, client_id: &str) -> Result<Vec<T>, StoreError> {
        self.per_client(SNAPSHOT, client_id, "snapshot")
    }

    /// The records of one kind kept under `<prefix><client>\0<seq>`, in sequence order.
    fn per_client<T: DeserializeOwned>(
        &self,
        prefix: &[u8],
        client_id: &str,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let mut p = key(prefix, client_id.as_bytes());
        p.push(0);
        self.tree
            .scan_prefix(p)
            .map(|r| {
                let (_, v) = r?;
                codec::decode(&v).map_err(|detail| StoreError::Corrupt { what, detail })
            })
            .collect()
    }

    fn prune<T: DeserializeOwned>(
        &self,
        prefix: &[u8],
        is_old: impl Fn(&T) -> bool,
    ) -> Result<usize, StoreError> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for r in self.tree.scan_prefix(prefix) {
            let (k, v) = r?;
            if let Ok(t) = codec::decode::<T>(&v)
                && is_old(&t)
            {
                b.remove(k);
                n += 1;
            }
        }
        self.tree.apply_batch(b)?;
        Ok(n)
    }

    /// The last `n` history lines of a client, oldest first.
    pub fn recent_history(
        &self,
        client_id: &str,
        n: usize,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut p = key(HISTORY, client_id.as_bytes());
        p.push(0);
        let mut out = Vec::with_capacity(n);
        for r in self.tree.scan_prefix(p).rev().take(n) {
            let (_, v) = r?;
            if let Ok(v) = codec::decode(&v) {
                out.push(v);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The oldest status cards awaiting delivery: (sequence, JSON body).
    pub fn cards(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for r in self.tree.scan_prefix(CARD).take(limit) {
            let (k, v) = r?;
            let seq = k
                .get(CARD.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or_default();
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` clients whose status card is due.
    pub fn cards_due(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.tree
            .scan_prefix(CARD_DUE)
            .keys()
            .take(limit)
            .map(|k| Ok(String::from_utf8_lossy(&k?[CARD_DUE.len()..]).into_owned()))
            .collect()
    }

    pub fn cards_len(&self) -> usize {
        self.tree.scan_prefix(CARD).count()
    }

    /// A delivered card; flushed, so a delivered card is not delivered again after a
    /// restart more than once.
    pub async fn remove_card(&self, seq: u64) -> Result<(), StoreError> {
        self.tree.remove(key(CARD, &seq.to_be_bytes()))?;
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Checks this directory belongs to `layout` and records it (a new or older store
    /// takes it). A directory of another layout is refused: its journeys would be where
    /// the broker no longer sends their commands.
    pub fn claim_layout(&self, path: &Path, layout: Layout) -> Result<(), StoreError> {
        match self.tree.get(repartition::LAYOUT_KEY)? {
            Some(v) => {
                let stored: Layout = codec::decode(&v).map_err(|detail| StoreError::Corrupt {
                    what: "layout",
                    detail,
                })?;
                if stored != layout {
                    return Err(StoreError::LayoutMismatch {
                        path: path.display().to_string(),
                        stored,
                        configured: layout,
                    });
                }
                Ok(())
            }
            None => {
                self.tree
                    .insert(repartition::LAYOUT_KEY, codec::json(&layout))?;
                self.tree.flush()?;
                Ok(())
            }
        }
    }

    /// Whether the journey queues of before partitions are known to be gone for this
    /// store's namespace (see the orchestrator's session start). A store without journeys
    /// has nothing of before partitions and counts as done.
    pub fn legacy_queues_retired(&self) -> Result<bool, StoreError> {
        Ok(self.tree.get(LEGACY_RETIRED_KEY)?.is_some()
            || self.tree.scan_prefix(JOURNEY).next().is_none())
    }

    pub fn mark_legacy_queues_retired(&self) -> Result<(), StoreError> {
        self.tree.insert(LEGACY_RETIRED_KEY, &[])?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.id_base + self.db.generate_id()?)
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        k: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.tree.get(k)? {
            None => Ok(None),
            Some(v) => codec::decode(&v)
                .map(Some)
                .map_err(|detail| StoreError::Corrupt { what, detail }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &[u8]) -> OutboxEntry {
        OutboxEntry::new(
            Purpose::Event,
            Outgoing {
                exchange: "x".into(),
                routing_key: "k".into(),
                mandatory: true,
                message_id: "m".into(),
                correlation_id: Some("c".into()),
                reply_to: None,
                message_type: "request".into(),
                headers: vec![("a".into(), "b".into())],
                body: body.to_vec(),
            },
        )
    }

    #[tokio::test]
    async fn change_is_atomic_and_outbox_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut c = Change::new();
        c.put_journey("acme", &serde_json::json!({"stage": "sandbox"}));
        c.push_outbox(entry(&[0xff, 0x00, b'x']));
        c.push_outbox(entry(b"{}"));
        c.put_dedup("m1", &1u32);
        let published = store.commit(c).unwrap();
        store.flush().await.unwrap();
        assert_eq!(published.len(), 2);
        assert!(published[0].id < published[1].id);
        let back = store.outbox().unwrap();
        assert_eq!(back, published);
        assert_eq!(back[0].message.body, vec![0xff, 0x00, b'x']);
        store.clear_outbox(&[published[0].id]).unwrap();
        assert_eq!(store.outbox_len(), 1);
        assert_eq!(store.dedup::<u32>("m1").unwrap(), Some(1));
        let j: Option<serde_json::Value> = store.journey("acme").unwrap();
        assert_eq!(j.unwrap()["stage"], "sandbox");
    }

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        // sled's lock is per process (flock), so a second open in-process may succeed on
        // some platforms; the cross-process refusal is covered by the integration tests.
        if let Err(e) = Store::open(dir.path()) {
            assert!(e.to_string().contains("locked") || e.to_string().contains("cannot open"));
        }
    }

    #[test]
    fn compaction_keeps_every_record_and_ids_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let last_id;
        {
            let store = Store::open(&path).unwrap();
            // Many rewrites of the same records: the log fills with superseded versions.
            for round in 0..200u32 {
                let mut c = Change::new();
                for client in 0..50 {
                    c.put_journey(
                        &format!("c{client}"),
                        &serde_json::json!({"round": round, "pad": "x".repeat(500)}),
                    );
                }
                store.commit(c).unwrap();
            }
            let mut c = Change::new();
            c.push_history("c1", store.next_id().unwrap(), &"first");
            c.push_outbox(entry(b"pending"));
            store.commit(c).unwrap();
            store.tree.flush().unwrap();
            last_id = store.next_id().unwrap();
        }
        let done = Store::compact(&path).unwrap();
        assert!(done.bytes_after < done.bytes_before, "{done:?}");
        assert!(done.old_dir.exists());
        let store = Store::open(&path).unwrap();
        for client in 0..50 {
            let j: serde_json::Value = store.journey(&format!("c{client}")).unwrap().unwrap();
            assert_eq!(j["round"], 199);
        }
        assert_eq!(
            store.outbox().unwrap().len(),
            1,
            "the unpublished entry survives"
        );
        assert!(store.next_id().unwrap() > last_id, "ids keep rising");
        let mut c = Change::new();
        c.push_history("c1", store.next_id().unwrap(), &"second");
        store.commit(c).unwrap();
        let h: Vec<String> = store.history("c1").unwrap();
        assert_eq!(
            h,
            vec!["first", "second"],
            "history order holds across compaction"
        );
    }

    #[test]
    fn a_store_left_in_the_parent_directory_is_reported_not_shadowed() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let e = Store::open(&dir.path().join("store"))
            .err()
            .expect("refused");
        assert!(matches!(e, StoreError::Misplaced { .. }), "{e}");
        assert!(e.to_string().contains("mv "), "says what to do: {e}");
        assert!(!dir.path().join("store").exists(), "nothing created");
    }

    #[test]
    fn history_is_ordered_per_client() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut c = Change::new();
        c.push_history("a", 2, &"second");
        c.push_history("a", 1, &"first");
        c.push_history("ab", 1, &"other client");
        store.commit(c).unwrap();
        let h: Vec<String> = store.history("a").unwrap();
        assert_eq!(h, vec!["first", "second"]);
    }
}
