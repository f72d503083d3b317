//! Retrying a fallible future with a delay between attempts: the subset of the
//! [`tryhard`](https://docs.rs/tryhard/0.5) API that async-nats calls
//! (`retry_fn(f).retries(n).custom_backoff(b).await`), with its semantics: the first attempt,
//! then up to `n` retries; before retry `k` (counted from 1), `b(k, &error)` gives the delay, or
//! [`RetryPolicy::Break`] to stop with that error.
//!
//! Why it exists: every published `tryhard` asks for tokio's `test-util` feature in its normal
//! dependencies, and Cargo unifies features, so icp-gate's release binary ran tokio's mockable
//! clock, a mutex and a second clock read behind every timer and every time-driver park (2–3 % of
//! the user-space instructions of a request or a TLS tunnel; docs/performance.md). icp-gate's
//! Cargo.toml patches crates.io's `tryhard` with this crate; .ci/run fails if anything brings
//! `test-util` back.
//! If async-nats starts to use more of tryhard's API, the build fails here, not silently.

use std::future::Future;
use std::time::Duration;

/// Starts a retry of the futures that `make` returns.
pub fn retry_fn<F>(make: F) -> RetryFn<F> {
    RetryFn { make, retries: 0 }
}

/// A retry being configured.
pub struct RetryFn<F> {
    make: F,
    retries: u32,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Try again after this delay.
    Delay(Duration),
    /// Stop, with the error of the attempt.
    Break,
}

impl From<Duration> for RetryPolicy {
    fn from(delay: Duration) -> Self {
        RetryPolicy::Delay(delay)
    }
}

impl<F> RetryFn<F> {
    /// At most `retries` attempts after the first.
    pub fn retries(self, retries: u32) -> Self {
        RetryFn { retries, ..self }
    }

    /// Runs the attempts, waiting `backoff(retry, &error)` before each retry.
    pub fn custom_backoff<Fut, T, E, B, R>(
        self,
        mut backoff: B,
    ) -> impl Future<Output = Result<T, E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        B: FnMut(u32, &E) -> R,
        R: Into<RetryPolicy>,
    {
        let RetryFn { mut make, retries } = self;
        async move {
            let mut retry = 0;
            loop {
                let error = match make().await {
                    Ok(value) => return Ok(value),
                    Err(error) => error,
                };
                if retry == retries {
                    return Err(error);
                }
                retry += 1;
                match backoff(retry, &error).into() {
                    RetryPolicy::Delay(delay) => {
                        drop(error);
                        tokio::time::sleep(delay).await;
                    }
                    RetryPolicy::Break => return Err(error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use tokio::time::Instant;

    /// A maker whose attempts fail until `succeed_at` (1-based; 0: never), recording each try.
    fn attempts(
        succeed_at: u32,
        log: &RefCell<Vec<u32>>,
    ) -> impl FnMut() -> std::future::Ready<Result<u32, u32>> {
        move || {
            let mut log = log.borrow_mut();
            let n = log.len() as u32 + 1;
            log.push(n);
            std::future::ready(if n == succeed_at { Ok(n) } else { Err(n) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_the_backoff_until_an_attempt_succeeds() {
        let log = RefCell::new(Vec::new());
        let seen = RefCell::new(Vec::new());
        let started = Instant::now();
        let got = retry_fn(attempts(4, &log))
            .retries(u32::MAX)
            .custom_backoff(|retry, error: &u32| {
                seen.borrow_mut().push((retry, *error));
                Duration::from_millis(100 * retry as u64)
            })
            .await;
        assert_eq!(got, Ok(4));
        assert_eq!(*log.borrow(), [1, 2, 3, 4]);
        // Retry k follows the failure of attempt k, after k × 100 ms.
        assert_eq!(*seen.borrow(), [(1, 1), (2, 2), (3, 3)]);
        assert_eq!(started.elapsed(), Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_with_the_last_error() {
        let log = RefCell::new(Vec::new());
        let got = retry_fn(attempts(0, &log))
            .retries(5)
            .custom_backoff(|_, _: &u32| Duration::from_secs(1))
            .await;
        assert_eq!(got, Err(6));
        assert_eq!(log.borrow().len(), 6, "the first attempt and five retries");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retries_and_break_stop_at_once() {
        let log = RefCell::new(Vec::new());
        let got = retry_fn(attempts(2, &log))
            .custom_backoff(|_, _: &u32| Duration::from_secs(1))
            .await;
        assert_eq!((got, log.borrow().len()), (Err(1), 1));

        let log = RefCell::new(Vec::new());
        let started = Instant::now();
        let got = retry_fn(attempts(3, &log))
            .retries(10)
            .custom_backoff(|retry, _: &u32| {
                if retry < 2 {
                    RetryPolicy::Delay(Duration::from_secs(1))
                } else {
                    RetryPolicy::Break
                }
            })
            .await;
        assert_eq!((got, log.borrow().len()), (Err(2), 2));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
