//! `icp-gate run`: the process around the server: the tokio runtime in the shape asked for, the
//! worker threads, and the signals (SIGHUP reloads, SIGTERM and SIGINT drain and stop).

use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::config::Config;
use crate::observe::logging::{self, LogFormat};
use crate::runtime::server::{Listeners, ServerHandle};
use crate::runtime::workers::Workers;

/// The runtime shape for more than one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// One current-thread runtime per thread, each accepting on its own `SO_REUSEPORT` socket;
    /// a connection stays on the thread that accepted it (nginx's and Envoy's shape).
    PerThread,
    /// One tokio multi-thread runtime: threads share one socket and steal each other's tasks.
    WorkStealing,
}

/// What the commands fail with: the message is printed as `icp-gate: {error}`.
pub type Error = Box<dyn std::error::Error>;

/// `icp-gate run`: serves `path`'s config until SIGTERM or SIGINT, reloading it on SIGHUP.
pub fn run(
    path: &Path,
    format: LogFormat,
    threads: Option<u16>,
    shape: Shape,
) -> Result<(), Error> {
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
        tokio::spawn(crate::proxy::io::metronome());
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
