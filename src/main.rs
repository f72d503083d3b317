//! The `icp-gate` command: `run`, `check`, `explain` (docs/operations.md, "Command line").

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use icp_gate::{LogFormat, Shape, check, explain, run};

#[derive(Parser)]
#[command(
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ICP_GATE_COMMIT"), ")"),
    about = "Edge proxy enforcing China's ICP filing rules by HTTP Host and TLS SNI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Worker threads (default: one per CPU).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
        /// How several threads share the work (with --threads 1 there is one thread either way).
        #[arg(long, value_enum, default_value = "per-thread")]
        runtime: Shape,
    },
    /// Validate a config (and the files it names) and exit: 0 if good, 1 with the error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the decision the proxy would take for HOST.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// A host as a client would send it (`Host` header or SNI).
        host: String,
        /// The address the client connected to: it picks the route. Required when the config
        /// has more than one route; with one, its network address is assumed (and said so).
        #[arg(long)]
        dst: Option<IpAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            log_format,
            threads,
            runtime,
        } => run(&config, log_format, threads, runtime),
        Command::Check { config } => check(&config).map(|summary| println!("{summary}")),
        Command::Explain { config, host, dst } => {
            explain(&config, &host, dst).map(|answer| print!("{answer}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icp-gate: {e}");
            ExitCode::FAILURE
        }
    }
}
