//! `gateway`: parse the configuration, set up logging, hand over to the library.

use clap::Parser;
use taskgate_gateway::{Cli, Config};
use taskgate_shared::{
    config::EX_USAGE,
    telemetry::{self, LogFormat, LogOptions},
};

// The proxy allocates per request (pingora's headers and sessions); mimalloc's
// thread-local caches keep that off the system allocator's locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::build(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: bad configuration: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let format = match cli.log_format.parse::<LogFormat>() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gateway: bad configuration: --log-format: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let _guard = telemetry::init(&LogOptions {
        format,
        filter: cli.log.clone(),
        dir: None,
        file_prefix: "gateway".into(),
        max_files: 1,
    })?;
    let prepared = match taskgate_gateway::prepare(config) {
        Ok(p) => p,
        Err(e) if e.is_usage() => {
            eprintln!("gateway: bad configuration: {e}");
            std::process::exit(EX_USAGE);
        }
        Err(e) => return Err(e.into()),
    };
    if cli.check_config {
        println!("configuration ok: {}", prepared.summary());
        return Ok(());
    }
    tracing::info!(summary = %prepared.summary(), "configuration");
    match taskgate_gateway::run(prepared) {
        Ok(()) => Ok(()),
        Err(e) if e.is_usage() => {
            eprintln!("gateway: bad configuration: {e}");
            std::process::exit(EX_USAGE);
        }
        Err(e) => Err(e.into()),
    }
}
