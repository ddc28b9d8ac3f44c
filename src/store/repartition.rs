//! Moving journeys between replicas' data directories when the replica count changes.
//!
//! Offline, with every orchestrator stopped (sled's lock refuses a directory in use): each
//! journey whose partition another replica owns under the new count moves there with
//! everything kept under its client (record, history, snapshots, due card, correlations,
//! outbox entries), plus the playbooks it may be pinned to and the dedup marks of the
//! directory it leaves (they name no client, and a command applied but not acked before
//! the stop must stay a duplicate wherever it is redelivered).
//!
//! Crash-safe and repeatable: a marker file in every directory makes an orchestrator refuse
//! it until the run completes; a journey is first written to its target in one atomic
//! batch (replacing whatever an interrupted run left there) and flushed, then removed from
//! its source. Running the same command again finishes an interrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::codec;
use super::{
    CARD_DUE, DEDUP, HISTORY, ID_BASE_KEY, INFLIGHT, JOURNEY, OUTBOX, OutboxEntry, PLAYBOOK,
    Purpose, SNAPSHOT, Store, StoreError, key,
};
use crate::domain::partition::owner;

/// Present while a repartition runs over a directory; see [`check_not_repartitioning`].
pub const MARKER: &str = "REPARTITIONING";
/// The layout a directory was last written for: partitions, replica index, replica count.
pub(super) const LAYOUT_KEY: &[u8] = b"meta/layout";

/// The partition count and fleet size a data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub partitions: u16,
    pub index: u16,
    pub replicas: u16,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replica {}/{} of {} partitions",
            self.index, self.replicas, self.partitions
        )
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Moved {
    /// Journeys moved, per (from, to) directory index.
    pub moves: Vec<(usize, usize, u64)>,
    /// Journeys with no recorded partition (older than partitions, unchanged since):
    /// left where they are.
    pub untagged: u64,
    /// Journeys in each directory afterwards.
    pub journeys: Vec<u64>,
}

#[derive(Deserialize)]
struct Tag {
    #[serde(default)]
    partition: Option<u16>,
}

/// Refuses to open a directory a repartition has not finished with.
pub(super) fn check_not_repartitioning(path: &Path) -> Result<(), StoreError> {
    if path.join(MARKER).exists() {
        return Err(StoreError::Repartitioning {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// Deals the journeys of `dirs` (replica i's directory at index i; as many as the larger
/// of the old and new counts) to their owners among the first `replicas`. `progress` is
/// told each journey moved.
pub fn repartition(
    dirs: &[PathBuf],
    partitions: u16,
    replicas: u16,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<Moved, StoreError> {
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        std::fs::write(d.join(MARKER), b"journeyman store repartition\n").map_err(|e| io(d, e))?;
    }
    let stores = dirs
        .iter()
        .map(|d| Store::open_unchecked(d, super::DEFAULT_CACHE_BYTES))
        .collect::<Result<Vec<_>, _>>()?;
    // Ids continue above every directory's, so moved history and snapshots stay ordered
    // before what the new owner appends.
    let mut base = 0u64;
    for s in &stores {
        base = base.max(s.next_id()?);
    }
    // Correlations and outbox entries name their client in the value: indexed once per
    // directory, before anything moves (a journey moves at most once per run).
    let indexes = stores
        .iter()
        .map(ClientIndex::of)
        .collect::<Result<Vec<_>, _>>()?;
    let mut moved = Moved::default();
    for (from, src) in stores.iter().enumerate() {
        let mut leaving: Vec<(String, usize)> = Vec::new();
        for r in src.tree.scan_prefix(JOURNEY) {
            let (k, v) = r?;
            let client = String::from_utf8_lossy(&k[JOURNEY.len()..]).into_owned();
            let tag: Tag = codec::decode(&v).map_err(|detail| StoreError::Corrupt {
                what: "journey",
                detail,
            })?;
            let Some(p) = tag.partition else {
                moved.untagged += 1;
                continue;
            };
            let to = usize::from(owner(p, replicas));
            if to != from {
                leaving.push((client, to));
            }
        }
        if leaving.is_empty() {
            continue;
        }
        let mut targets: Vec<usize> = leaving.iter().map(|(_, t)| *t).collect();
        targets.sort_unstable();
        targets.dedup();
        for &to in &targets {
            copy_shared(src, &stores[to])?;
        }
        for (client, to) in &leaving {
            let dst = &stores[*to];
            let mut add = sled::Batch::default();
            // An interrupted run may have copied this journey already: replace it.
            for k in client_keys(dst, client, &indexes[*to], true)? {
                add.remove(k);
            }
            for k in client_keys(src, client, &indexes[from], false)? {
                if let Some(v) = src.tree.get(&k)? {
                    add.insert(k, v);
                }
            }
            for id in indexes[from].outbox.get(client).into_iter().flatten() {
                if let Some(v) = src.tree.get(key(OUTBOX, &id.to_be_bytes()))? {
                    base += 1;
                    add.insert(key(OUTBOX, &base.to_be_bytes()), v);
                }
            }
            dst.tree.apply_batch(add)?;
            dst.tree.flush()?;
            let mut remove = sled::Batch::default();
            for k in client_keys(src, client, &indexes[from], true)? {
                remove.remove(k);
            }
            src.tree.apply_batch(remove)?;
            src.tree.flush()?;
            progress(from, *to, client);
            match moved
                .moves
                .iter_mut()
                .find(|(f, t, _)| *f == from && *t == *to)
            {
                Some(m) => m.2 += 1,
                None => moved.moves.push((from, *to, 1)),
            }
        }
    }
    for (i, s) in stores.iter().enumerate() {
        s.tree.insert(ID_BASE_KEY, &(base + 1).to_be_bytes())?;
        let layout = Layout {
            partitions,
            index: i as u16,
            replicas,
        };
        s.tree.insert(LAYOUT_KEY, codec::json(&layout))?;
        s.tree.flush()?;
        moved
            .journeys
            .push(s.tree.scan_prefix(JOURNEY).count() as u64);
    }
    drop(stores);
    for d in dirs {
        std::fs::remove_file(d.join(MARKER)).map_err(|e| io(d, e))?;
    }
    Ok(moved)
}

/// Playbooks and dedup marks, which every journey moved from `src` may need at `dst`.
fn copy_shared(src: &Store, dst: &Store) -> Result<(), StoreError> {
    let mut b = sled::Batch::default();
    for prefix in [PLAYBOOK, DEDUP] {
        for r in src.tree.scan_prefix(prefix) {
            let (k, v) = r?;
            b.insert(k, v);
        }
    }
    dst.tree.apply_batch(b)?;
    dst.tree.flush()?;
    Ok(())
}

/// The keys of one directory whose client is in their value, by client.
#[derive(Default)]
struct ClientIndex {
    inflight: HashMap<String, Vec<Vec<u8>>>,
    outbox: HashMap<String, Vec<u64>>,
}

impl ClientIndex {
    fn of(store: &Store) -> Result<Self, StoreError> {
        let mut ix = Self::default();
        for r in store.tree.scan_prefix(INFLIGHT) {
            let (k, v) = r?;
            ix.inflight
                .entry(String::from_utf8_lossy(&v).into_owned())
                .or_default()
                .push(k.to_vec());
        }
        for e in store.outbox()? {
            if let Some(c) = entry_client(&e) {
                ix.outbox.entry(c.to_string()).or_default().push(e.id);
            }
        }
        Ok(ix)
    }
}

/// Every key of `store` that belongs to `client`; its outbox entries too when `outbox`.
fn client_keys(
    store: &Store,
    client: &str,
    index: &ClientIndex,
    outbox: bool,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut keys = vec![
        key(JOURNEY, client.as_bytes()),
        key(CARD_DUE, client.as_bytes()),
    ];
    for prefix in [HISTORY, SNAPSHOT] {
        let mut p = key(prefix, client.as_bytes());
        p.push(0);
        for r in store.tree.scan_prefix(p) {
            keys.push(r?.0.to_vec());
        }
    }
    keys.extend(index.inflight.get(client).into_iter().flatten().cloned());
    if outbox {
        for id in index.outbox.get(client).into_iter().flatten() {
            keys.push(key(OUTBOX, &id.to_be_bytes()));
        }
    }
    Ok(keys)
}

/// The journey an outbox entry is about: a task request names it, events and replies
/// carry it in their client id header.
fn entry_client(e: &OutboxEntry) -> Option<&str> {
    match &e.purpose {
        Purpose::TaskRequest { client_id, .. } => Some(client_id),
        _ => e
            .message
            .headers
            .iter()
            .find(|(k, _)| k == crate::wire::headers::CLIENT_ID)
            .map(|(_, v)| v.as_str()),
    }
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        source: sled::Error::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Change;
    use serde_json::json;

    fn journey(partition: u16) -> serde_json::Value {
        json!({"partition": partition, "journey": {"x": 1}})
    }

    #[test]
    fn journeys_move_to_their_new_owner_with_their_history_and_nothing_is_doubled() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("r{i}"))).collect();
        // Two replicas of 6 partitions: replica 0 holds partitions 0, 2, 4.
        for (i, parts) in [(0usize, [0u16, 2, 4]), (1, [1, 3, 5])] {
            let s = Store::open(&dirs[i]).unwrap();
            let mut c = Change::new();
            for p in parts {
                let client = format!("c{p}");
                c.put_journey(&client, &journey(p));
                c.push_history(&client, s.next_id().unwrap(), &json!({"p": p}));
                c.put_inflight(&format!("corr-{p}"), &client);
                c.put_dedup(&format!("m{p}"), &json!({"at": 1}));
            }
            s.commit(c).unwrap();
            s.tree.flush().unwrap();
        }
        let mut seen = Vec::new();
        let moved = repartition(&dirs, 6, 3, |f, t, c| seen.push((f, t, c.to_string()))).unwrap();
        // Under 3 replicas partition p belongs to p % 3.
        for p in 0..6u16 {
            let owner = usize::from(p % 3);
            for (i, d) in dirs.iter().enumerate() {
                let s = Store::open(d).unwrap();
                let rec: Option<serde_json::Value> = s.journey(&format!("c{p}")).unwrap();
                let hist: Vec<serde_json::Value> = s.history(&format!("c{p}")).unwrap();
                if i == owner {
                    assert_eq!(rec, Some(journey(p)), "c{p} at {i}");
                    assert_eq!(hist, vec![json!({"p": p})]);
                    assert_eq!(
                        s.inflight(&format!("corr-{p}")).unwrap().as_deref(),
                        Some(format!("c{p}").as_str())
                    );
                } else {
                    assert!(rec.is_none() && hist.is_empty(), "c{p} also at {i}");
                }
            }
        }
        assert_eq!(moved.journeys, vec![2, 2, 2]);
        assert_eq!(moved.untagged, 0);
        assert_eq!(seen.len(), 4, "{seen:?}");
        // A moved journey's dedup marks went along; the marker files are gone.
        let s2 = Store::open(&dirs[2]).unwrap();
        assert!(s2.dedup::<serde_json::Value>("m2").unwrap().is_some());
        // Running it again changes nothing.
        drop(s2);
        let again = repartition(&dirs, 6, 3, |_, _, _| {}).unwrap();
        assert!(again.moves.is_empty());
        assert_eq!(again.journeys, vec![2, 2, 2]);
    }

    #[test]
    fn an_unfinished_run_leaves_directories_no_orchestrator_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("r0");
        Store::open(&d).unwrap();
        std::fs::write(d.join(MARKER), b"x").unwrap();
        let err = Store::open(&d).err().expect("refused");
        assert!(err.to_string().contains("repartition"), "{err}");
    }
}
