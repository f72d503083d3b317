//! Worker threads for the per-thread runtime shape: one current-thread tokio runtime per thread,
//! each accepting on its own `SO_REUSEPORT` socket per listener (see `server::Listeners`), so a
//! connection lives its whole life on the thread whose socket the kernel gave it to — no
//! wake-ups across threads and no work stealing, the shape nginx's workers have.
//!
//! The process's main runtime keeps the admin API, signals and reloads; workers serve data
//! listeners only.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::proxy::worker;

/// Running worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's runtime (and the tasks still on it).
    stops: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `n` threads, each running a current-thread runtime (with the metronome, see
    /// [`crate::proxy::io::metronome`]) until [`Workers::stop`].
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("icp-gate-w{i}"))
                .spawn(move || {
                    worker::enter(i);
                    rt.block_on(async {
                        tokio::spawn(crate::proxy::io::metronome());
                        let _ = stopped.await;
                    });
                })?;
            stops.push((stop, thread));
        }
        worker::started(n);
        Ok(Workers { handles, stops })
    }

    /// One handle per worker, in worker order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Ends every worker's runtime, dropping the tasks left on it, and waits for the threads.
    pub fn stop(self) {
        for (stop, thread) in self.stops {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Runs `f` on `worker`'s thread and returns what it returned (for tests).
#[cfg(test)]
pub(crate) fn run_on<T: Send + 'static>(
    worker: &Handle,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    worker.spawn(async move { tx.send(f()).unwrap() });
    rx.recv().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_knows_its_number_and_stops() {
        let workers = Workers::start(3).unwrap();
        assert!(worker::count() >= 3);
        let seen: Vec<usize> = workers
            .handles()
            .iter()
            .map(|h| run_on(h, worker::index))
            .collect();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(worker::index(), 0, "the test thread is not a worker");
        let first = workers.handles()[0].clone();
        workers.stop();
        // A stopped worker's runtime is gone: spawning on it does nothing.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(first.spawn(async move { tx.send(()).unwrap() }));
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
    }
}
