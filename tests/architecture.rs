//! The floors of `src/`, checked by reading the sources: the pure floors stay pure, and
//! every `use crate::...` points down, never up.

use std::path::{Path, PathBuf};

/// Lowest first; a floor may use the floors before it in this list, never after.
const FLOORS: [&[&str]; 5] = [
    &["domain"],
    &["wire"],
    &["store", "broker", "telemetry"],
    &["orchestrator", "agent"],
    &["http", "ops"],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (a doc comment may name what it avoids) and
/// without its unit tests (which may borrow fixtures from any floor).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    without_comments(text)
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn domain_is_pure() {
    // Crates that do I/O, and the calls that read the clock or a random generator.
    let forbidden = [
        "tokio",
        "lapin",
        "sled",
        "axum",
        "reqwest",
        "hyper",
        "deadpool",
        "Utc::now",
        "Local::now",
        "SystemTime",
        "Instant::now",
        "rand::",
        "thread_rng",
        "new_v4",
        "std::fs",
        "std::net",
        "std::env",
    ];
    let mut found = Vec::new();
    for path in sources(&src().join("domain")) {
        // Unit tests included: tests of pure code use fixed times and seeds too.
        let code = without_comments(&std::fs::read_to_string(&path).unwrap());
        for word in forbidden {
            if code.contains(word) {
                found.push(format!("{}: {word}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "src/domain must stay pure: {found:#?}");
}

#[test]
fn wire_does_no_broker_or_store_io() {
    let forbidden = ["tokio", "lapin", "sled", "axum", "reqwest", "hyper"];
    let mut found = Vec::new();
    for path in sources(&src().join("wire")) {
        let code = code(&path);
        for word in forbidden {
            if code.contains(word) {
                found.push(format!("{}: {word}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "src/wire must stay pure: {found:#?}");
}

#[test]
fn every_import_points_down_the_floors() {
    let mut up = Vec::new();
    for path in sources(&src()) {
        let rel = path.strip_prefix(src()).unwrap();
        let Some(own) = rel.iter().next().and_then(|c| c.to_str()) else {
            continue;
        };
        let Some(own_floor) = floor_of(own.trim_end_matches(".rs")) else {
            continue;
        };
        let code = code(&path);
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let module: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(floor) = floor_of(&module)
                && floor > own_floor
            {
                up.push(format!("{} uses crate::{module}", rel.display()));
            }
        }
    }
    up.sort();
    up.dedup();
    assert!(up.is_empty(), "imports that run up a floor: {up:#?}");
}
