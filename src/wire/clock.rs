//! Wall-clock text for answers (the block page's `{time}`, HTTP `date`), formatted at most once
//! a second per thread: every request needs it, and formatting a date costs more than the rest
//! of filling in the page.

use std::cell::Cell;
use std::thread::LocalKey;
use std::time::{SystemTime, UNIX_EPOCH};

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
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    cache.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            return text;
        }
        // Both formats have a fixed width; a shorter one would be padded with spaces.
        let mut text = [b' '; N];
        let formatted = format(now);
        let n = formatted.len().min(N);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        last.set((secs, text));
        text
    })
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
}
