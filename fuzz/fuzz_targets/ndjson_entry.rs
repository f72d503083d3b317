//! One NDJSON registry line (a seed file line, a `replace` body line) parsed into an entry:
//! never panics, and what it accepts is normal: the domain is its own normalised form and has a
//! registrable domain (so it can be matched), the filing number is not blank and fits, and the
//! entry written back as JSON reads as the same entry.

#![no_main]

use icp_gate::registry::{Entry, MAX_ICP_BYTES, normalize_domain};
use icp_gate::wire::host;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    // The domain normaliser alone, on the raw text too.
    if let Ok(domain) = normalize_domain(line) {
        assert_eq!(normalize_domain(&domain).as_ref(), Ok(&domain), "{line:?}");
    }
    let Ok(entry) = Entry::from_json(line) else {
        return;
    };
    assert_eq!(
        normalize_domain(&entry.domain).as_ref(),
        Ok(&entry.domain),
        "{line:?}"
    );
    assert!(
        host::registrable_domain(&entry.domain).is_some(),
        "{line:?}"
    );
    assert!(
        entry
            .domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
        "{:?}",
        entry.domain
    );
    assert!(!entry.icp.trim().is_empty() && entry.icp.len() <= MAX_ICP_BYTES);
    let json = serde_json::to_string(&entry).unwrap();
    assert_eq!(Entry::from_json(&json), Ok(entry), "{json}");
});
