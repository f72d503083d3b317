//! The `icp-gate` command: `run`, `check`, `explain`, and its own `completions` and `man` page
//! (docs/operations.md, "Command line").

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
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
        /// The config file (TOML, docs/configuration.md).
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
        /// The config file (TOML, docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the decision the proxy would take for HOST.
    Explain {
        /// The config file (TOML, docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
        /// A host as a client would send it (`Host` header or SNI).
        host: String,
        /// The address the client connected to: it picks the route. Required when the config
        /// has more than one route; with one, its network address is assumed (and said so).
        #[arg(long)]
        dst: Option<IpAddr>,
    },
    /// Print a shell completion script: `icp-gate completions bash > /etc/bash_completion.d/icp-gate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page icp-gate(1) (roff), or write it and one page per subcommand
    /// (icp-gate-run(1), …) into a folder: `icp-gate man --out-dir /usr/local/share/man/man1`.
    Man {
        /// Write every page into this folder instead of printing icp-gate(1).
        #[arg(long)]
        out_dir: Option<PathBuf>,
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
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "icp-gate", &mut out);
            if shell == clap_complete::Shell::Bash {
                out = bash_hyphen_fix(&out);
            }
            write_stdout(&out)
        }
        Command::Man { out_dir } => man(out_dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icp-gate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), icp_gate::Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}

/// The man pages, generated from the same definitions as `--help`.
fn man(out_dir: Option<&std::path::Path>) -> Result<(), icp_gate::Error> {
    // `icp-gate help` is clap's, and has no page of its own.
    let command = Cli::command().disable_help_subcommand(true);
    match out_dir {
        Some(dir) => {
            clap_mangen::generate_to(command, dir)?;
            Ok(())
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command).render(&mut out)?;
            write_stdout(&out)
        }
    }
}

/// clap_complete's bash script spells the state of a subcommand of a hyphenated binary two ways
/// (`icp__gate__subcmd__run` where it is set, `icp__subcmd__gate__subcmd__run` where it is
/// matched), so no subcommand's options ever complete (clap-rs/clap#6421, open at 4.6.12). The
/// matched spelling is put right; once clap is fixed this replaces nothing.
fn bash_hyphen_fix(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace("icp__subcmd__gate", "icp__gate")
        .into_bytes()
}
