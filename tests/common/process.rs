//! The real `icp-gate` binary as a child process, with its JSON log lines.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{SEED, config};

pub const BIN: &str = env!("CARGO_BIN_EXE_icp-gate");

/// Writes the standard test config (see [`config`]) with the test seed into `dir`.
pub fn write_config(dir: &Path, origin: SocketAddr, extra: &str) -> PathBuf {
    std::fs::write(dir.join("seed.ndjson"), SEED).unwrap();
    std::fs::write(dir.join("admin.token"), "test-token\n").unwrap();
    let path = dir.join("icp-gate.toml");
    std::fs::write(
        &path,
        config(origin, extra).replace("{dir}", &dir.display().to_string()),
    )
    .unwrap();
    path
}

/// `icp-gate run --log-format json --config CONFIG ARGS…`, started through `wrapper` (a command
/// that execs its arguments, such as `prlimit`, so the pid is icp-gate's) unless it is empty.
pub fn run_command(wrapper: &[&str], config: &Path, args: &[&str]) -> Command {
    let mut command = match wrapper {
        [] => Command::new(BIN),
        [program, rest @ ..] => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
    };
    command
        .args(["run", "--log-format", "json", "--config"])
        .arg(config)
        .args(args);
    command
}

/// The running binary, its JSON log lines arriving on a channel.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    /// Indexes into `seen` of the lines [`Proc::wait_for`] has returned.
    claimed: Vec<usize>,
}

impl Proc {
    pub fn start(config: &Path) -> Proc {
        Proc::start_with(config, &[])
    }

    /// Like [`Proc::start`], with more `run` arguments.
    pub fn start_with(config: &Path, args: &[&str]) -> Proc {
        Proc::spawn(run_command(&[], config, args))
    }

    /// Runs `command`, which must start icp-gate with `--log-format json` (itself, or through a
    /// wrapper that execs it, so the pid is icp-gate's).
    pub fn spawn(mut command: Command) -> Proc {
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
            claimed: Vec::new(),
        }
    }

    /// The next log line whose `msg` is `msg`, waiting for it if need be: each call returns a
    /// further one. Lines read while waiting for another message count (the order in which
    /// the listeners, the admin listener and "ready" log is not fixed).
    pub fn wait_for(&mut self, msg: &str) -> serde_json::Value {
        let unclaimed =
            (0..self.seen.len()).find(|i| self.seen[*i]["msg"] == msg && !self.claimed.contains(i));
        if let Some(i) = unclaimed {
            self.claimed.push(i);
            return self.seen[i].clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {msg:?} log line; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            if line["msg"] == msg {
                self.claimed.push(self.seen.len() - 1);
                return line;
            }
        }
    }

    /// Waits for the access-log line of a request or connection for `host`.
    pub fn access_line(&mut self, host: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no access line for {host:?}; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            if line["target"] == "access" && line["host"] == host {
                return line;
            }
        }
    }

    /// The first line whose `msg` is `msg`, whether or not [`Proc::wait_for`] returned it
    /// (asking again gives the same line); waits for one if none has arrived.
    pub fn logged(&mut self, msg: &str) -> serde_json::Value {
        match self.seen(msg) {
            Some(line) => line.clone(),
            None => self.wait_for(msg),
        }
    }

    /// Every line with `msg` that has arrived so far, without waiting.
    pub fn received(&mut self, msg: &str) -> Vec<serde_json::Value> {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen
            .iter()
            .filter(|l| l["msg"] == msg)
            .cloned()
            .collect()
    }

    /// A line whose `msg` is `msg` among those already received.
    pub fn seen(&self, msg: &str) -> Option<&serde_json::Value> {
        self.seen.iter().find(|l| l["msg"] == msg)
    }

    pub fn admin_addr(&mut self) -> SocketAddr {
        self.logged("admin listening")["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn listener_addr(&mut self) -> SocketAddr {
        self.wait_for("listening")["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
