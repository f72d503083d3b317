//! A real `nats-server` with JetStream for the fleet tests: started on a free loopback port with
//! its own store folder, stopped by pid when dropped. The Debian package `nats-server` provides
//! it (the README's setup step); a test that needs it fails, naming the install, without it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    extra: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

/// The `nats-server` binary, from `PATH` or where Debian puts it.
pub fn binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push("/usr/sbin/nats-server".into());
    candidates.push("/usr/bin/nats-server".into());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: the fleet tests run a real NATS server. Install it \
                 with `apt-get update && apt-get install -y nats-server` (the README's setup \
                 step; .ci/run does it when missing)"
            )
        })
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    /// `nats-server -js` on a free port with a fresh store folder.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("jetstream");
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            store,
            extra: Vec::new(),
            _dir: Some(dir),
        };
        s.run();
        s
    }

    /// `nats-server -c CONFIG` (a config file naming its own port, store and topology); `port`
    /// is the client port the file sets.
    pub fn with_config(config: &Path, port: u16) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port,
            store: PathBuf::new(),
            extra: vec!["-c".into(), config.display().to_string()],
            _dir: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let mut command = Command::new(binary());
        if self.extra.is_empty() {
            command
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(&self.store);
        } else {
            command.args(&self.extra);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {addr}"
            );
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server exited at start: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL to its pid); its store stays for [`NatsServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes it read its config file again (SIGHUP), as `nats-server --signal reload` does.
    pub fn reload(&self) {
        let child = self.child.as_ref().expect("nats-server running");
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: a signal to the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
