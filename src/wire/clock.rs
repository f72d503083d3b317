//! Wall-clock text for answers (the block page's `{time}`, HTTP `date`), formatted at most once
//! a second per thread: every request needs it, and formatting a date costs more than the rest
//! of filling in the page.

use std::cell::Cell;
use std::thread::LocalKey;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second formatted and its text, per thread.
type Cache<const N: usize> = Cell<(u64, [u8; N])>;

/// The current time as RFC 3339 to the second (`2026-11-29T10:00:00Z`).
pub(crate) fn rfc3339() -> [u8; 20] {
    thread_local! {
        static LAST: Cache<20> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    once_a_second(&LAST, |now| {
        humantime::format_rfc3339_seconds(now).to_string()
    })
}

/// The current time as an HTTP date (`Sun, 29 Nov 2026 10:00:00 GMT`).
pub(crate) fn http_date() -> [u8; 29] {
    thread_local! {
        static LAST: Cache<29> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    once_a_second(&LAST, httpdate::fmt_http_date)
}

fn once_a_second<const N: usize>(
    cache: &'static LocalKey<Cache<N>>,
    format: impl FnOnce(SystemTime) -> String,
) -> [u8; N] {
    let secs = coarse_secs();
    cache.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            return text;
        }
        // Both formats have a fixed width; a shorter one would be padded with spaces.
        let mut text = [b' '; N];
        let formatted = format(UNIX_EPOCH + Duration::from_secs(secs));
        let n = formatted.len().min(N);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        last.set((secs, text));
        text
    })
}

/// Seconds since the epoch from the kernel's coarse clock: a read of the time the kernel last
/// ticked (some milliseconds old), without the TSC read and conversion of an exact clock, which
/// texts to the second do not need.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn coarse_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r == 0 {
        u64::try_from(ts.tv_sec).unwrap_or(0)
    } else {
        exact_secs()
    }
}

#[cfg(not(target_os = "linux"))]
fn coarse_secs() -> u64 {
    exact_secs()
}

fn exact_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_fill_their_width() {
        let rfc = rfc3339();
        assert_eq!(rfc[4], b'-');
        assert_eq!(rfc[19], b'Z');
        let date = http_date();
        assert_eq!(&date[25..], b" GMT");
        assert_eq!(date[3], b',');
    }

    #[test]
    fn the_coarse_clock_is_within_a_second_of_the_exact_one() {
        let (before, coarse, after) = (exact_secs(), coarse_secs(), exact_secs());
        assert!(
            before - 1 <= coarse && coarse <= after,
            "{before} {coarse} {after}"
        );
    }
}
