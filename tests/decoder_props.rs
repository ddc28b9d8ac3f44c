//! The decoder never panics, whatever arrives: the fast, always-run companion of the
//! `cargo fuzz` target in `fuzz/` (which runs for minutes, by hand: `scripts/fuzz`).
//! Arbitrary bytes, arbitrary JSON, and valid envelopes with arbitrary payloads, intents,
//! message types and tokens; every refusal carries a reason code.

use std::sync::LazyLock;

use chrono::Utc;
use journeyman::wire::auth::{self, Key, Keyring};
use journeyman::wire::protocol::{AgentRef, Decoder, Envelope, JOURNEY_INTENTS, MessageType};
use proptest::prelude::*;
use serde_json::{Map, Value};

static DECODER: LazyLock<Decoder> = LazyLock::new(|| Decoder::new(64 * 1024));
static KEYS: LazyLock<Keyring> = LazyLock::new(|| {
    Keyring::new(vec![
        Key::ed25519_private("k", [1; 32], "a").unwrap().public(),
        Key::hs256("s", vec![1; 32]).unwrap(),
    ])
    .unwrap()
});

/// Everything a consumer does with a body, asserting only "no panic, a reason on refusal".
fn decode_all(bytes: &[u8]) {
    match DECODER.envelope(bytes) {
        Err(e) => assert!(!e.reason_code().is_empty()),
        Ok(env) => {
            if let Err(e) = DECODER.command(&env) {
                assert!(!e.reason_code().is_empty());
            }
            if let Err(e) = DECODER.task_reply(&env) {
                assert!(!e.reason_code().is_empty());
            }
            if let Err(e) = auth::check_envelope(&KEYS, &env, Utc::now()) {
                assert!(!e.reason_code().is_empty());
                assert!(
                    env.security.auth_token.len() < 8
                        || !e.to_string().contains(&env.security.auth_token),
                    "the token is echoed in: {e}"
                );
            }
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("client_id"),
            Just("acme"),
            Just("completed"),
            Just("status")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("client_id".to_string()),
                    Just("context".to_string()),
                    Just("status".to_string()),
                    Just("output".to_string()),
                    Just("code".to_string()),
                    Just("message".to_string()),
                    Just("retryable".to_string()),
                    Just("reason".to_string()),
                    Just("metrics".to_string()),
                    "[a-z_.]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let intent = prop_oneof![
        prop::sample::select(JOURNEY_INTENTS.to_vec()).prop_map(str::to_string),
        "[a-z_.]{0,16}",
    ];
    let kind = prop::sample::select(vec![
        MessageType::Request,
        MessageType::Response,
        MessageType::Event,
        MessageType::Error,
    ]);
    let token = prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_.-]{0,64}",
        "[A-Za-z0-9_-]{1,20}\\.[A-Za-z0-9_-]{1,20}\\.[A-Za-z0-9_-]{1,44}",
    ];
    (intent, kind, json_value(), token, "[a-z-]{1,12}").prop_map(
        |(intent, kind, payload, token, agent)| {
            Envelope::new(
                AgentRef::new(agent, "props"),
                AgentRef::orchestrator(),
                kind,
                intent,
                payload,
                Utc::now(),
            )
            .with_auth_token(token)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        decode_all(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn arbitrary_envelopes_never_panic(env in envelope()) {
        decode_all(&env.to_bytes());
    }

    /// One byte changed, dropped or added in a valid message.
    #[test]
    fn mutated_envelopes_never_panic(env in envelope(), at in any::<prop::sample::Index>(), byte in any::<u8>(), op in 0..3u8) {
        let mut bytes = env.to_bytes();
        let i = at.index(bytes.len());
        match op {
            0 => bytes[i] = byte,
            1 => { bytes.remove(i); }
            _ => bytes.insert(i, byte),
        }
        decode_all(&bytes);
    }
}
