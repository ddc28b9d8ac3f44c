//! Stores written by earlier formats open without loss. The fixture is a data directory
//! written by the format 1 binary: 12 journeys a demo ran to production (with retries,
//! gate refusals and automatic rollbacks) and 3 journeys left mid-sandbox, a task each in
//! flight, when the orchestrator was stopped.

use std::path::Path;
use std::process::Command;

use journeyman::domain::record::{HistoryEntry, JourneyRecord, Snapshot};
use journeyman::domain::work::TaskStatus;
use journeyman::store::Store;

fn unpack(into: &Path) -> std::path::PathBuf {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-format-1.tar.gz");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar runs");
    assert!(status.success(), "cannot unpack {}", fixture.display());
    into.join("fx-v1")
}

#[test]
fn a_format_1_store_is_migrated_when_opened_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack(tmp.path());
    let store = Store::open(&dir).expect("a format 1 store opens");

    let census = store.census().unwrap();
    assert_eq!(census.journeys.0, 15, "{census:?}");
    assert_eq!(census.history.0, 351, "{census:?}");
    assert_eq!(census.snapshots.0, 4, "{census:?}");
    assert_eq!(census.dedup_marks.0, 36, "{census:?}");
    // Packed records take fewer bytes than format 1 did (37,870).
    assert!(census.journeys.1 < 37_870 * 2 / 3, "{census:?}");

    let mut journeys: Vec<JourneyRecord> = store.journeys().map(Result::unwrap).collect();
    journeys.sort_by(|a, b| a.journey.client_id.cmp(&b.journey.client_id));
    let live = journeys.iter().filter(|r| r.status() == "live").count();
    assert_eq!(live, 12);
    let running: Vec<&JourneyRecord> = journeys
        .iter()
        .filter(|r| r.status() == "running")
        .collect();
    assert_eq!(running.len(), 3);
    for r in &running {
        let w = r.work.as_ref().unwrap();
        let t = w.task("provision-infra").unwrap();
        assert_eq!(t.status, TaskStatus::Dispatched, "{}", r.journey.client_id);
        assert!(t.correlation_id.is_some() && t.deadline.is_some());
    }
    for r in &journeys {
        let h: Vec<HistoryEntry> = store.history(&r.journey.client_id).unwrap();
        assert_eq!(h.first().map(|e| e.kind.as_str()), Some("started"));
    }
    let snaps: usize = journeys
        .iter()
        .map(|r| {
            store
                .snapshots::<Snapshot>(&r.journey.client_id)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(snaps, 4);
}

#[test]
fn a_store_of_an_unknown_format_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    {
        let db = sled::open(&dir).unwrap();
        let tree = db.open_tree("journeyman").unwrap();
        tree.insert("meta/format", "journeyman-store-9").unwrap();
        tree.flush().unwrap();
    }
    // sled's lock is released with the process's handle; a child process opens it.
    let out = Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(["store", "stats", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("journeyman-store-9") && err.contains("newer journeyman"),
        "{err}"
    );
}
