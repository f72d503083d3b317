//! Which worker thread this is. Per-worker state (the origin keep-alive pools) is sharded by it,
//! so a connection's task finds its pool without contending with other threads. The runtime's
//! workers set it; everything else only reads it.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

static COUNT: AtomicUsize = AtomicUsize::new(1);

/// This thread's worker number; 0 on any thread that is not a worker.
pub(crate) fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers the process runs: 1 unless more were [`started`] (the most started at once,
/// should that happen again).
pub(crate) fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling thread as worker `i`.
pub(crate) fn enter(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// Notes that `n` workers run.
pub(crate) fn started(n: usize) {
    COUNT.fetch_max(n, Ordering::Relaxed);
}
