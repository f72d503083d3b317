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
                _ = hup.recv() => if let Err(e) = server.reload_from(path).await {
                    error!(error = %one_line(&e), "reload rejected; the old config keeps serving");
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

/// `error` on one line, for a log line: TOML's syntax errors quote the offending source over
/// several lines (`  |`, `2 | state_dir = 5`, `  |     ^`), which a text log would split into
/// lines that no longer say what they belong to. The quoted line stays, in backquotes (it may be
/// all that names the key); the gutter and the carets go.
fn one_line(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let mut parts = Vec::new();
    for line in text.lines().map(str::trim) {
        let after_number = line.trim_start_matches(|c: char| c.is_ascii_digit());
        match after_number.trim_start().strip_prefix('|') {
            // `2 | state_dir = 5`: the source line.
            Some(source) if after_number.len() < line.len() => {
                parts.push(format!("`{}`", source.trim()));
            }
            // `|` or `|     ^^^`: the gutter and the carets.
            Some(_) => {}
            None if line.is_empty() => {}
            None => parts.push(line.to_string()),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_syntax_error_is_one_line_with_file_position_and_message() {
        let dir = std::path::Path::new("/etc/icp-gate/icp-gate.toml");
        let e = Config::parse("[registry]\nstate_dir = \"x\"\n[limits\n", dir).unwrap_err();
        assert!(e.to_string().contains('\n'), "{e}");
        let line = one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("/etc/icp-gate/icp-gate.toml: TOML parse error at line 3"),
            "{line}"
        );
        assert!(
            line.ends_with(": `[limits`: unclosed table, expected `]`"),
            "{line}"
        );
        // Errors that are already one line stay as they are.
        let e = Config::load(std::path::Path::new("/nonexistent/icp-gate.toml")).unwrap_err();
        assert_eq!(one_line(&e), e.to_string());
    }
}
