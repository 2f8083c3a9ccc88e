//! `worker` binary: parse the command line and config, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use taskgate_shared::{
    config::EX_USAGE,
    telemetry::{self, LogFormat, LogOptions},
};
use taskgate_worker::{cli::Cli, cli::Command, config::Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The egress jail runs in an executor's namespace with the executor's environment:
    // it needs no configuration, logging or runtime.
    if let Command::EgressJail { socket, port, argv } = &cli.command {
        let code = taskgate_worker::egress::jail::run(socket, *port, argv);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let run_args = match &cli.command {
        Command::Run(r) => Some(r.as_ref()),
        _ => None,
    };
    let config = match Config::load(&cli, run_args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    let format = match config
        .common
        .log_format
        .as_deref()
        .map(str::parse::<LogFormat>)
    {
        None => LogFormat::auto(),
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("worker: invalid configuration: --log-format: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    let _guard = match telemetry::init(&LogOptions {
        format,
        filter: config
            .common
            .log_level
            .clone()
            .unwrap_or_else(|| "info".into()),
        dir: config.common.log_dir.clone(),
        file_prefix: "worker".into(),
        max_files: 14,
    }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("worker: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(taskgate_worker::run(&cli, &config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
