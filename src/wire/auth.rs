//! Authentication and authorisation of protocol messages: signed tokens in
//! `security.auth_token`, the keys that sign and verify them, and the allow-list of which
//! agents may send which journey commands.
//!
//! Tokens are a small, auditable subset of JWT: compact form, HS256 only (HMAC-SHA256),
//! header `{"alg":"HS256","typ":"JWT","kid":...}`, claims `{sub, iat, exp, nbf?, roles?}`
//! where `sub` is the sending agent's id. A token authenticates the *sender*, not the
//! body: it is a bearer credential, so the transport must be TLS where the network is not
//! trusted.
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
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::wire::protocol::{AgentRef, Envelope, ProtocolError};

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm accepted: a token naming any other (`none`, `RS256`, ...) is refused
/// before a key is even looked up, so an attacker cannot pick the verification method.
pub const ALG: &str = "HS256";
/// Clock skew tolerated between the minting and the verifying machine.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Shortest secret accepted: HMAC-SHA256 keys below 128 bits are guessable offline.
pub const MIN_SECRET_BYTES: usize = 16;
/// Bytes of a generated secret (the size of the SHA-256 block's natural key).
pub const GENERATED_SECRET_BYTES: usize = 32;
/// Tokens longer than this are refused unparsed (the envelope schema's limit too); ours
/// are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Environment variable holding keys inline (`kid=base64secret`, `;`-separated).
pub const KEYS_ENV: &str = "JOURNEYMAN_AUTH_KEYS";
/// Environment variable naming a key file.
pub const KEYS_FILE_ENV: &str = "JOURNEYMAN_AUTH_KEYS_FILE";
/// The role that may cancel journeys in the default policy.
pub const OPERATOR: &str = "operator";
/// The role a token needs (besides the orchestrator's own subject) to send task requests.
pub const ORCHESTRATOR_ROLE: &str = "orchestrator";

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

/// One signing key: an id (the token header's `kid`) and its secret, optionally bound to
/// one subject (a per-agent key: tokens it verifies must name that agent).
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    kid: String,
    secret: Secret,
    subject: Option<String>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("secret", &self.secret)
            .field("subject", &self.subject)
            .finish()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key '{}'", self.kid)
    }
}

impl Key {
    pub fn new(kid: impl Into<String>, secret: Vec<u8>) -> Result<Self, KeyError> {
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
            secret: Secret(secret),
            subject: None,
        })
    }

    /// Binds the key to one agent: it verifies only tokens whose subject is `agent_id`.
    pub fn for_subject(mut self, agent_id: impl Into<String>) -> Self {
        self.subject = Some(agent_id.into());
        self
    }

    /// A new random key (32 bytes from the OS-seeded generator).
    pub fn generate(kid: impl Into<String>) -> Result<Self, KeyError> {
        let mut bytes = vec![0u8; GENERATED_SECRET_BYTES];
        rand::fill(&mut bytes[..]);
        Self::new(kid, bytes)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// The key as a key-file line, `kid=base64secret[ sub=agent]`. This prints the secret:
    /// it is for `journeyman token keygen` and nothing else.
    pub fn expose_line(&self) -> String {
        let mut line = format!("{}={}", self.kid, STANDARD.encode(&self.secret.0));
        if let Some(s) = &self.subject {
            line.push_str(" sub=");
            line.push_str(s);
        }
        line
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        HmacSha256::new_from_slice(&self.secret.0).expect("HMAC takes keys of any size")
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

/// The keys a worker trusts. The first signs; any verifies a token whose `kid` names it,
/// so rotation is: add the new key second, deploy, move it first, deploy, drop the old.
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

    /// Parses `kid=base64secret[ sub=agent]` entries, one per line or `;`-separated, with
    /// `#` comments and blank lines allowed. Standard or URL-safe base64, padded or not.
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

    /// The keyring from a file if one is named, else from inline keys, else `None`.
    /// (`inline` is the value of [`KEYS_ENV`]; the caller reads the environment.)
    pub fn from_sources(
        file: Option<&Path>,
        inline: Option<&str>,
    ) -> Result<Option<Self>, KeyError> {
        match (file, inline) {
            (Some(p), _) => Self::from_file(p).map(Some),
            (None, Some(text)) if !text.trim().is_empty() => Self::parse(text).map(Some),
            _ => Ok(None),
        }
    }

    /// The key that signs: the first.
    pub fn signing_key(&self) -> &Key {
        &self.keys[0]
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }
}

fn parse_entry(entry: &str) -> Result<Key, String> {
    let (kid, rest) = entry
        .split_once('=')
        .ok_or_else(|| "expected kid=base64secret".to_string())?;
    let kid = kid.trim();
    let mut parts = rest.split_whitespace();
    let secret = parts.next().unwrap_or("");
    // Never put the secret in the message: only its length.
    let bytes = STANDARD
        .decode(secret)
        .or_else(|_| URL_SAFE.decode(secret))
        .or_else(|_| URL_SAFE_NO_PAD.decode(secret))
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(secret))
        .map_err(|_| {
            format!(
                "the secret of key '{}' is not base64 ({} characters)",
                clip(kid),
                secret.len()
            )
        })?;
    let mut key = Key::new(kid, bytes).map_err(|e| e.to_string())?;
    for opt in parts {
        match opt.split_once('=') {
            Some(("sub", agent)) if !agent.is_empty() => key = key.for_subject(agent),
            _ => {
                return Err(format!(
                    "unknown option '{}' after key '{}' (only sub=AGENT)",
                    clip(opt),
                    key.kid
                ));
            }
        }
    }
    Ok(key)
}

/// Why keys could not be loaded. Messages name files, lines and key ids, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no authentication key configured: give --auth-keys-file or set {KEYS_FILE_ENV} or {KEYS_ENV} (create one with `journeyman token keygen`)"
    )]
    NoKeys,
    #[error("the key file {0} holds no key (expected lines kid=base64secret)")]
    EmptyFile(String),
    #[error("cannot read the key file {path}: {error}")]
    Io { path: String, error: String },
    #[error("key entry {line}: {reason}")]
    BadEntry { line: usize, reason: String },
    #[error("key id '{0}' is invalid: use 1-64 letters, digits, '-', '_' or '.'")]
    BadKid(String),
    #[error("key '{kid}' has a {len}-byte secret; at least {MIN_SECRET_BYTES} bytes are needed")]
    ShortSecret { kid: String, len: usize },
    #[error("key id '{0}' appears twice")]
    DuplicateKid(String),
}

/// What a verified token says.
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

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// Why a message was not authenticated (or not authorised). No variant carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no auth token: security.auth_token is empty")]
    Missing,
    #[error("the auth token is malformed: {0}")]
    Malformed(String),
    #[error("the auth token's algorithm '{0}' is not accepted (only HS256)")]
    UnsupportedAlg(String),
    #[error("the auth token names unknown key id '{0}'")]
    UnknownKeyId(String),
    #[error("bad signature: the auth token was not signed by any configured key")]
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
    #[error("agent '{agent}' is not allowed to send {intent}")]
    Forbidden { agent: String, intent: String },
}

impl AuthError {
    /// The dead-letter reason: `forbidden` for the allow-list, `unauthenticated` otherwise.
    pub fn reason_code(&self) -> &'static str {
        match self {
            AuthError::Forbidden { .. } => "forbidden",
            _ => "unauthenticated",
        }
    }
}

impl From<AuthError> for ProtocolError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Forbidden { .. } => ProtocolError::Forbidden(e.to_string()),
            other => ProtocolError::Unauthenticated(other.to_string()),
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

fn b64json<T: Serialize>(v: &T) -> String {
    // Plain structs of strings and integers always serialise.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
}

/// Mints a token for `agent_id` signed with `key`, valid from `now` for `ttl`.
pub fn mint(
    key: &Key,
    agent_id: &str,
    roles: &[String],
    now: DateTime<Utc>,
    ttl: Duration,
) -> String {
    let iat = now.timestamp();
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims {
        sub: agent_id.to_string(),
        iat,
        exp: iat.saturating_add(ttl),
        nbf: None,
        roles: roles.to_vec(),
    };
    sign_claims(key, &claims)
}

fn sign_claims(key: &Key, claims: &Claims) -> String {
    let header = Header {
        alg: ALG.into(),
        typ: Some("JWT".into()),
        kid: Some(key.kid.clone()),
    };
    let signing_input = format!("{}.{}", b64json(&header), b64json(claims));
    let mut mac = key.mac();
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies a token: HS256 only, the key chosen by `kid` (or, without one, any key of the
/// ring), a constant-time MAC comparison, then the validity window with [`LEEWAY`].
/// Claims are parsed only once the signature holds.
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
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "expected three base64url parts separated by '.'".into(),
        ));
    };
    let header: Header = decode_part(h, "header")?;
    if header.alg != ALG {
        return Err(AuthError::UnsupportedAlg(clip(&header.alg)));
    }
    let candidates: Vec<&Key> = match &header.kid {
        Some(kid) => vec![
            keyring
                .get(kid)
                .ok_or_else(|| AuthError::UnknownKeyId(clip(kid)))?,
        ],
        None => keyring.keys.iter().collect(),
    };
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed("the signature is not base64url".into()))?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    let key = candidates
        .into_iter()
        .find(|k| {
            let mut mac = k.mac();
            mac.update(signing_input.as_bytes());
            mac.verify_slice(&sig).is_ok()
        })
        .ok_or(AuthError::BadSignature)?;
    let claims: Claims = decode_part(c, "claims")?;
    if let Some(allowed) = &key.subject
        && *allowed != claims.sub
    {
        return Err(AuthError::KeyNotForSubject {
            kid: key.kid.clone(),
            allowed: allowed.clone(),
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
    Ok(claims)
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("the {what} is not base64url")))?;
    // serde's message says where the JSON is wrong, not what it holds.
    serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(format!("the {what} is not the expected JSON ({e})")))
}

/// Reads a token's subject without verifying it: only for choosing the `source_agent` to
/// send with a token given on the command line. Never trust the result.
pub fn unverified_subject(token: &str) -> Option<String> {
    let c = token.split('.').nth(1)?;
    decode_part::<Claims>(c, "claims").ok().map(|c| c.sub)
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
/// the orchestrator (its id, or the `orchestrator` role). Any other agent holding a key
/// could otherwise make agents work.
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

    pub fn new(key: Key, agent_id: impl Into<String>) -> Self {
        Self {
            key,
            agent_id: agent_id.into(),
            roles: Vec::new(),
            ttl: Self::DEFAULT_TTL,
        }
    }

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

    pub fn token(&self, now: DateTime<Utc>) -> String {
        mint(&self.key, &self.agent_id, &self.roles, now, self.ttl)
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

    fn key(kid: &str, byte: u8) -> Key {
        Key::new(kid, vec![byte; 32]).unwrap()
    }

    fn ring(keys: &[&Key]) -> Keyring {
        Keyring::new(keys.iter().map(|k| (*k).clone()).collect()).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

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

    /// A token with arbitrary header and claims JSON, signed (or not) by `k`.
    fn forge(header: &str, claims: &str, k: Option<&Key>) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let sig = match k {
            Some(k) => {
                let mut mac = k.mac();
                mac.update(input.as_bytes());
                URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
            }
            None => String::new(),
        };
        format!("{input}.{sig}")
    }

    #[test]
    fn round_trip() {
        let k = key("k1", 1);
        let t = mint(&k, "ops-cli", &["operator".into()], t0(), HOUR);
        assert!(t.split('.').count() == 3);
        let c = verify(&ring(&[&k]), &t, t0()).unwrap();
        assert_eq!(c.sub, "ops-cli");
        assert_eq!(c.iat, t0().timestamp());
        assert_eq!(c.exp, t0().timestamp() + 3600);
        assert!(c.has_role("operator"));
        let header: Header = decode_part(t.split('.').next().unwrap(), "header").unwrap();
        assert_eq!(header.alg, "HS256");
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn expiry_allows_the_leeway_and_no_more() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let t = mint(&k, "a", &[], t0(), HOUR);
        let exp = t0() + chrono::Duration::seconds(3600);
        assert!(verify(&r, &t, exp + chrono::Duration::seconds(60)).is_ok());
        let e = verify(&r, &t, exp + chrono::Duration::seconds(61)).unwrap_err();
        assert_eq!(e, AuthError::Expired(exp));
        assert!(e.to_string().contains("expired at 2026-01-01 13:00:00"));
        assert_eq!(e.reason_code(), "unauthenticated");
    }

    #[test]
    fn not_yet_valid() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        // Minted in the future (a skewed clock) beyond the leeway.
        let later = t0() + chrono::Duration::seconds(120);
        let t = mint(&k, "a", &[], later, HOUR);
        assert_eq!(
            verify(&r, &t, t0()).unwrap_err(),
            AuthError::NotYetValid(later)
        );
        assert!(
            verify(
                &r,
                &mint(&k, "a", &[], t0() + chrono::Duration::seconds(30), HOUR),
                t0()
            )
            .is_ok()
        );
        // An explicit nbf.
        let nbf = t0().timestamp() + 600;
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{},"nbf":{nbf}}}"#,
            t0().timestamp(),
            nbf + 10
        );
        let t = forge(r#"{"alg":"HS256","kid":"k1"}"#, &claims, Some(&k));
        assert!(matches!(
            verify(&r, &t, t0()),
            Err(AuthError::NotYetValid(_))
        ));
    }

    #[test]
    fn forged_signature_is_refused() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let t = mint(&k, "a", &[], t0(), HOUR);
        // Same kid, other secret.
        let forged = mint(&key("k1", 2), "a", &[], t0(), HOUR);
        assert_eq!(
            verify(&r, &forged, t0()).unwrap_err(),
            AuthError::BadSignature
        );
        // Claims changed after signing (privilege escalation attempt).
        let parts: Vec<&str> = t.split('.').collect();
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"a","iat":{},"exp":{},"roles":["operator"]}}"#,
            t0().timestamp(),
            t0().timestamp() + 3600
        ));
        let tampered = format!("{}.{}.{}", parts[0], claims, parts[2]);
        assert_eq!(
            verify(&r, &tampered, t0()).unwrap_err(),
            AuthError::BadSignature
        );
        // A truncated signature (still valid base64url: 40 characters).
        let short = &t[..t.len() - 3];
        assert_eq!(
            verify(&r, short, t0()).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{}}}"#,
            t0().timestamp(),
            t0().timestamp() + 60
        );
        for alg in ["none", "None", "HS512", "RS256", "hs256", ""] {
            let t = forge(&format!(r#"{{"alg":"{alg}","kid":"k1"}}"#), &claims, None);
            assert_eq!(
                verify(&r, &t, t0()).unwrap_err(),
                AuthError::UnsupportedAlg(alg.into()),
                "{alg}"
            );
            // Even correctly MACed, another alg is refused.
            let t = forge(
                &format!(r#"{{"alg":"{alg}","kid":"k1"}}"#),
                &claims,
                Some(&k),
            );
            assert!(matches!(
                verify(&r, &t, t0()),
                Err(AuthError::UnsupportedAlg(_))
            ));
        }
    }

    #[test]
    fn kid_selects_the_key() {
        let (k1, k2) = (key("k1", 1), key("k2", 2));
        let r = ring(&[&k1]);
        let t = mint(&k2, "a", &[], t0(), HOUR);
        let e = verify(&r, &t, t0()).unwrap_err();
        assert_eq!(e, AuthError::UnknownKeyId("k2".into()));
        assert_eq!(e.to_string(), "the auth token names unknown key id 'k2'");
        // A kid naming k1 but signed by k2's secret.
        let claims = format!(
            r#"{{"sub":"a","iat":{},"exp":{}}}"#,
            t0().timestamp(),
            t0().timestamp() + 60
        );
        let t = forge(r#"{"alg":"HS256","kid":"k1"}"#, &claims, Some(&k2));
        assert_eq!(
            verify(&ring(&[&k1, &k2]), &t, t0()).unwrap_err(),
            AuthError::BadSignature
        );
        // No kid: any key of the ring may verify.
        let t = forge(r#"{"alg":"HS256"}"#, &claims, Some(&k2));
        assert_eq!(verify(&ring(&[&k1, &k2]), &t, t0()).unwrap().sub, "a");
        assert_eq!(
            verify(&ring(&[&k1]), &t, t0()).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn rotation_with_two_keys() {
        let (old, new) = (key("2025", 1), key("2026", 2));
        let during = ring(&[&new, &old]);
        assert_eq!(during.signing_key().kid(), "2026");
        // Tokens from before the rotation and after both verify during it.
        for t in [
            mint(&old, "a", &[], t0(), HOUR),
            mint(during.signing_key(), "a", &[], t0(), HOUR),
        ] {
            assert!(verify(&during, &t, t0()).is_ok());
        }
        // Once the old key is dropped, its tokens are refused by id.
        let after = ring(&[&new]);
        assert_eq!(
            verify(&after, &mint(&old, "a", &[], t0(), HOUR), t0()).unwrap_err(),
            AuthError::UnknownKeyId("2025".into())
        );
    }

    #[test]
    fn malformed_tokens() {
        let r = ring(&[&key("k1", 1)]);
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
        // Valid signature over claims that are not ours.
        let k = key("k1", 1);
        let t = forge(r#"{"alg":"HS256","kid":"k1"}"#, r#"{"sub":1}"#, Some(&k));
        assert!(matches!(verify(&r, &t, t0()), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn errors_never_echo_the_token() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let t = mint(&k, "a", &[], t0(), HOUR);
        let later = t0() + chrono::Duration::days(2);
        let sig = t.rsplit('.').next().unwrap();
        for e in [
            verify(&r, &t, later).unwrap_err(),
            verify(&ring(&[&key("k1", 9)]), &t, t0()).unwrap_err(),
            check_envelope(&r, &env_from("b", "journey.start", t.clone()), t0()).unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(!msg.contains(sig) && !msg.contains(&t), "{msg}");
        }
    }

    #[test]
    fn envelope_subject_must_match_the_source_agent() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let t = mint(&k, "ops-cli", &[], t0(), HOUR);
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
    fn per_agent_keys_bind_the_subject() {
        let k = key("ops", 1).for_subject("ops-cli");
        let r = ring(&[&k]);
        assert!(verify(&r, &mint(&k, "ops-cli", &[], t0(), HOUR), t0()).is_ok());
        assert!(matches!(
            verify(&r, &mint(&k, "journey-orchestrator", &[], t0(), HOUR), t0()),
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
        let secret = STANDARD.encode([7u8; 32]);
        let text = format!(
            "# keys\n\nk2026={secret}\n  k2025 = {secret}  # old, drop in March\nops={secret} sub=ops-cli\n"
        );
        let r = Keyring::parse(&text).unwrap();
        assert_eq!(r.kids(), ["k2026", "k2025", "ops"]);
        assert_eq!(r.get("ops").unwrap().subject(), Some("ops-cli"));
        let inline = Keyring::parse(&format!(
            "a={secret};b={}",
            URL_SAFE_NO_PAD.encode([8u8; 20])
        ))
        .unwrap();
        assert_eq!(inline.kids(), ["a", "b"]);
        let cases = [
            ("", KeyError::NoKeys),
            ("# only a comment", KeyError::NoKeys),
            (
                &format!("a={secret}\na={secret}") as &str,
                KeyError::DuplicateKid("a".into()),
            ),
            (
                "a=c2hvcnQ=",
                KeyError::BadEntry {
                    line: 1,
                    reason: KeyError::ShortSecret {
                        kid: "a".into(),
                        len: 5,
                    }
                    .to_string(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Keyring::parse(text).unwrap_err(), want, "{text}");
        }
        for bad in [
            "nokey",
            "a=***notbase64***",
            &format!("bad kid={secret}"),
            &format!("a={secret} role=x"),
        ] {
            assert!(
                matches!(Keyring::parse(bad), Err(KeyError::BadEntry { .. })),
                "{bad}"
            );
        }
        // Errors name the key, never the secret.
        let e = Keyring::parse("a=***notbase64-but-secret***")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("notbase64-but-secret"), "{e}");
    }

    #[test]
    fn keyring_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let k = Key::generate("gen").unwrap();
        std::fs::write(&path, format!("{}\n", k.expose_line())).unwrap();
        let from_file = Keyring::from_sources(Some(&path), Some("ignored"))
            .unwrap()
            .unwrap();
        assert_eq!(from_file.signing_key(), &k);
        assert_eq!(Keyring::from_sources(None, None).unwrap(), None);
        assert_eq!(Keyring::from_sources(None, Some("  ")).unwrap(), None);
        let inline = Keyring::from_sources(None, Some(&k.expose_line()))
            .unwrap()
            .unwrap();
        assert_eq!(inline.signing_key(), &k);
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            Keyring::from_file(&path),
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
        let (a, b) = (Key::generate("a").unwrap(), Key::generate("a").unwrap());
        assert_ne!(a, b);
        let back = Keyring::parse(&a.expose_line()).unwrap();
        assert_eq!(back.signing_key(), &a);
        assert!(Key::generate("no spaces allowed").is_err());
    }

    #[test]
    fn debug_and_display_never_print_secrets() {
        let k = Key::new("k1", b"super-secret-bytes-0123456789".to_vec()).unwrap();
        let encoded = STANDARD.encode(b"super-secret-bytes-0123456789");
        let r = ring(&[&k]);
        let signer = Signer::new(k.clone(), "a");
        let guard = Guard::new(Arc::new(r.clone()), Policy::default());
        for shown in [
            format!("{k:?}"),
            format!("{k}"),
            format!("{r:?}"),
            format!("{signer:?}"),
            format!("{guard:?}"),
            format!("{:?}", k.secret),
            format!("{}", k.secret),
        ] {
            assert!(
                !shown.contains("super-secret") && !shown.contains(&encoded),
                "{shown}"
            );
        }
        assert!(k.expose_line().contains(&encoded));
        let env = env_from("a", "journey.start", signer.token(t0()));
        let shown = format!("{env:?}");
        assert!(!shown.contains(&env.security.auth_token), "{shown}");
    }

    #[test]
    fn signer_and_guard() {
        let k = key("k1", 1);
        let guard = Guard::new(Arc::new(ring(&[&k])), Policy::default());
        let cli = Signer::new(k.clone(), "ops-cli")
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
        let plain = Signer::new(k.clone(), "upstream");
        let e = guard
            .command(&env("journey.cancel", &plain), t0())
            .unwrap_err();
        assert_eq!(e.reason_code(), "forbidden");
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
    fn task_requests_must_come_from_the_orchestrator() {
        let k = key("k1", 1);
        let r = ring(&[&k]);
        let orch = Signer::new(k.clone(), AgentRef::orchestrator().agent_id);
        let req = |s: &Signer| {
            s.sign(
                Envelope::new(
                    AgentRef::new(s.agent_id(), "journeyman"),
                    AgentRef::new("agent", "x"),
                    MessageType::Request,
                    "connector.scan",
                    json!({}),
                    t0(),
                ),
                t0(),
            )
        };
        assert!(check_task_request(&r, &req(&orch), t0()).is_ok());
        let other = Signer::new(k.clone(), "some-agent");
        assert_eq!(
            check_task_request(&r, &req(&other), t0())
                .unwrap_err()
                .reason_code(),
            "forbidden"
        );
        let partition = Signer::new(k, "orch-2").with_roles(vec![ORCHESTRATOR_ROLE.into()]);
        assert!(check_task_request(&r, &req(&partition), t0()).is_ok());
    }

    #[test]
    fn unverified_subject_reads_the_claims() {
        let t = mint(&key("k1", 1), "ops-cli", &[], t0(), HOUR);
        assert_eq!(unverified_subject(&t).as_deref(), Some("ops-cli"));
        assert_eq!(unverified_subject("garbage"), None);
    }
}
