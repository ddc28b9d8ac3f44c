//! Journeys and replies as people read them in a terminal.

use anyhow::Result;
use serde_json::{Map, Value};

use crate::wire::protocol::{Envelope, MessageType};

pub(crate) fn print_reply(reply: &Envelope, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&reply.payload)?);
    } else if reply.message_type == MessageType::Error {
        let code = reply.payload["code"].as_str().unwrap_or("error");
        let msg = reply.payload["message"].as_str().unwrap_or("");
        eprintln!("refused ({code}): {msg}");
        if let Some(checks) = reply.payload["details"]["checks"].as_array() {
            for c in checks {
                let mark = if c["passed"] == true { "pass" } else { "FAIL" };
                eprintln!(
                    "  [{mark}] {:<28} {}",
                    c["name"].as_str().unwrap_or(""),
                    c["message"].as_str().unwrap_or("")
                );
            }
        }
    } else {
        print_state(&reply.payload);
    }
    if reply.message_type == MessageType::Error {
        std::process::exit(1);
    }
    Ok(())
}

/// A journey state, for people.
pub fn print_state(p: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!("client:      {}", s(&p["client_id"]));
    println!(
        "stage:       {} (since {})",
        s(&p["stage"]),
        when(&p["stage_started_at"], chrono::Utc::now())
    );
    let done: Vec<String> = p["completed_stages"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    println!(
        "completed:   {}",
        if done.is_empty() {
            "-".into()
        } else {
            done.join(", ")
        }
    );
    println!(
        "started:     {}",
        when(&p["started_at"], chrono::Utc::now())
    );
    println!("status:      {}", s(&p["status"]));
    println!("playbook:    {}", s(&p["playbook"]));
    if let Some(pz) = p["paused"].as_object() {
        println!(
            "paused at:   task {} after {} attempts: {}",
            s(&pz["task_id"]),
            pz["attempts"],
            s(&pz["last_error"])
        );
    }
    if let Some(r) = p["rollback"].as_object() {
        println!(
            "rollback:    {} -> {} ({}){}: {}",
            s(&r["from"]),
            s(&r["to"]),
            if r["automatic"] == true {
                "automatic"
            } else {
                "manual"
            },
            if r["failed"] == true {
                ", FAILED: retry with journey rollback"
            } else {
                ""
            },
            s(&r["reason"])
        );
    }
    if let Some(checks) = p["gate"]["checks"].as_array() {
        println!(
            "gate:        {}",
            if p["gate"]["passed"] == true {
                "passed"
            } else {
                "not passed"
            }
        );
        for c in checks {
            let mark = if c["passed"] == true { "pass" } else { "FAIL" };
            println!("  [{mark}] {:<28} {}", s(&c["name"]), s(&c["message"]));
        }
    }
    if let Some(w) = p["work"].as_object() {
        let empty = Map::new();
        let _ = &empty;
        println!("work:        {} {}", s(&w["stage"]), s(&w["status"]));
        if let Some(tasks) = w["tasks"].as_array() {
            println!(
                "  {:<24} {:<32} {:<14} {:>8}  last error",
                "task", "intent", "status", "attempts"
            );
            for t in tasks {
                println!(
                    "  {:<24} {:<32} {:<14} {:>8}  {}",
                    s(&t["task_id"]),
                    s(&t["intent"]),
                    s(&t["status"]),
                    t["attempts"].as_u64().unwrap_or(0),
                    t["last_error"].as_str().unwrap_or("")
                );
            }
        }
    }
}

/// A timestamp of the protocol (RFC 3339, nanoseconds) as people read it: to the second,
/// and how long ago.
fn when(v: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(text) = v.as_str() else {
        return "-".into();
    };
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(t) => {
            let t = t.with_timezone(&chrono::Utc);
            let ago = (now - t).num_milliseconds().max(0) as f64 / 1e3;
            format!(
                "{} UTC, {} ago",
                t.format("%Y-%m-%d %H:%M:%S"),
                crate::domain::report::human(ago)
            )
        }
        Err(_) => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_to_the_second_with_their_age() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:05:30Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let v = Value::from("2026-12-01T10:00:00.123456789Z");
        assert_eq!(when(&v, now), "2026-12-01 10:00:00 UTC, 5m30s ago");
        assert_eq!(when(&Value::Null, now), "-");
    }
}
