//! The `icp-gate` command: `run`, `check`, `explain` (SPEC §9).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use icp_gate::config::Config;
use icp_gate::core::decision::{HostInput, Policy, decide};
use icp_gate::core::routes::RouteTable;
use icp_gate::observe::logging::{self, LogFormat};
use icp_gate::proxy::state::Generation;
use icp_gate::registry;
use icp_gate::runtime::server::{Listeners, ServerHandle};
use icp_gate::runtime::workers::Workers;
use icp_gate::wire::host::{self};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    version,
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
        /// Destination address (default: the first mainland route's network address).
        #[arg(long)]
        dst: Option<IpAddr>,
    },
}

/// The runtime shape for more than one thread.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Shape {
    /// One current-thread runtime per thread, each accepting on its own `SO_REUSEPORT` socket;
    /// a connection stays on the thread that accepted it (nginx's and Envoy's shape).
    PerThread,
    /// One tokio multi-thread runtime: threads share one socket and steal each other's tasks.
    WorkStealing,
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
        Command::Check { config } => check(&config),
        Command::Explain { config, host, dst } => explain(&config, &host, dst),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icp-gate: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

fn run(path: &Path, format: LogFormat, threads: Option<u16>, shape: Shape) -> Result<(), Error> {
    // Held to the end of `run`, so "stopped" and everything before it are written out.
    let _log = logging::init(format);
    let config = Config::load(path)?;
    let threads = threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    // One thread: everything runs on this thread, with no wake-ups across threads. Per-thread:
    // this thread keeps the admin API, signals and reloads; the workers serve the data listeners.
    let (mut rt, workers) = match (threads, shape) {
        (1, _) => (tokio::runtime::Builder::new_current_thread(), None),
        (n, Shape::PerThread) => (
            tokio::runtime::Builder::new_current_thread(),
            Some(Workers::start(n)?),
        ),
        (n, Shape::WorkStealing) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.worker_threads(n);
            (rt, None)
        }
    };
    let rt = rt.enable_all().build()?;
    let result = rt.block_on(async {
        tokio::spawn(icp_gate::proxy::io::metronome());
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let listeners = match &workers {
            Some(w) => Listeners::bind_for_workers(&config, w)?,
            None => Listeners::bind(&config)?,
        };
        let server = ServerHandle::start(config, listeners).await?;
        info!("ready");
        loop {
            tokio::select! {
                _ = hup.recv() => match Config::load(path) {
                    Ok(new) => {
                        if let Err(e) = server.reload(new).await {
                            error!(error = %e, "reload rejected; the old config keeps serving");
                        }
                    }
                    Err(e) => error!(error = %e, "reload rejected; the old config keeps serving"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        server.shutdown().await;
        Ok::<(), Error>(())
    });
    // Whatever the drain left on the workers ends with their runtimes.
    if let Some(w) = workers {
        w.stop();
    }
    if result.is_ok() {
        info!("stopped");
    }
    result
}

fn check(path: &Path) -> Result<(), Error> {
    let config = Config::load(path)?;
    Generation::new(config.clone())?;
    let snapshot = registry::inspect(&config.registry)?;
    println!(
        "{}: ok (listeners: {}, routes: {}, registry: revision {}, {} entries)",
        path.display(),
        config.listeners.len(),
        config.routes.len(),
        snapshot.revision(),
        snapshot.len()
    );
    Ok(())
}

fn explain(path: &Path, raw_host: &str, dst: Option<IpAddr>) -> Result<(), Error> {
    let config = Config::load(path)?;
    let snapshot = registry::inspect(&config.registry)?;
    let policy = Policy::new(RouteTable::new(config.routes.clone()), &config.policy);
    let dst = match dst {
        Some(ip) => ip,
        None => config
            .routes
            .iter()
            .find(|r| r.mainland)
            .or(config.routes.first())
            .map(|r| r.dst.network())
            .ok_or("no route to take a destination from; pass --dst")?,
    };
    let parsed = host::parse_authority(raw_host.as_bytes());
    let input = HostInput::typed(raw_host, &parsed);
    let v = decide(dst, input, &snapshot, &policy);
    let host_line = match &parsed {
        Ok(h) => h.to_text().into_owned(),
        Err(e) => format!("{raw_host:?} ({e})"),
    };
    let route = v.route.map_or("none".to_string(), |r| {
        let mode = r.mode.unwrap_or(policy.mode);
        format!(
            "{} ({}, {})",
            r.dst,
            if r.mainland {
                "mainland"
            } else {
                "not mainland"
            },
            mode.as_str()
        )
    });
    let matched = v.matched.map_or("-".to_string(), |e| {
        format!(
            "{} ({}, {}, access_here={})",
            e.domain,
            e.icp,
            e.status.as_str(),
            e.access_here
        )
    });
    println!("host:        {host_line}");
    println!("destination: {dst}");
    println!("route:       {route}");
    println!("decision:    {}", v.decision.as_str());
    println!("reason:      {}", v.reason.as_str());
    println!("matched:     {matched}");
    println!("registrable: {}", v.registrable.unwrap_or("-"));
    Ok(())
}
