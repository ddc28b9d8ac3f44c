//! The CLI's errors and help, from the built binary, as a person meets them: one line that
//! names the cause and the setting to change, no lapin log lines, no colour codes in a
//! log, and a `--help` with only the options the command reads.

use std::process::Output;

use crate::helpers::*;

fn journeyman(args: &[&str], env: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_journeyman"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JOURNEYMAN_HTTP_ADDR")
        .env_remove("JOURNEYMAN_AMQP_URL")
        .env_remove("JOURNEYMAN_AUTH_KEYS")
        .env_remove("JOURNEYMAN_AUTH_KEYS_FILE")
        .envs(env.iter().copied())
        .output()
        .expect("run the journeyman binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The test broker's URL with another password.
fn wrong_password_url() -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://guest:not-the-password@{host}")
}

#[test]
fn a_refused_login_is_one_line_naming_the_setting_without_lapin_logs() {
    let o = journeyman(
        &["journey", "status", "acme", "--timeout", "5s"],
        &[("JOURNEYMAN_AMQP_URL", &wrong_password_url())],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    println!("$ JOURNEYMAN_AMQP_URL=<wrong password> journeyman journey status acme\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].starts_with("error: the broker at ")
            && lines[0].contains("refused the user name and password")
            && lines[0].contains("--amqp-url or JOURNEYMAN_AMQP_URL"),
        "{err}"
    );
    assert!(
        !lines[0].contains("not-the-password"),
        "the password is hidden"
    );
    assert!(!err.contains("lapin") && !err.contains("ERROR"), "{err}");
}

#[test]
fn a_cause_is_printed_once() {
    let o = journeyman(
        &[
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "journey",
            "status",
            "acme",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    println!(
        "$ journeyman --amqp-url amqp://guest:guest@127.0.0.1:1/%2f journey status acme\n{err}"
    );
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(err.contains("--amqp-url / JOURNEYMAN_AMQP_URL"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_data_dir_that_is_a_file_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a store").unwrap();
    let file = file.to_str().unwrap();
    for args in [
        vec![
            "orchestrator",
            "--insecure-no-auth",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            file,
        ],
        vec!["store", "stats", "--data-dir", file],
        vec!["store", "compact", "--data-dir", file],
    ] {
        let o = journeyman(&args, &[]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains(&format!("the data directory {file} is not a directory")),
            "journeyman {args:?}: {err}"
        );
        assert!(!err.to_lowercase().contains("corrupt"), "{err}");
    }
}

#[test]
fn a_busy_http_port_fails_before_the_data_dir_is_created_and_logs_have_no_colours() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let o = journeyman(
        &[
            "--namespace",
            "t-busy-port",
            "orchestrator",
            "--insecure-no-auth",
            "--http-addr",
            &addr,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("JOURNEYMAN_AMQP_URL", &amqp_url())],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    println!("$ journeyman orchestrator --http-addr {addr} (busy) ...\n{err}");
    assert!(
        err.contains(&format!("cannot serve HTTP on {addr}")) && err.contains("--http-addr"),
        "{err}"
    );
    assert!(!data.exists(), "the data directory was not created");
    // stderr is a pipe here: the warning about --insecure-no-auth is logged without colour.
    assert!(
        err.contains("WARN") && err.contains("authentication is OFF"),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "no ANSI codes off a terminal: {err:?}"
    );
    drop(busy);
}

#[test]
fn host_names_resolve_and_a_bad_duration_lists_the_valid_forms() {
    let o = journeyman(&["--http-addr", "localhost:1", "journey", "list"], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("cannot reach the orchestrator's HTTP API at http://127.0.0.1:1"),
        "localhost resolved, then nothing listens: {err}"
    );

    let o = journeyman(&["token", "issue", "--agent", "x", "--ttl", "forever"], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    println!("$ journeyman token issue --agent x --ttl forever\n{err}");
    assert!(
        err.contains("'forever' is not a duration") && err.contains("30s, 15m, 24h, 7d"),
        "{err}"
    );
}

#[test]
fn help_shows_only_the_options_a_command_reads_and_the_broker_default() {
    let help = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push("--help");
        let o = journeyman(&a, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let agents = help(&["agents"]);
    assert!(agents.contains("--amqp-url") && agents.contains("--auth-keys-file"));
    assert!(
        !agents.contains("--http-addr") && !agents.contains("--auth-token"),
        "{agents}"
    );
    let list = help(&["journey", "list"]);
    assert!(list.contains("--http-addr"));
    assert!(
        !list.contains("--amqp-url") && !list.contains("--queue-type"),
        "{list}"
    );
    let orchestrator = help(&["orchestrator"]);
    assert!(
        orchestrator.contains("[default: amqp://guest:***@127.0.0.1:5672/%2f"),
        "{orchestrator}"
    );
    assert!(orchestrator.contains("--http-addr") && !orchestrator.contains("--auth-token"));
    // Every shared option is still listed at the top, and still accepted anywhere.
    let top = help(&[]);
    for flag in [
        "--amqp-url",
        "--namespace",
        "--auth-token",
        "--http-addr",
        "--queue-type",
    ] {
        assert!(top.contains(flag), "{flag} in journeyman --help");
    }
}

#[test]
fn the_demo_reads_well_in_a_log() {
    // stderr is a pipe: plain progress lines, no cursor codes, the final line once; the
    // demo runs in a namespace of its own and deletes it.
    let o = journeyman(
        &[
            "demo",
            "--journeys",
            "5",
            "--failure-rate",
            "0",
            "--timeout",
            "2m",
        ],
        &[("JOURNEYMAN_AMQP_URL", &amqp_url())],
    );
    let (out, err) = (stdout(&o), stderr(&o));
    println!("$ journeyman demo --journeys 5 --failure-rate 0 2>&1 | cat\n{err}{out}");
    assert!(o.status.success(), "{err}");
    assert!(!err.contains('\x1b'), "no escape codes in a log: {err:?}");
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with('[')).collect();
    assert!(!progress.is_empty(), "{err}");
    assert!(
        progress
            .iter()
            .all(|l| l.contains("sandbox ") && l.contains("| tasks ")),
        "{err}"
    );
    assert_eq!(
        progress.iter().filter(|l| l.contains("done: ")).count(),
        1,
        "the final line once: {err}"
    );
    let last = progress.last().unwrap();
    assert!(
        last.contains("done: ") && last.contains("production 0 in, 5/5 rolled out"),
        "{last}"
    );
    assert!(
        out.contains("== journeyman demo summary ==") && out.contains("dead letters:        0"),
        "{out}"
    );
}
