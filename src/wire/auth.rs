//! Authentication and authorisation of protocol messages: signed tokens in
//! `security.auth_token`, the registry of keys that sign and verify them, and the
//! allow-list of which agents may send which journey commands.
//!
//! Tokens are JWTs in compact form, made and checked by the `jsonwebtoken` crate; only the
//! policy is written here. Each sender has its own Ed25519 key pair (`alg: EdDSA`): the
//! orchestrator signs task requests with its private key and agents verify them with its
//! public key, so an agent that is compromised cannot mint a task request, nor a command
//! with more rights than its own key has. Header `{"alg":"EdDSA","typ":"JWT","kid":...}`,
//! claims `{sub, iat, exp, nbf?, roles?}` where `sub` is the sending agent's id.
//!
//! The registry maps a key id to its public key, the one subject it may sign for and the
//! roles it grants. **Roles come from the registry, never from the token**: a token that
//! claims a role its key does not grant is refused as `forbidden`. Shared HS256 secrets
//! remain for a single-tenant laptop; the surfaces refuse them unless asked to allow them.
//!
//! A token authenticates the *sender*, not the body: it is a bearer credential, so the
//! transport must be TLS where the network is not trusted.
//!
//! The module is pure (time comes in as `now`): no broker, no store, no clock. Callers
//! decide what a refusal means; every [`AuthError`] has a dead-letter reason code
//! (`unauthenticated` or `forbidden`) and a message that never echoes the token or a key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeZone, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::wire::protocol::{AgentRef, Envelope, ProtocolError};

/// Clock skew tolerated between the minting and the verifying machine.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Shortest shared secret accepted: HMAC-SHA256 keys below 128 bits are guessable offline.
pub const MIN_SECRET_BYTES: usize = 16;
/// Bytes of an Ed25519 seed and of its public key.
const ED25519_BYTES: usize = 32;
/// Tokens longer than this are refused unparsed (the envelope schema's limit too); ours
/// are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Environment variable holding keys inline (key-file lines, `;`-separated).
pub const KEYS_ENV: &str = "JOURNEYMAN_AUTH_KEYS";
/// Environment variable naming the key registry file.
pub const KEYS_FILE_ENV: &str = "JOURNEYMAN_AUTH_KEYS_FILE";
/// Environment variable naming this process's private key file.
pub const PRIVATE_KEY_FILE_ENV: &str = "JOURNEYMAN_AUTH_PRIVATE_KEY_FILE";
/// Environment variable holding this process's private key inline (key-file lines,
/// `;`-separated), when there is no private key file: what a Kubernetes secret gives.
pub const PRIVATE_KEY_ENV: &str = "JOURNEYMAN_AUTH_PRIVATE_KEY";
/// Environment variable that lets shared HS256 secrets in (off by default).
pub const ALLOW_HS256_ENV: &str = "JOURNEYMAN_AUTH_ALLOW_HS256";
/// The role that may cancel journeys in the default policy.
pub const OPERATOR: &str = "operator";
/// The role a key needs (besides being bound to the orchestrator's own subject) to send
/// task requests.
pub const ORCHESTRATOR_ROLE: &str = "orchestrator";

/// The DER prefix of a PKCS#8 v1 Ed25519 private key (RFC 8410): the 32-byte seed follows.
/// `jsonwebtoken` signs with PKCS#8 DER; writing the prefix here spares a DER encoder.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Secret bytes. Debug and Display are redacted, so a key or a config struct that holds
/// one can be logged without leaking it; the bytes are only reachable inside this module.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted {} bytes>)", self.0.len())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a key is made of: which algorithm it speaks, and whether it can sign.
#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// An Ed25519 key pair: signs and verifies. Only its owner holds one.
    Ed25519Private {
        seed: Secret,
        public: [u8; ED25519_BYTES],
    },
    /// The public half only: verifies. What the registry holds for every other sender.
    Ed25519Public([u8; ED25519_BYTES]),
    /// A shared HMAC secret: whoever verifies can also sign, hence off by default.
    Hs256(Secret),
}

/// One key of the registry: an id (the token header's `kid`), its material, the one
/// subject it may sign for (required for Ed25519 keys), and the roles it grants.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    kid: String,
    material: Material,
    subject: Option<String>,
    roles: Vec<String>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg_name())
            .field("private", &self.can_sign())
            .field("subject", &self.subject)
            .field("roles", &self.roles)
            .finish()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key '{}'", self.kid)
    }
}

impl Key {
    /// A shared HS256 secret (the legacy scheme; see [`ALLOW_HS256_ENV`]).
    pub fn hs256(kid: impl Into<String>, secret: Vec<u8>) -> Result<Self, KeyError> {
        let kid = kid.into();
        check_kid(&kid)?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret {
                kid,
                len: secret.len(),
            });
        }
        Ok(Self {
            kid,
            material: Material::Hs256(Secret(secret)),
            subject: None,
            roles: Vec::new(),
        })
    }

    /// An Ed25519 key pair from its 32-byte seed, bound to `subject`.
    pub fn ed25519_private(
        kid: impl Into<String>,
        seed: [u8; ED25519_BYTES],
        subject: impl Into<String>,
    ) -> Result<Self, KeyError> {
        let kid = kid.into();
        check_kid(&kid)?;
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        Ok(Self {
            kid,
            material: Material::Ed25519Private {
                seed: Secret(seed.to_vec()),
                public,
            },
            subject: Some(check_subject(subject.into())?),
            roles: Vec::new(),
        })
    }

    /// The public half of an Ed25519 key, bound to `subject`. A point not on the curve is
    /// refused here, not at the first token.
    pub fn ed25519_public(
        kid: impl Into<String>,
        public: [u8; ED25519_BYTES],
        subject: impl Into<String>,
    ) -> Result<Self, KeyError> {
        let kid = kid.into();
        check_kid(&kid)?;
        if ed25519_dalek::VerifyingKey::from_bytes(&public).is_err() {
            return Err(KeyError::BadPublicKey(kid));
        }
        Ok(Self {
            kid,
            material: Material::Ed25519Public(public),
            subject: Some(check_subject(subject.into())?),
            roles: Vec::new(),
        })
    }

    /// A new Ed25519 key pair for `subject` (seed from the OS-seeded generator).
    pub fn generate(kid: impl Into<String>, subject: impl Into<String>) -> Result<Self, KeyError> {
        let mut seed = [0u8; ED25519_BYTES];
        rand::fill(&mut seed[..]);
        Self::ed25519_private(kid, seed, subject)
    }

    /// Binds the key to one agent: it verifies only tokens whose subject is `agent_id`.
    pub fn for_subject(mut self, agent_id: impl Into<String>) -> Self {
        self.subject = Some(agent_id.into());
        self
    }

    /// The roles the key grants (the registry's word; tokens cannot add to it).
    pub fn with_roles(mut self, roles: Vec<String>) -> Self {
        self.roles = roles;
        self
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// Whether tokens of this key may name `agent` as their subject: the subject it is
    /// bound to, or, for a fleet key bound to `prefix*`, any agent id with that prefix
    /// (replicas named after their pods). An unbound shared secret may name anyone.
    pub fn may_sign_as(&self, agent: &str) -> bool {
        match self.subject.as_deref() {
            None => true,
            Some(s) => match s.strip_suffix('*') {
                Some(prefix) => agent.starts_with(prefix) && agent.len() > prefix.len(),
                None => s == agent,
            },
        }
    }

    /// Whether this key can make tokens (a private Ed25519 key or a shared secret).
    pub fn can_sign(&self) -> bool {
        !matches!(self.material, Material::Ed25519Public(_))
    }

    pub fn is_hs256(&self) -> bool {
        matches!(self.material, Material::Hs256(_))
    }

    /// The key as the registry of the others holds it: the public half of a key pair
    /// (a shared secret has none, so it stays itself).
    pub fn public(&self) -> Key {
        let mut k = self.clone();
        if let Material::Ed25519Private { public, .. } = &self.material {
            k.material = Material::Ed25519Public(*public);
        }
        k
    }

    fn alg(&self) -> Algorithm {
        match self.material {
            Material::Hs256(_) => Algorithm::HS256,
            _ => Algorithm::EdDSA,
        }
    }

    fn alg_name(&self) -> &'static str {
        match self.material {
            Material::Hs256(_) => "HS256",
            _ => "EdDSA",
        }
    }

    /// The key as a key-file line. For a private key or a shared secret this prints the
    /// secret: it is for `journeyman token keygen` writing a 0600 file, nothing else.
    pub fn expose_line(&self) -> String {
        let material = match &self.material {
            Material::Ed25519Private { seed, .. } => {
                format!("ed25519-private:{}", URL_SAFE_NO_PAD.encode(&seed.0))
            }
            Material::Ed25519Public(p) => format!("ed25519:{}", URL_SAFE_NO_PAD.encode(p)),
            Material::Hs256(s) => STANDARD.encode(&s.0),
        };
        self.line(material)
    }

    /// The registry line of this key: its public half, safe to print and to share.
    /// `None` for a shared secret, which has no public half.
    pub fn public_line(&self) -> Option<String> {
        match &self.public().material {
            Material::Ed25519Public(p) => {
                Some(self.line(format!("ed25519:{}", URL_SAFE_NO_PAD.encode(p))))
            }
            _ => None,
        }
    }

    fn line(&self, material: String) -> String {
        let mut line = format!("{}={material}", self.kid);
        if let Some(s) = &self.subject {
            line.push_str(" sub=");
            line.push_str(s);
        }
        if !self.roles.is_empty() {
            line.push_str(" roles=");
            line.push_str(&self.roles.join(","));
        }
        line
    }

    fn encoding_key(&self) -> Result<EncodingKey, KeyError> {
        match &self.material {
            Material::Ed25519Private { seed, .. } => {
                let mut der = PKCS8_ED25519_PREFIX.to_vec();
                der.extend_from_slice(&seed.0);
                Ok(EncodingKey::from_ed_der(&der))
            }
            Material::Hs256(s) => {
                EncodingKey::from_secret(&s.0).map_err(|_| KeyError::CannotSign(self.kid.clone()))
            }
            Material::Ed25519Public(_) => Err(KeyError::CannotSign(self.kid.clone())),
        }
    }

    fn decoding_key(&self) -> Result<DecodingKey, AuthError> {
        match &self.material {
            Material::Ed25519Private { public, .. } | Material::Ed25519Public(public) => {
                Ok(DecodingKey::from_ed_der(public))
            }
            Material::Hs256(s) => DecodingKey::from_secret(&s.0)
                .map_err(|_| AuthError::Malformed("the shared secret is unusable".into())),
        }
    }
}

fn check_kid(kid: &str) -> Result<(), KeyError> {
    let ok = !kid.is_empty()
        && kid.len() <= 64
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadKid(clip(kid)))
    }
}

fn check_subject(sub: String) -> Result<String, KeyError> {
    // `*` only as the end of a prefix of at least one character: a key for everyone
    // would be a shared key again.
    let star_ok = match sub.find('*') {
        None => true,
        Some(i) => i > 0 && i == sub.len() - 1,
    };
    if !star_ok || sub.is_empty() || sub.len() > 128 || sub.chars().any(|c| c.is_whitespace()) {
        Err(KeyError::BadSubject(clip(&sub)))
    } else {
        Ok(sub)
    }
}

/// The keys a worker knows: its own private key(s) and everyone's public keys. The first
/// key that can sign signs; any verifies a token whose `kid` names it, so rotation is: add
/// the new public key to every registry, then give the sender the new private key (first),
/// then drop the old public key.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("kids", &self.kids())
            .finish()
    }
}

impl Keyring {
    /// At least one key, ids unique.
    pub fn new(keys: Vec<Key>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        let mut seen = BTreeSet::new();
        for k in &keys {
            if !seen.insert(k.kid.as_str()) {
                return Err(KeyError::DuplicateKid(k.kid.clone()));
            }
        }
        Ok(Self { keys })
    }

    /// Parses key-file entries, one per line or `;`-separated, `#` comments and blank
    /// lines allowed: `kid=MATERIAL [sub=AGENT] [roles=a,b]` where MATERIAL is
    /// `ed25519:<base64url public key>`, `ed25519-private:<base64url seed>` or a shared
    /// secret (`hs256:<base64>` or bare base64, the legacy form).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("");
            for entry in line.split(';') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                keys.push(parse_entry(entry).map_err(|reason| KeyError::BadEntry {
                    line: n + 1,
                    reason,
                })?);
            }
        }
        Self::new(keys)
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Self::parse(&text).map_err(|e| match e {
            KeyError::NoKeys => KeyError::EmptyFile(path.display().to_string()),
            other => other,
        })
    }

    /// The registry from a file if one is named, else from inline keys, joined with the
    /// private key (a file if named, else inline); `None` when nothing is configured.
    /// (`inline` and `private_inline` are the values of [`KEYS_ENV`] and
    /// [`PRIVATE_KEY_ENV`]; the caller reads the environment.)
    pub fn from_sources(
        file: Option<&Path>,
        inline: Option<&str>,
        private: Option<&Path>,
        private_inline: Option<&str>,
    ) -> Result<Option<Self>, KeyError> {
        let either = |file: Option<&Path>, inline: Option<&str>| match (file, inline) {
            (Some(p), _) => Self::from_file(p).map(Some),
            (None, Some(text)) if !text.trim().is_empty() => Self::parse(text).map(Some),
            _ => Ok(None),
        };
        let registry = either(file, inline)?;
        let private = either(private, private_inline)?;
        match (private, registry) {
            (Some(own), Some(reg)) => own.with_registry(reg).map(Some),
            (own, reg) => Ok(own.or(reg)),
        }
    }

    /// This worker's own keys (first, so they sign) joined with a registry. Where both
    /// name a key id, the registry's subject and roles win (the registry is what the
    /// others believe), and the public keys must be the same.
    pub fn with_registry(self, registry: Keyring) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for mut own in self.keys {
            if let Some(reg) = registry.get(&own.kid) {
                if reg.public().material != own.public().material || reg.subject != own.subject {
                    return Err(KeyError::Mismatch(own.kid.clone()));
                }
                own.roles = reg.roles.clone();
            }
            keys.push(own);
        }
        for reg in registry.keys {
            if !keys.iter().any(|k| k.kid == reg.kid) {
                keys.push(reg);
            }
        }
        Self::new(keys)
    }

    /// The keys of one sender: its own key first (it signs), then the public halves of
    /// the others it must verify. What the demo, the bench and the tests give each worker.
    pub fn own_and_public(own: &Key, others: &[&Key]) -> Result<Self, KeyError> {
        let mut keys = vec![own.clone()];
        keys.extend(others.iter().map(|k| k.public()));
        Self::new(keys)
    }

    /// The keyring as key-file text (`;`-separated, for [`KEYS_ENV`]). This prints the
    /// private keys it holds: for handing a child process its own keys, nothing else.
    pub fn expose_inline(&self) -> String {
        self.keys
            .iter()
            .map(Key::expose_line)
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The key that signs: the first that can (a private key or a shared secret).
    pub fn signing_key(&self) -> Option<&Key> {
        self.keys.iter().find(|k| k.can_sign())
    }

    /// The key that signs, or an error saying what to configure.
    pub fn require_signing_key(&self) -> Result<&Key, KeyError> {
        self.signing_key().ok_or(KeyError::NoPrivateKey)
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Whether a shared HS256 secret is among the keys (the surfaces refuse that unless
    /// allowed, and warn when it is).
    pub fn has_hs256(&self) -> bool {
        self.keys.iter().any(Key::is_hs256)
    }

    /// The registry as the others should hold it: public halves only, shared secrets
    /// left out (they cannot be shared safely).
    pub fn public_lines(&self) -> Vec<String> {
        self.keys.iter().filter_map(Key::public_line).collect()
    }
}

impl Key {
    fn for_subject_opt(mut self, subject: Option<String>) -> Self {
        self.subject = subject;
        self
    }
}

fn decode_32(kid: &str, what: &str, text: &str) -> Result<[u8; ED25519_BYTES], String> {
    let bytes = decode_b64(text).ok_or_else(|| {
        format!(
            "the {what} of key '{}' is not base64url ({} characters)",
            clip(kid),
            text.len()
        )
    })?;
    <[u8; ED25519_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "the {what} of key '{}' has {} bytes, not {ED25519_BYTES}",
            clip(kid),
            bytes.len()
        )
    })
}

fn decode_b64(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(text)
        .or_else(|_| URL_SAFE.decode(text))
        .or_else(|_| STANDARD.decode(text))
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

fn parse_entry(entry: &str) -> Result<Key, String> {
    let (kid, rest) = entry
        .split_once('=')
        .ok_or_else(|| "expected kid=MATERIAL [sub=AGENT] [roles=a,b]".to_string())?;
    let kid = kid.trim();
    let mut parts = rest.split_whitespace();
    let material = parts.next().unwrap_or("");
    let mut subject = None;
    let mut roles = Vec::new();
    for opt in parts {
        match opt.split_once('=') {
            Some(("sub", agent)) if !agent.is_empty() => subject = Some(agent.to_string()),
            Some(("roles", list)) => {
                roles = list
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            _ => {
                return Err(format!(
                    "unknown option '{}' after key '{}' (only sub=AGENT and roles=a,b)",
                    clip(opt),
                    clip(kid)
                ));
            }
        }
    }
    let need_sub = || {
        subject.clone().ok_or_else(|| {
            format!(
                "Ed25519 key '{}' has no sub=AGENT: every key pair belongs to one sender",
                clip(kid)
            )
        })
    };
    // Never put key material in a message: only its length.
    let key = if let Some(public) = material.strip_prefix("ed25519:") {
        Key::ed25519_public(kid, decode_32(kid, "public key", public)?, need_sub()?)
    } else if let Some(seed) = material.strip_prefix("ed25519-private:") {
        Key::ed25519_private(kid, decode_32(kid, "private key", seed)?, need_sub()?)
    } else {
        let secret = material.strip_prefix("hs256:").unwrap_or(material);
        let bytes = decode_b64(secret).ok_or_else(|| {
            format!(
                "the secret of key '{}' is not base64 ({} characters)",
                clip(kid),
                secret.len()
            )
        })?;
        Key::hs256(kid, bytes).map(|k| k.for_subject_opt(subject.clone()))
    }
    .map_err(|e| e.to_string())?;
    Ok(key.with_roles(roles))
}

/// Why keys could not be loaded. Messages name files, lines and key ids, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no authentication key configured: give --auth-keys-file or set {KEYS_FILE_ENV} or {KEYS_ENV} (create a key pair with `journeyman token keygen`)"
    )]
    NoKeys,
    #[error(
        "no private key to sign with: give --auth-private-key-file (or {PRIVATE_KEY_FILE_ENV}) with this sender's key from `journeyman token keygen`"
    )]
    NoPrivateKey,
    #[error("key '{0}' is a public key and cannot sign: sign with the sender's private key")]
    CannotSign(String),
    #[error("the key file {0} holds no key (expected lines kid=ed25519:... sub=AGENT)")]
    EmptyFile(String),
    #[error("cannot read the key file {path}: {error}")]
    Io { path: String, error: String },
    #[error("key entry {line}: {reason}")]
    BadEntry { line: usize, reason: String },
    #[error("key id '{0}' is invalid: use 1-64 letters, digits, '-', '_' or '.'")]
    BadKid(String),
    #[error(
        "subject '{0}' is invalid: use 1-128 characters without spaces (a fleet key may end in '*' after a prefix)"
    )]
    BadSubject(String),
    #[error("the public key of key '{0}' is not an Ed25519 point")]
    BadPublicKey(String),
    #[error("key '{kid}' has a {len}-byte secret; at least {MIN_SECRET_BYTES} bytes are needed")]
    ShortSecret { kid: String, len: usize },
    #[error("key id '{0}' appears twice")]
    DuplicateKid(String),
    #[error(
        "the private key '{0}' does not match the registry's key of that id (another key, or another subject): fix the registry or the key file"
    )]
    Mismatch(String),
}

/// What a verified token says. After [`verify`], `roles` are the roles the key grants
/// (from the registry), not what the token claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The agent id of the sender; must equal the envelope's `source_agent.agent_id`.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Not before, Unix seconds (optional, as in JWT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Roles for the allow-list, e.g. `operator`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn expires_at(&self) -> DateTime<Utc> {
        at(self.exp)
    }
}

/// Why a message was not authenticated (or not authorised). No variant carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no auth token: security.auth_token is empty")]
    Missing,
    #[error("the auth token is malformed: {0}")]
    Malformed(String),
    #[error("the auth token's algorithm '{0}' is not accepted (EdDSA, or HS256 for a shared key)")]
    UnsupportedAlg(String),
    #[error("the auth token names unknown key id '{0}'")]
    UnknownKeyId(String),
    #[error("bad signature: the auth token was not signed by the key it names")]
    BadSignature,
    #[error("key '{kid}' is for agent '{allowed}', not for '{subject}'")]
    KeyNotForSubject {
        kid: String,
        allowed: String,
        subject: String,
    },
    #[error("the auth token expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("the auth token is not valid before {0}")]
    NotYetValid(DateTime<Utc>),
    #[error("source_agent '{source_agent}' does not match the token's subject '{subject}'")]
    SubjectMismatch {
        subject: String,
        source_agent: String,
    },
    #[error("the auth token claims role '{role}', which key '{kid}' does not grant")]
    RoleNotGranted { kid: String, role: String },
    #[error("agent '{agent}' is not allowed to send {intent}")]
    Forbidden { agent: String, intent: String },
}

impl AuthError {
    /// The dead-letter reason: `forbidden` for rights the sender lacks (the allow-list, a
    /// role its key does not grant), `unauthenticated` otherwise.
    pub fn reason_code(&self) -> &'static str {
        if self.is_forbidden() {
            "forbidden"
        } else {
            "unauthenticated"
        }
    }

    fn is_forbidden(&self) -> bool {
        matches!(
            self,
            AuthError::Forbidden { .. } | AuthError::RoleNotGranted { .. }
        )
    }
}

impl From<AuthError> for ProtocolError {
    fn from(e: AuthError) -> Self {
        if e.is_forbidden() {
            ProtocolError::Forbidden(e.to_string())
        } else {
            ProtocolError::Unauthenticated(e.to_string())
        }
    }
}

/// Attacker-controlled text (a kid, an alg) put in an error: bounded and printable.
fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Mints a token for `agent_id` signed with `key`, valid from `now` for `ttl`. `roles`
/// are what the token claims; the verifier grants only what its registry says the key
/// grants, and refuses a claim beyond that.
pub fn mint(
    key: &Key,
    agent_id: &str,
    roles: &[String],
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<String, KeyError> {
    let iat = now.timestamp();
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims {
        sub: agent_id.to_string(),
        iat,
        exp: iat.saturating_add(ttl),
        nbf: None,
        roles: roles.to_vec(),
    };
    let mut header = jsonwebtoken::Header::new(key.alg());
    header.kid = Some(key.kid.clone());
    let encoding = key.encoding_key()?;
    jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| KeyError::BadEntry {
        line: 0,
        reason: format!("key '{}' cannot sign: {e}", key.kid),
    })
}

fn from_jwt(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::UnsupportedAlg("?".into())
        }
        // serde's message says where the JSON is wrong, not what it holds.
        ErrorKind::Json(j) => AuthError::Malformed(format!("not the expected JSON ({j})")),
        ErrorKind::Base64(_) => AuthError::Malformed("a part is not base64url".into()),
        ErrorKind::Utf8(_) => AuthError::Malformed("a part is not UTF-8".into()),
        ErrorKind::InvalidToken => {
            AuthError::Malformed("expected three base64url parts separated by '.'".into())
        }
        other => AuthError::Malformed(clip(&format!("{other:?}"))),
    }
}

/// Verifies a token: its `kid` names a key of the registry, its `alg` is that key's
/// (the key decides the algorithm, never the token), `jsonwebtoken` checks the signature,
/// then the subject the key is bound to, the validity window with [`LEEWAY`] and the roles.
pub fn verify(keyring: &Keyring, token: &str, now: DateTime<Utc>) -> Result<Claims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed(format!(
            "{} bytes, over the {MAX_TOKEN_BYTES}-byte limit",
            token.len()
        )));
    }
    if token.split('.').count() != 3 {
        return Err(AuthError::Malformed(
            "expected three base64url parts separated by '.'".into(),
        ));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        // An algorithm jsonwebtoken does not know (`none`, ...) fails the header parse.
        ErrorKind::Json(_) => AuthError::UnsupportedAlg(header_alg(token)),
        _ => from_jwt(e),
    })?;
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| AuthError::Malformed("the header names no key id (kid)".into()))?;
    let key = keyring
        .get(kid)
        .ok_or_else(|| AuthError::UnknownKeyId(clip(kid)))?;
    if header.alg != key.alg() {
        return Err(AuthError::UnsupportedAlg(format!("{:?}", header.alg)));
    }
    let mut validation = Validation::new(key.alg());
    // Time is checked below against the caller's `now`, keeping this module clock-free.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut claims = jsonwebtoken::decode::<Claims>(token, &key.decoding_key()?, &validation)
        .map_err(from_jwt)?
        .claims;
    if !key.may_sign_as(&claims.sub) {
        return Err(AuthError::KeyNotForSubject {
            kid: key.kid.clone(),
            allowed: key.subject.clone().unwrap_or_default(),
            subject: clip(&claims.sub),
        });
    }
    let leeway = LEEWAY.as_secs() as i64;
    let t = now.timestamp();
    if claims.exp.saturating_add(leeway) < t {
        return Err(AuthError::Expired(at(claims.exp)));
    }
    let from = claims.nbf.unwrap_or(claims.iat).max(claims.iat);
    if from.saturating_sub(leeway) > t {
        return Err(AuthError::NotYetValid(at(from)));
    }
    if let Some(role) = claims.roles.iter().find(|r| !key.roles.contains(r)) {
        return Err(AuthError::RoleNotGranted {
            kid: key.kid.clone(),
            role: clip(role),
        });
    }
    claims.roles = key.roles.clone();
    Ok(claims)
}

/// The `alg` of a header jsonwebtoken would not parse, for the error message (clipped).
fn header_alg(token: &str) -> String {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: Option<serde_json::Value>,
    }
    let h = token.split('.').next().unwrap_or("");
    URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<AlgOnly>(&b).ok())
        .and_then(|a| a.alg)
        .map(|v| clip(v.as_str().unwrap_or("?")))
        .unwrap_or_else(|| "?".into())
}

/// Reads a token's subject without verifying it: only for choosing the `source_agent` to
/// send with a token given on the command line. Never trust the result.
pub fn unverified_subject(token: &str) -> Option<String> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token)
        .ok()
        .map(|c| c.sub)
}

/// Verifies the envelope's token and that it was minted for the envelope's sender.
pub fn check_envelope(
    keyring: &Keyring,
    env: &Envelope,
    now: DateTime<Utc>,
) -> Result<Claims, AuthError> {
    let claims = verify(keyring, &env.security.auth_token, now)?;
    if claims.sub != env.source_agent.agent_id {
        return Err(AuthError::SubjectMismatch {
            subject: clip(&claims.sub),
            source_agent: clip(&env.source_agent.agent_id),
        });
    }
    Ok(claims)
}

/// Who may send an intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Any authenticated agent.
    Anyone,
    /// Agents with one of these roles, or with one of these ids.
    Only {
        roles: BTreeSet<String>,
        agents: BTreeSet<String>,
    },
}

impl Allowed {
    fn admits(&self, claims: &Claims) -> bool {
        match self {
            Allowed::Anyone => true,
            Allowed::Only { roles, agents } => {
                agents.contains(&claims.sub) || claims.roles.iter().any(|r| roles.contains(r))
            }
        }
    }
}

/// The allow-list: a rule per intent, and one for intents without a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: BTreeMap<String, Allowed>,
    pub fallback: Allowed,
}

impl Default for Policy {
    /// Every authenticated agent may send every journey command but `journey.cancel`,
    /// which needs the `operator` role.
    fn default() -> Self {
        let only_operators = Allowed::Only {
            roles: [OPERATOR.to_string()].into(),
            agents: BTreeSet::new(),
        };
        Self {
            rules: [("journey.cancel".to_string(), only_operators)].into(),
            fallback: Allowed::Anyone,
        }
    }
}

impl Policy {
    /// Parses `intent = rule` lines, `#` comments allowed. A rule is `*` (anyone
    /// authenticated) or space/comma-separated `role:NAME` and `agent:ID`; the intent `*`
    /// sets the rule for intents not listed. Unlisted intents default to anyone.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut policy = Policy {
            rules: BTreeMap::new(),
            fallback: Allowed::Anyone,
        };
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| PolicyError {
                line: n + 1,
                reason,
            };
            let (intent, rule) = line
                .split_once('=')
                .ok_or_else(|| bad("expected 'intent = rule'".into()))?;
            let (intent, rule) = (intent.trim(), rule.trim());
            let allowed = if rule == "*" {
                Allowed::Anyone
            } else {
                let mut roles = BTreeSet::new();
                let mut agents = BTreeSet::new();
                for item in rule.split([',', ' ']).filter(|s| !s.is_empty()) {
                    match item.split_once(':') {
                        Some(("role", r)) if !r.is_empty() => {
                            roles.insert(r.to_string());
                        }
                        Some(("agent", a)) if !a.is_empty() => {
                            agents.insert(a.to_string());
                        }
                        _ => {
                            return Err(bad(format!(
                                "'{}' is not '*', 'role:NAME' or 'agent:ID'",
                                clip(item)
                            )));
                        }
                    }
                }
                if roles.is_empty() && agents.is_empty() {
                    return Err(bad(format!("no one may send '{intent}': give a rule")));
                }
                Allowed::Only { roles, agents }
            };
            if intent == "*" {
                policy.fallback = allowed;
            } else if intent.is_empty() {
                return Err(bad("the intent is empty".into()));
            } else {
                policy.rules.insert(intent.to_string(), allowed);
            }
        }
        Ok(policy)
    }

    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            line: 0,
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::parse(&text)
    }

    fn rule(&self, intent: &str) -> &Allowed {
        self.rules.get(intent).unwrap_or(&self.fallback)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allow-list line {line}: {reason}")]
pub struct PolicyError {
    pub line: usize,
    pub reason: String,
}

/// May the holder of `claims` send `intent`?
pub fn authorize(policy: &Policy, claims: &Claims, intent: &str) -> Result<(), AuthError> {
    if policy.rule(intent).admits(claims) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            agent: clip(&claims.sub),
            intent: clip(intent),
        })
    }
}

/// Verifies a task request on an agent: a valid token for its sender, and the sender is
/// the orchestrator (the subject its key is bound to, or the `orchestrator` role the
/// registry grants its key). Agents hold only the orchestrator's public key, so no agent
/// can make another work.
pub fn check_task_request(
    keyring: &Keyring,
    env: &Envelope,
    now: DateTime<Utc>,
) -> Result<Claims, AuthError> {
    let claims = check_envelope(keyring, env, now)?;
    if claims.sub == AgentRef::orchestrator().agent_id || claims.has_role(ORCHESTRATOR_ROLE) {
        Ok(claims)
    } else {
        Err(AuthError::Forbidden {
            agent: clip(&claims.sub),
            intent: format!("task requests ({})", clip(&env.intent)),
        })
    }
}

/// Mints tokens for one sender, to put on the envelopes it publishes.
#[derive(Clone, Debug)]
pub struct Signer {
    key: Key,
    agent_id: String,
    roles: Vec<String>,
    ttl: Duration,
}

impl Signer {
    /// Default lifetime of the tokens a worker puts on its messages: long enough that a
    /// message waiting in a queue (or an outbox) across an outage is still accepted.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

    /// A signer with a key that can sign (a private key or a shared secret).
    pub fn new(key: Key, agent_id: impl Into<String>) -> Result<Self, KeyError> {
        // Check once that the key signs, so `token` cannot fail later.
        key.encoding_key()?;
        Ok(Self {
            key,
            agent_id: agent_id.into(),
            roles: Vec::new(),
            ttl: Self::DEFAULT_TTL,
        })
    }

    /// Roles the tokens claim. Optional: the verifier grants what its registry says the
    /// key grants anyway; a claim beyond that is refused.
    pub fn with_roles(mut self, roles: Vec<String>) -> Self {
        self.roles = roles;
        self
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    pub fn token(&self, now: DateTime<Utc>) -> String {
        // `new` checked that the key signs; encoding our own claims cannot fail then.
        mint(&self.key, &self.agent_id, &self.roles, now, self.ttl).unwrap_or_default()
    }

    /// Puts a fresh token on `env`. Its `source_agent` must be this signer's agent, or
    /// the receiver refuses it as a subject mismatch.
    pub fn sign(&self, env: Envelope, now: DateTime<Utc>) -> Envelope {
        debug_assert_eq!(env.source_agent.agent_id, self.agent_id);
        env.with_auth_token(self.token(now))
    }
}

/// The orchestrator's check, one call per decoded input: the keyring and the allow-list.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Guard {
    keyring: Arc<Keyring>,
    policy: Arc<Policy>,
}

impl Guard {
    pub fn new(keyring: Arc<Keyring>, policy: Policy) -> Self {
        Self {
            keyring,
            policy: Arc::new(policy),
        }
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// A journey command: authenticated, and its sender allowed to send its intent.
    pub fn command(&self, env: &Envelope, now: DateTime<Utc>) -> Result<Claims, ProtocolError> {
        let claims = check_envelope(&self.keyring, env, now)?;
        authorize(&self.policy, &claims, &env.intent)?;
        Ok(claims)
    }

    /// An agent's reply: authenticated (any agent may answer a task it was sent).
    pub fn reply(&self, env: &Envelope, now: DateTime<Utc>) -> Result<Claims, ProtocolError> {
        Ok(check_envelope(&self.keyring, env, now)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::protocol::MessageType;
    use serde_json::json;

    fn ed(kid: &str, byte: u8, sub: &str) -> Key {
        Key::ed25519_private(kid, [byte; 32], sub).unwrap()
    }

    fn ring(keys: &[&Key]) -> Keyring {
        Keyring::new(keys.iter().map(|k| (*k).clone()).collect()).unwrap()
    }

    /// The registry as a verifier holds it: public halves only.
    fn registry(keys: &[&Key]) -> Keyring {
        Keyring::new(keys.iter().map(|k| k.public()).collect()).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn tok(k: &Key, sub: &str, roles: &[&str], now: DateTime<Utc>) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        mint(k, sub, &roles, now, HOUR).unwrap()
    }

    fn env_from(agent: &str, intent: &str, token: String) -> Envelope {
        Envelope::new(
            AgentRef::new(agent, "tests"),
            AgentRef::orchestrator(),
            MessageType::Request,
            intent,
            json!({"client_id": "acme"}),
            t0(),
        )
        .with_auth_token(token)
    }

    /// A token with arbitrary header and claims JSON and the signature of `k` over them.
    fn forge(header: &str, claims: &str, k: &Key) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &k.encoding_key().unwrap(), k.alg())
            .unwrap();
        format!("{input}.{sig}")
    }

    #[test]
    fn round_trip_with_eddsa() {
        let k = ed("k1", 1, "ops-cli").with_roles(vec!["operator".into()]);
        let t = tok(&k, "ops-cli", &["operator"], t0());
        let c = verify(&registry(&[&k]), &t, t0()).unwrap();
        assert_eq!(c.sub, "ops-cli");
        assert_eq!(c.iat, t0().timestamp());
        assert_eq!(c.exp, t0().timestamp() + 3600);
        assert!(c.has_role("operator"));
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn a_public_key_cannot_sign() {
        let k = ed("k1", 1, "a").public();
        assert!(!k.can_sign());
        assert_eq!(
            mint(&k, "a", &[], t0(), HOUR).unwrap_err(),
            KeyError::CannotSign("k1".into())
        );
        assert!(Signer::new(k.clone(), "a").is_err());
        assert_eq!(ring(&[&k]).signing_key(), None);
        assert_eq!(
            ring(&[&k]).require_signing_key().unwrap_err(),
            KeyError::NoPrivateKey
        );
    }

    #[test]
    fn roles_come_from_the_registry_never_from_the_token() {
        let agent = ed("agent-x", 3, "agent-x");
        let reg = registry(&[&agent]);
        // Claiming nothing: no roles.
        assert!(
            verify(&reg, &tok(&agent, "agent-x", &[], t0()), t0())
                .unwrap()
                .roles
                .is_empty()
        );
        // Claiming operator with a key that does not grant it: forbidden.
        let e = verify(&reg, &tok(&agent, "agent-x", &["operator"], t0()), t0()).unwrap_err();
        assert_eq!(
            e,
            AuthError::RoleNotGranted {
                kid: "agent-x".into(),
                role: "operator".into()
            }
        );
        assert_eq!(e.reason_code(), "forbidden");
        assert!(matches!(
            ProtocolError::from(e),
            ProtocolError::Forbidden(_)
        ));
        // The registry grants operator: the token need not claim it.
        let granted = registry(&[&agent.clone().with_roles(vec!["operator".into()])]);
        let c = verify(&granted, &tok(&agent, "agent-x", &[], t0()), t0()).unwrap();
        assert_eq!(c.roles, ["operator"]);
        assert!(authorize(&Policy::default(), &c, "journey.cancel").is_ok());
    }

    #[test]
    fn an_agent_key_cannot_sign_a_task_request() {
        let orch_id = AgentRef::orchestrator().agent_id;
        let orch = ed("orch", 1, &orch_id);
        let agent = ed("agent", 2, "agent-x");
        let reg = registry(&[&orch, &agent]);
        let req = |k: &Key, sub: &str| {
            Envelope::new(
                AgentRef::new(sub, "journeyman"),
                AgentRef::new("agent", "x"),
                MessageType::Request,
                "connector.scan",
                json!({}),
                t0(),
            )
            .with_auth_token(tok(k, sub, &[], t0()))
        };
        assert!(check_task_request(&reg, &req(&orch, &orch_id), t0()).is_ok());
        // The agent's own key, as itself: not the orchestrator.
        let e = check_task_request(&reg, &req(&agent, "agent-x"), t0()).unwrap_err();
        assert_eq!(e.reason_code(), "forbidden");
        // The agent's key naming the orchestrator: the key is bound to agent-x.
        let e = check_task_request(&reg, &req(&agent, &orch_id), t0()).unwrap_err();
        assert!(matches!(e, AuthError::KeyNotForSubject { .. }), "{e}");
        // Claiming the orchestrator role: not granted by the registry.
        let t = tok(&agent, "agent-x", &[ORCHESTRATOR_ROLE], t0());
        let mut env = req(&agent, "agent-x");
        env.security.auth_token = t;
        assert_eq!(
            check_task_request(&reg, &env, t0())
                .unwrap_err()
                .reason_code(),
            "forbidden"
        );
        // The orchestrator's kid with the agent's private key: bad signature.
        let impostor = ed("orch", 2, &orch_id);
        assert_eq!(
            check_task_request(&reg, &req(&impostor, &orch_id), t0()).unwrap_err(),
            AuthError::BadSignature
        );
        // A partition granted the orchestrator role by the registry.
        let part = ed("orch-2", 4, "orch-2").with_roles(vec![ORCHESTRATOR_ROLE.into()]);
        let reg = registry(&[&orch, &part]);
        assert!(check_task_request(&reg, &req(&part, "orch-2"), t0()).is_ok());
    }

    #[test]
    fn expiry_allows_the_leeway_and_no_more() {
        let k = ed("k1", 1, "a");
        let r = registry(&[&k]);
        let t = tok(&k, "a", &[], t0());
        let exp = t0() + chrono::Duration::seconds(3600);
        assert!(verify(&r, &t, exp + chrono::Duration::seconds(60)).is_ok());
        let e = verify(&r, &t, exp + chrono::Duration::seconds(61)).unwrap_err();
        assert_eq!(e, AuthError::Expired(exp));
        assert!(e.to_string().contains("expired at 2026-01-01 13:00:00"));
        assert_eq!(e.reason_code(), "unauthenticated");
    }

    #[test]
    fn not_yet_valid() {
        let k = ed("k1", 1, "a");
        let r = registry(&[&k]);
        let later = t0() + chrono::Duration::seconds(120);
        assert_eq!(
            verify(&r, &tok(&k, "a", &[], later), t0()).unwrap_err(),
            AuthError::NotYetValid(later)
        );
        let soon = t0() + chrono::Duration::seconds(30);
        assert!(verify(&r, &tok(&k, "a", &[], soon), t0()).is_ok());
        let nbf = t0().timestamp() + 600;
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{},"nbf":{nbf}}}"#,
            t0().timestamp(),
            nbf + 10
        );
        let t = forge(r#"{"alg":"EdDSA","kid":"k1"}"#, &claims, &k);
        assert!(matches!(
            verify(&r, &t, t0()),
            Err(AuthError::NotYetValid(_))
        ));
    }

    #[test]
    fn forged_and_tampered_tokens_are_refused() {
        let k = ed("k1", 1, "a");
        let r = registry(&[&k]);
        let t = tok(&k, "a", &[], t0());
        // Same kid, another key pair.
        let forged = tok(&ed("k1", 2, "a"), "a", &[], t0());
        assert_eq!(
            verify(&r, &forged, t0()).unwrap_err(),
            AuthError::BadSignature
        );
        // Claims changed after signing.
        let parts: Vec<&str> = t.split('.').collect();
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"a","iat":{},"exp":{}}}"#,
            t0().timestamp(),
            t0().timestamp() + 7200
        ));
        let tampered = format!("{}.{}.{}", parts[0], claims, parts[2]);
        assert_eq!(
            verify(&r, &tampered, t0()).unwrap_err(),
            AuthError::BadSignature
        );
        let short = &t[..t.len() - 4];
        assert!(verify(&r, short, t0()).is_err());
    }

    #[test]
    fn the_key_decides_the_algorithm() {
        let k = ed("k1", 1, "a");
        let r = registry(&[&k]);
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{}}}"#,
            t0().timestamp(),
            t0().timestamp() + 60
        );
        for alg in ["none", "None", "HS512", "RS256", "hs256", ""] {
            let h = format!(r#"{{"alg":"{alg}","kid":"k1"}}"#);
            let t = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(&h),
                URL_SAFE_NO_PAD.encode(&claims)
            );
            let e = verify(&r, &t, t0()).unwrap_err();
            assert!(matches!(e, AuthError::UnsupportedAlg(_)), "{alg}: {e}");
        }
        // HS256 "signed" with the public key's bytes (the classic confusion attack).
        let Material::Ed25519Private { public, .. } = &k.material else {
            unreachable!()
        };
        let confused = Key::hs256("k1", public.to_vec()).unwrap();
        let t = forge(r#"{"alg":"HS256","kid":"k1"}"#, &claims, &confused);
        assert!(matches!(
            verify(&r, &t, t0()),
            Err(AuthError::UnsupportedAlg(_))
        ));
    }

    #[test]
    fn kid_selects_the_key_and_is_required() {
        let (k1, k2) = (ed("k1", 1, "a"), ed("k2", 2, "a"));
        let t = tok(&k2, "a", &[], t0());
        let e = verify(&registry(&[&k1]), &t, t0()).unwrap_err();
        assert_eq!(e, AuthError::UnknownKeyId("k2".into()));
        assert_eq!(e.to_string(), "the auth token names unknown key id 'k2'");
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{}}}"#,
            t0().timestamp(),
            t0().timestamp() + 60
        );
        let t = forge(r#"{"alg":"EdDSA"}"#, &claims, &k1);
        assert!(matches!(
            verify(&registry(&[&k1]), &t, t0()),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn rotation_with_two_keys_per_subject() {
        let (old, new) = (ed("2025", 1, "a"), ed("2026", 2, "a"));
        let during = registry(&[&new, &old]);
        let sender = ring(&[&new]);
        assert_eq!(sender.signing_key().unwrap().kid(), "2026");
        for t in [
            tok(&old, "a", &[], t0()),
            tok(sender.signing_key().unwrap(), "a", &[], t0()),
        ] {
            assert!(verify(&during, &t, t0()).is_ok());
        }
        let after = registry(&[&new]);
        assert_eq!(
            verify(&after, &tok(&old, "a", &[], t0()), t0()).unwrap_err(),
            AuthError::UnknownKeyId("2025".into())
        );
    }

    #[test]
    fn hs256_still_verifies_when_configured() {
        let k = Key::hs256("shared", vec![9; 32]).unwrap();
        let r = ring(&[&k]);
        assert!(r.has_hs256());
        let t = tok(&k, "a", &[], t0());
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().alg,
            Algorithm::HS256
        );
        assert_eq!(verify(&r, &t, t0()).unwrap().sub, "a");
        let other = Key::hs256("shared", vec![8; 32]).unwrap();
        assert_eq!(
            verify(&r, &tok(&other, "a", &[], t0()), t0()).unwrap_err(),
            AuthError::BadSignature
        );
        assert!(!registry(&[&ed("e", 1, "a")]).has_hs256());
    }

    #[test]
    fn malformed_tokens() {
        let r = registry(&[&ed("k1", 1, "a")]);
        assert_eq!(verify(&r, "", t0()).unwrap_err(), AuthError::Missing);
        for t in [
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.b.c",
            "e30.e30.***",
            &"a".repeat(9000),
        ] {
            let e = verify(&r, t, t0()).unwrap_err();
            assert!(
                matches!(e, AuthError::Malformed(_) | AuthError::UnsupportedAlg(_)),
                "{t}: {e}"
            );
            assert_eq!(e.reason_code(), "unauthenticated");
        }
        let k = ed("k1", 1, "a");
        let t = forge(r#"{"alg":"EdDSA","kid":"k1"}"#, r#"{"sub":1}"#, &k);
        assert!(matches!(verify(&r, &t, t0()), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn errors_never_echo_the_token() {
        let k = ed("k1", 1, "a");
        let r = registry(&[&k]);
        let t = tok(&k, "a", &[], t0());
        let later = t0() + chrono::Duration::days(2);
        let sig = t.rsplit('.').next().unwrap();
        for e in [
            verify(&r, &t, later).unwrap_err(),
            verify(&registry(&[&ed("k1", 9, "a")]), &t, t0()).unwrap_err(),
            check_envelope(&r, &env_from("b", "journey.start", t.clone()), t0()).unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(!msg.contains(sig) && !msg.contains(&t), "{msg}");
        }
    }

    #[test]
    fn envelope_subject_must_match_the_source_agent() {
        let k = ed("k1", 1, "ops-cli");
        let r = registry(&[&k]);
        let t = tok(&k, "ops-cli", &[], t0());
        assert_eq!(
            check_envelope(&r, &env_from("ops-cli", "journey.start", t.clone()), t0())
                .unwrap()
                .sub,
            "ops-cli"
        );
        let e = check_envelope(&r, &env_from("mallory", "journey.start", t), t0()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source_agent 'mallory' does not match the token's subject 'ops-cli'"
        );
        assert_eq!(e.reason_code(), "unauthenticated");
        let e = check_envelope(
            &r,
            &env_from("ops-cli", "journey.start", String::new()),
            t0(),
        )
        .unwrap_err();
        assert_eq!(e, AuthError::Missing);
    }

    #[test]
    fn a_fleet_key_signs_for_its_prefix_only() {
        let k = ed("fleet", 1, "journeyman-agents-*");
        let r = registry(&[&k]);
        assert!(verify(&r, &tok(&k, "journeyman-agents-7f9c", &[], t0()), t0()).is_ok());
        for other in ["journey-orchestrator", "journeyman-agents-", "ops"] {
            assert!(matches!(
                verify(&r, &tok(&k, other, &[], t0()), t0()),
                Err(AuthError::KeyNotForSubject { .. })
            ));
        }
        for bad in ["*", "a*b", "**"] {
            assert!(Key::generate("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_bound_to_their_subject() {
        let k = ed("ops", 1, "ops-cli");
        let r = registry(&[&k]);
        assert!(verify(&r, &tok(&k, "ops-cli", &[], t0()), t0()).is_ok());
        assert!(matches!(
            verify(&r, &tok(&k, "journey-orchestrator", &[], t0()), t0()),
            Err(AuthError::KeyNotForSubject { .. })
        ));
    }

    #[test]
    fn default_policy_lets_only_operators_cancel() {
        let p = Policy::default();
        let user = Claims {
            sub: "upstream".into(),
            iat: 0,
            exp: 1,
            nbf: None,
            roles: vec![],
        };
        let op = Claims {
            roles: vec!["operator".into()],
            ..user.clone()
        };
        for intent in crate::wire::protocol::JOURNEY_INTENTS {
            assert!(authorize(&p, &op, intent).is_ok(), "{intent}");
            assert_eq!(
                authorize(&p, &user, intent).is_ok(),
                intent != "journey.cancel",
                "{intent}"
            );
        }
        let e = authorize(&p, &user, "journey.cancel").unwrap_err();
        assert_eq!(e.reason_code(), "forbidden");
        assert_eq!(
            e.to_string(),
            "agent 'upstream' is not allowed to send journey.cancel"
        );
        assert!(matches!(ProtocolError::from(e).reason_code(), "forbidden"));
    }

    #[test]
    fn policy_from_text() {
        let p = Policy::parse(
            "# who may send what\n\
             journey.cancel = role:operator agent:ops-bot\n\
             journey.rollback = role:operator, role:sre\n\
             * = role:upstream\n",
        )
        .unwrap();
        let c = |sub: &str, roles: &[&str]| Claims {
            sub: sub.into(),
            iat: 0,
            exp: 1,
            nbf: None,
            roles: roles.iter().map(|s| s.to_string()).collect(),
        };
        assert!(authorize(&p, &c("ops-bot", &[]), "journey.cancel").is_ok());
        assert!(authorize(&p, &c("x", &["operator"]), "journey.cancel").is_ok());
        assert!(authorize(&p, &c("x", &["sre"]), "journey.rollback").is_ok());
        assert!(authorize(&p, &c("x", &["sre"]), "journey.cancel").is_err());
        assert!(authorize(&p, &c("x", &["upstream"]), "journey.start").is_ok());
        assert!(authorize(&p, &c("x", &[]), "journey.start").is_err());
        for bad in [
            "journey.cancel",
            "journey.cancel = ",
            "journey.cancel = role:",
            "x = group:a",
            " = *",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Policy::parse("").unwrap().fallback, Allowed::Anyone);
    }

    #[test]
    fn keyring_parsing() {
        let orch = ed("orch-2026", 1, "journey-orchestrator");
        let secret = STANDARD.encode([7u8; 32]);
        let text = format!(
            "# registry\n\n{}\n  {}  # the operator\nlegacy={secret} sub=ops-cli roles=operator\nshared=hs256:{secret}\n",
            orch.public_line().unwrap(),
            ed("ops", 2, "ops-cli")
                .with_roles(vec!["operator".into(), "sre".into()])
                .public_line()
                .unwrap()
        );
        let r = Keyring::parse(&text).unwrap();
        assert_eq!(r.kids(), ["orch-2026", "ops", "legacy", "shared"]);
        assert_eq!(r.get("orch-2026").unwrap(), &orch.public());
        assert_eq!(r.get("ops").unwrap().roles(), ["operator", "sre"]);
        assert_eq!(r.get("legacy").unwrap().subject(), Some("ops-cli"));
        assert!(r.has_hs256());
        // Only the shared secrets can sign in a registry of public keys.
        assert_eq!(r.signing_key().unwrap().kid(), "legacy");
        let private = Keyring::parse(&orch.expose_line()).unwrap();
        assert_eq!(private.signing_key().unwrap(), &orch);
        let cases = [
            ("", KeyError::NoKeys),
            ("# only a comment", KeyError::NoKeys),
            (
                &format!("a={secret}\na={secret}") as &str,
                KeyError::DuplicateKid("a".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Keyring::parse(text).unwrap_err(), want, "{text}");
        }
        let public = orch.public_line().unwrap();
        let no_sub = public.split(" sub=").next().unwrap().to_string();
        for bad in [
            "nokey",
            "a=c2hvcnQ=",
            "a=***notbase64***",
            &format!("bad kid={secret}"),
            &format!("a={secret} role=x"),
            &no_sub,
            "a=ed25519:AAAA sub=x",
        ] {
            assert!(
                matches!(Keyring::parse(bad), Err(KeyError::BadEntry { .. })),
                "{bad}"
            );
        }
        let e = Keyring::parse("a=ed25519-private:***secret-seed*** sub=x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-seed"), "{e}");
    }

    #[test]
    fn keyring_sources_join_the_private_key_and_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let (reg_path, own_path) = (dir.path().join("registry"), dir.path().join("own"));
        let me = ed("agent-1", 1, "agent-x");
        let orch = ed("orch", 2, "journey-orchestrator");
        std::fs::write(
            &reg_path,
            format!(
                "{}\n{}\n",
                orch.public_line().unwrap(),
                me.clone()
                    .with_roles(vec!["reader".into()])
                    .public_line()
                    .unwrap()
            ),
        )
        .unwrap();
        // The private file claims operator; the registry's roles win.
        std::fs::write(
            &own_path,
            me.clone().with_roles(vec!["operator".into()]).expose_line(),
        )
        .unwrap();
        let r = Keyring::from_sources(Some(&reg_path), Some("ignored"), Some(&own_path), None)
            .unwrap()
            .unwrap();
        assert_eq!(r.kids(), ["agent-1", "orch"]);
        assert_eq!(r.signing_key().unwrap().kid(), "agent-1");
        assert_eq!(r.signing_key().unwrap().roles(), ["reader"]);
        assert_eq!(Keyring::from_sources(None, None, None, None).unwrap(), None);
        assert_eq!(
            Keyring::from_sources(None, Some("  "), None, None).unwrap(),
            None
        );
        let only_own = Keyring::from_sources(None, None, Some(&own_path), None)
            .unwrap()
            .unwrap();
        assert_eq!(only_own.kids(), ["agent-1"]);
        // A private key that is not the registry's key of that id.
        std::fs::write(&own_path, ed("agent-1", 9, "agent-x").expose_line()).unwrap();
        assert_eq!(
            Keyring::from_sources(Some(&reg_path), None, Some(&own_path), None).unwrap_err(),
            KeyError::Mismatch("agent-1".into())
        );
        std::fs::write(&reg_path, "# nothing\n").unwrap();
        assert!(matches!(
            Keyring::from_file(&reg_path),
            Err(KeyError::EmptyFile(_))
        ));
        assert!(matches!(
            Keyring::from_file(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
        assert!(
            KeyError::NoKeys
                .to_string()
                .contains("JOURNEYMAN_AUTH_KEYS")
        );
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let (a, b) = (
            Key::generate("a", "x").unwrap(),
            Key::generate("a", "x").unwrap(),
        );
        assert_ne!(a, b);
        let back = Keyring::parse(&a.expose_line()).unwrap();
        assert_eq!(back.signing_key().unwrap(), &a);
        let public = Keyring::parse(&a.public_line().unwrap()).unwrap();
        assert!(verify(&public, &tok(&a, "x", &[], t0()), t0()).is_ok());
        assert!(Key::generate("no spaces allowed", "x").is_err());
        assert!(Key::generate("k", "").is_err());
    }

    #[test]
    fn debug_and_display_never_print_secrets() {
        let k = Key::hs256("k1", b"super-secret-bytes-0123456789".to_vec()).unwrap();
        let encoded = STANDARD.encode(b"super-secret-bytes-0123456789");
        let e = ed("e1", 5, "a");
        let seed = URL_SAFE_NO_PAD.encode([5u8; 32]);
        let r = ring(&[&k, &e]);
        let signer = Signer::new(k.clone(), "a").unwrap();
        let guard = Guard::new(Arc::new(r.clone()), Policy::default());
        for shown in [
            format!("{k:?}"),
            format!("{k}"),
            format!("{e:?}"),
            format!("{r:?}"),
            format!("{signer:?}"),
            format!("{guard:?}"),
            format!("{:?}", r.public_lines()),
        ] {
            assert!(
                !shown.contains("super-secret")
                    && !shown.contains(&encoded)
                    && !shown.contains(&seed),
                "{shown}"
            );
        }
        assert!(k.expose_line().contains(&encoded));
        assert!(e.expose_line().contains(&seed));
        let env = env_from("a", "journey.start", signer.token(t0()));
        let shown = format!("{env:?}");
        assert!(!shown.contains(&env.security.auth_token), "{shown}");
    }

    #[test]
    fn signer_and_guard() {
        let cli_key = ed("cli", 1, "ops-cli").with_roles(vec!["operator".into()]);
        let up_key = ed("up", 2, "upstream");
        let guard = Guard::new(Arc::new(registry(&[&cli_key, &up_key])), Policy::default());
        let cli = Signer::new(cli_key.clone(), "ops-cli")
            .unwrap()
            .with_roles(vec!["operator".into()])
            .with_ttl(HOUR);
        let env = |intent: &str, s: &Signer| {
            s.sign(
                Envelope::new(
                    AgentRef::new(s.agent_id(), "tests"),
                    AgentRef::orchestrator(),
                    MessageType::Request,
                    intent,
                    json!({}),
                    t0(),
                ),
                t0(),
            )
        };
        assert!(guard.command(&env("journey.cancel", &cli), t0()).is_ok());
        let plain = Signer::new(up_key.clone(), "upstream").unwrap();
        let e = guard
            .command(&env("journey.cancel", &plain), t0())
            .unwrap_err();
        assert_eq!(e.reason_code(), "forbidden");
        // Claiming operator does not help: the key does not grant it.
        let claims_more = plain.clone().with_roles(vec!["operator".into()]);
        let e = guard
            .command(&env("journey.cancel", &claims_more), t0())
            .unwrap_err();
        assert_eq!(e.reason_code(), "forbidden");
        assert!(e.to_string().contains("does not grant"), "{e}");
        assert!(guard.command(&env("journey.start", &plain), t0()).is_ok());
        let e = guard
            .command(
                &env("journey.start", &plain),
                t0() + chrono::Duration::days(2),
            )
            .unwrap_err();
        assert_eq!(e.reason_code(), "unauthenticated");
        assert!(e.to_string().contains("expired at"));
        let mut unsigned = env("journey.start", &plain);
        unsigned.security.auth_token.clear();
        assert_eq!(
            guard.command(&unsigned, t0()).unwrap_err().reason_code(),
            "unauthenticated"
        );
        assert!(guard.reply(&env("x", &plain), t0()).is_ok());
    }

    #[test]
    fn unverified_subject_reads_the_claims() {
        let t = tok(&ed("k1", 1, "ops-cli"), "ops-cli", &[], t0());
        assert_eq!(unverified_subject(&t).as_deref(), Some("ops-cli"));
        assert_eq!(unverified_subject("garbage"), None);
    }
}
