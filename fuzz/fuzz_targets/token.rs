//! Arbitrary text through the token verifier, as an attacker on the broker controls it:
//! `auth::verify` (jsonwebtoken under our policy) and the redaction every surface applies.
//! None may panic; every refusal has a reason code and never echoes the token.
#![no_main]

use std::sync::LazyLock;

use chrono::{TimeZone, Utc};
use journeyman::wire::auth::{self, Key, Keyring};
use journeyman::wire::redact;
use libfuzzer_sys::fuzz_target;

/// An Ed25519 public key, a fleet key and a shared secret: every verification path.
static KEYS: LazyLock<Keyring> = LazyLock::new(|| {
    Keyring::new(vec![
        Key::ed25519_private("k1", [1; 32], "a").expect("key").public(),
        Key::ed25519_private("fleet", [2; 32], "agents-*")
            .expect("key")
            .with_roles(vec!["operator".into()])
            .public(),
        Key::hs256("hs", vec![3; 32]).expect("key"),
    ])
    .expect("keys")
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // A fixed time, so that a crash replays the same.
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    match auth::verify(&KEYS, token, now) {
        Ok(claims) => assert!(!claims.sub.is_empty() || claims.sub.is_empty()),
        Err(e) => {
            assert!(!e.reason_code().is_empty());
            if token.len() >= 16 {
                assert!(!e.to_string().contains(token), "the token is echoed: {e}");
            }
        }
    }
    let _ = auth::unverified_subject(token);
    let shown = redact::redact_text(token);
    assert!(!shown.is_empty() || token.is_empty());
});
