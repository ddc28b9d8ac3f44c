//! Arbitrary bytes through the one decoder every consumed message goes through: the
//! envelope, then both payload decoders, then the token check. None may panic, and each
//! refusal must carry a reason code.
#![no_main]

use std::sync::{Arc, LazyLock};

use chrono::Utc;
use journeyman::wire::auth::{self, Key, Keyring};
use journeyman::wire::protocol::Decoder;
use libfuzzer_sys::fuzz_target;

/// Compiling the schemas is slow: once per process, not per input.
static DECODER: LazyLock<Decoder> = LazyLock::new(|| Decoder::new(64 * 1024));
static KEYS: LazyLock<Arc<Keyring>> = LazyLock::new(|| {
    let ed = Key::ed25519_private("fuzz", [1; 32], "a").expect("a valid key");
    let shared = Key::hs256("fuzz-hs", vec![1; 32]).expect("a valid key");
    Arc::new(Keyring::new(vec![ed.public(), shared]).expect("two keys"))
});

fuzz_target!(|data: &[u8]| {
    let d = &*DECODER;
    match d.envelope(data) {
        Err(e) => assert!(!e.reason_code().is_empty()),
        Ok(env) => {
            if let Err(e) = d.command(&env) {
                assert!(!e.reason_code().is_empty());
            }
            if let Err(e) = d.task_reply(&env) {
                assert!(!e.reason_code().is_empty());
            }
            if let Err(e) = auth::check_envelope(&KEYS, &env, Utc::now()) {
                assert!(!e.reason_code().is_empty());
            }
        }
    }
    // The token verifier on its own, over the raw bytes as a token.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = auth::verify(&KEYS, text, Utc::now());
    }
});
