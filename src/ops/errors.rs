//! How a failed command reads on the terminal: one line that names the cause.
//!
//! Errors below the surface carry their source in their own message *and* as `source()`
//! (thiserror's `{source}` plus `#[source]`), so printing the chain naively repeats every
//! cause two or three times ("Connection refused (os error 111): Connection refused (os
//! error 111)"). The broker refusing a login is common enough, and lapin's wording of it
//! obscure enough, to get a sentence of its own that says which setting to fix.

use crate::broker::BrokerError;

/// The message printed after `error: ` when a command fails.
pub fn render(e: &anyhow::Error) -> String {
    if let Some(line) = refused_credentials(e) {
        return line;
    }
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A cause already quoted by the message around it adds nothing.
        if text.is_empty() || out.contains(text.trim_end_matches('.')) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// "The broker refused the credentials", when the chain holds a login refusal.
fn refused_credentials(e: &anyhow::Error) -> Option<String> {
    let refused = e
        .chain()
        .any(|c| c.to_string().contains("ACCESS_REFUSED - Login was refused"));
    if !refused {
        return None;
    }
    let url = e
        .chain()
        .find_map(|c| match c.downcast_ref::<BrokerError>() {
            Some(BrokerError::Connect { url, .. }) => Some(url.clone()),
            _ => None,
        });
    Some(format!(
        "the broker{} refused the user name and password (ACCESS_REFUSED); they are the \
         user:password part of the broker URL, set with --amqp-url or JOURNEYMAN_AMQP_URL",
        url.map(|u| format!(" at {u}")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("IO error: {0}")]
    struct Io(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect: {0}. Is the broker running?")]
    struct Connect(#[source] Io);

    #[test]
    fn a_cause_quoted_by_its_parent_is_printed_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let e = anyhow::Error::new(Connect(Io(io))).context("the orchestrator stopped");
        assert_eq!(
            render(&e),
            "the orchestrator stopped: cannot connect: IO error: Connection refused (os error 111). Is the broker running?"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let e = anyhow::anyhow!("the file is gone").context("cannot read the playbook p.yaml");
        assert_eq!(
            render(&e),
            "cannot read the playbook p.yaml: the file is gone"
        );
    }
}
