//! Redaction: the one place that decides what of a message is too secret to print. Every
//! surface that shows an envelope, a header or an error (`journeyman dlq show`, text and
//! `--json`, the JSON API, the dashboard, log lines) passes it through here first, so a
//! signed token never leaves the process by being displayed.
//!
//! What counts as secret: the value of a field named like a credential (`auth_token`,
//! `token`, `secret`, `password`, `private_key`, ...), and anything anywhere that looks
//! like a JWT (three base64url parts, the first a JSON header: `eyJ...`). A redacted
//! token keeps what helps a person without helping an attacker: its length and key id.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// Field names whose string values are credentials, compared lowercase.
const SECRET_FIELDS: [&str; 8] = [
    "auth_token",
    "token",
    "secret",
    "password",
    "private_key",
    "authorization",
    "api_key",
    "webhook_token",
];

/// Redacts one token (or any secret string): `<redacted: N bytes, kid K>`. The `kid` is
/// read from the header only when it is short and printable.
pub fn redact_token(token: &str) -> String {
    if token.is_empty() {
        return String::new();
    }
    match token_kid(token) {
        Some(kid) => format!("<redacted: {} bytes, kid {kid}>", token.len()),
        None => format!("<redacted: {} bytes>", token.len()),
    }
}

fn token_kid(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let kid = v.get("kid")?.as_str()?;
    let ok = kid.len() <= 64
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| kid.to_string())
}

/// Redacts a JSON value in place: secret fields, and JWT-looking strings anywhere.
pub fn redact_json(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, x) in map.iter_mut() {
                let lower = k.to_ascii_lowercase();
                match x {
                    Value::String(s)
                        if SECRET_FIELDS.contains(&lower.as_str()) && !s.is_empty() =>
                    {
                        *s = redact_token(s);
                    }
                    _ => redact_json(x),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        Value::String(s) => {
            if let Some(r) = redact_in_text(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

/// Text with every JWT-looking run replaced by its redaction (a log line, an error, a
/// header value, a body that is not JSON).
pub fn redact_text(text: &str) -> String {
    redact_in_text(text).unwrap_or_else(|| text.to_string())
}

/// `None` when there is nothing to redact, so the common case allocates nothing.
fn redact_in_text(text: &str) -> Option<String> {
    if !text.contains("eyJ") {
        return None;
    }
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(i) = rest.find("eyJ") {
        // The token starts at "eyJ" only if what precedes is not part of a longer word.
        let before_ok = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        let len = rest[i..]
            .find(|c: char| !is_part(c))
            .unwrap_or(rest.len() - i);
        let candidate = &rest[i..i + len];
        out.push_str(&rest[..i]);
        if before_ok && looks_like_jwt(candidate) {
            out.push_str(&redact_token(candidate));
            changed = true;
        } else {
            out.push_str(candidate);
        }
        rest = &rest[i + len..];
        if len == 0 {
            // Unreachable ("eyJ" is three part characters), but never loop forever.
            break;
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// Three non-empty-header base64url parts (the signature may be empty, as in `alg: none`).
fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3 && parts[0].len() >= 4 && !parts[1].is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKEN: &str = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCIsImtpZCI6Im9wcy0xIn0.eyJzdWIiOiJvcHMtY2xpIn0.c2lnbmF0dXJl";

    #[test]
    fn a_token_keeps_its_length_and_kid_only() {
        assert_eq!(
            redact_token(TOKEN),
            format!("<redacted: {} bytes, kid ops-1>", TOKEN.len())
        );
        assert_eq!(redact_token("not-a-jwt"), "<redacted: 9 bytes>");
        assert_eq!(redact_token(""), "");
    }

    #[test]
    fn json_fields_and_tokens_anywhere() {
        let mut v = json!({
            "security": {"auth_token": TOKEN},
            "payload": {"note": format!("copied {TOKEN} here"), "list": [TOKEN, 1]},
            "webhook_token": "s3cret-value",
            "Password": "hunter2",
            "client_id": "acme",
        });
        redact_json(&mut v);
        let text = v.to_string();
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(
            !text.contains("s3cret-value") && !text.contains("hunter2"),
            "{text}"
        );
        assert_eq!(v["client_id"], "acme");
        assert!(
            v["payload"]["note"]
                .as_str()
                .unwrap()
                .starts_with("copied <redacted")
        );
    }

    #[test]
    fn text_keeps_everything_but_tokens() {
        let line = format!("refused: token={TOKEN}, from agent-x");
        let r = redact_text(&line);
        assert!(!r.contains(TOKEN) && r.starts_with("refused: token=<redacted"));
        assert!(r.ends_with(", from agent-x"), "{r}");
        for keep in ["plain text", "keyJohn.a.b", "eyJ", "eyJabc", "x eyJab.c"] {
            assert_eq!(redact_text(keep), keep);
        }
    }
}
