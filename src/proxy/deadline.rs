//! One timer for a succession of deadlines: a keep-alive connection's "next request head by"
//! and "origin response by", one after the other, request after request.
//!
//! Moving a tokio timer removes it from the timer wheel and inserts it again, which costs about
//! as much as parsing a request; so does a fresh `tokio::time::timeout` per request. Deadlines
//! mostly move later, so the timer is left where it is when the new deadline is later and moved
//! on only when it fires before the deadline. It is moved at once only when a deadline comes
//! earlier than the timer (a timeout shorter than the one before it).

use std::future::Future;
use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// A deadline over a pinned [`Sleep`] owned by the caller (see the module comment).
pub(crate) struct Deadline<'a> {
    timer: Pin<&'a mut Sleep>,
    at: Instant,
}

impl<'a> Deadline<'a> {
    /// A deadline at the timer's.
    pub(crate) fn new(timer: Pin<&'a mut Sleep>) -> Deadline<'a> {
        let at = timer.deadline();
        Deadline { timer, at }
    }

    /// Sets the deadline to `at`.
    pub(crate) fn set(&mut self, at: Instant) {
        if at < self.timer.deadline() {
            self.timer.as_mut().reset(at);
        }
        self.at = at;
    }

    /// Resolves once the deadline has passed.
    pub(crate) async fn passed(&mut self) {
        loop {
            self.timer.as_mut().await;
            if self.timer.deadline() >= self.at {
                return;
            }
            let at = self.at;
            self.timer.as_mut().reset(at);
        }
    }

    /// `work`, or `None` once the deadline has passed first.
    pub(crate) async fn within<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            done = work => Some(done),
            () = self.passed() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_is_kept_and_an_earlier_one_moves_the_timer() {
        let start = Instant::now();
        let timer = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(timer);
        let mut deadline = Deadline::new(timer);
        let at = |secs| start + Duration::from_secs(secs);

        // Earlier than the timer: moved at once.
        deadline.set(at(5));
        assert_eq!(deadline.timer.deadline(), at(5));
        deadline.passed().await;
        assert_eq!(Instant::now(), at(5));

        // Later than the timer: the timer stays, fires (at once: 5 s has passed), and is moved
        // on to the deadline.
        deadline.set(at(60));
        assert_eq!(deadline.timer.deadline(), at(5));
        deadline.passed().await;
        assert_eq!(Instant::now(), at(60));
    }

    #[tokio::test(start_paused = true)]
    async fn within_returns_the_work_or_none_at_the_deadline() {
        let timer = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(timer);
        let mut deadline = Deadline::new(timer);
        let quick = deadline.within(tokio::time::sleep(Duration::from_secs(4)));
        assert_eq!(quick.await, Some(()));
        let start = Instant::now();
        deadline.set(start + Duration::from_secs(3));
        let slow = deadline.within(tokio::time::sleep(Duration::from_secs(4)));
        assert_eq!(slow.await, None);
        assert_eq!(Instant::now(), start + Duration::from_secs(3));
    }
}
