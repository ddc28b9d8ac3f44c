//! The `journeyman` binary: parses arguments and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = journeyman::cli::Cli::parse();
    journeyman::cli::init_tracing(cli.global.log_format);
    if let Err(e) = journeyman::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
