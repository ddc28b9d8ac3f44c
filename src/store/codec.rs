//! How values are laid out in sled, and how each layout is told apart from the others.
//!
//! Format 1 wrote every value as JSON. Format 2 writes journey records and rollback
//! snapshots (the values rewritten on every input, and the biggest) as a tag byte and
//! LZ4-compressed JSON: about a third of the bytes, so sled's log carries a third of the
//! garbage per rewrite. Small values (history lines, dedup marks) stay plain JSON, where
//! compression would gain little. JSON values never start with the tag byte, so a reader
//! takes either layout and a half-migrated store reads the same as a migrated one.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// First byte of an LZ4-compressed JSON value (not a byte any JSON text starts with).
pub(super) const LZ4_JSON: u8 = 0x01;

/// A value as plain JSON.
pub(super) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain data types to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// A value as compressed JSON, tagged.
pub(super) fn packed<T: Serialize>(v: &T) -> Vec<u8> {
    let raw = json(v);
    let mut out = Vec::with_capacity(1 + 4 + raw.len() / 2);
    out.push(LZ4_JSON);
    out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&raw));
    out
}

/// Whether a value is in format 2's packed layout.
pub(super) fn is_packed(raw: &[u8]) -> bool {
    raw.first() == Some(&LZ4_JSON)
}

/// Reads a value in either layout.
pub(super) fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    if is_packed(raw) {
        let json = lz4_flex::block::decompress_size_prepended(&raw[1..])
            .map_err(|e| format!("compressed value: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(raw).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_read_back_and_packing_shrinks_records() {
        let v = serde_json::json!({
            "journey": {"client_id": "acme", "stage": "sandbox", "completed_stages": []},
            "work": {"tasks": (0..4).map(|i| serde_json::json!({
                "task_id": format!("task-{i}"), "intent": "provision_sandbox_environment",
                "status": "completed", "attempts": 1,
                "correlation_id": format!("acme/00000000-0000-4000-8000-00000000000{i}"),
            })).collect::<Vec<_>>()},
        });
        let plain = json(&v);
        let small = packed(&v);
        assert!(!is_packed(&plain) && is_packed(&small));
        assert!(
            small.len() * 2 < plain.len(),
            "{} vs {}",
            small.len(),
            plain.len()
        );
        assert_eq!(decode::<serde_json::Value>(&plain).unwrap(), v);
        assert_eq!(decode::<serde_json::Value>(&small).unwrap(), v);
        assert!(decode::<serde_json::Value>(&[LZ4_JSON, 9, 9]).is_err());
    }
}
