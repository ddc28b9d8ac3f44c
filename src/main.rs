//! The `journeyman` binary: parses arguments and hands over to the library.

/// Every message allocates and frees many small buffers (JSON, envelopes, sled batches);
/// glibc's allocator took about 15 % of the orchestrator's CPU in the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    // Piping into `head` must end quietly, as other command-line tools do, not panic.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = journeyman::ops::cli::Cli::parse_per_command();
    // The demo's progress display is its output; workers log what they do.
    let default = match cli.command {
        journeyman::ops::cli::Cmd::Demo(_)
        | journeyman::ops::cli::Cmd::Chaos(_)
        | journeyman::ops::cli::Cmd::Bench(_) => "warn",
        _ => "info",
    };
    let telemetry = journeyman::ops::cli::init_tracing(cli.global.log_format, default);
    let result = journeyman::ops::cli::run(cli).await;
    // The exporter's last batch goes out before the process ends (process::exit would
    // skip any destructor).
    if let Some(t) = telemetry {
        tokio::task::block_in_place(|| t.shutdown());
    }
    if let Err(e) = result {
        eprintln!("error: {}", journeyman::ops::errors::render(&e));
        std::process::exit(1);
    }
}
