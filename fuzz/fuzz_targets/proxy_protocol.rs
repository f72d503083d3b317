//! The PROXY header parser on arbitrary bytes: never panics, decides a header on its own bytes
//! alone (what follows does not matter), answers "incomplete" for every prefix of a header
//! (never "invalid"), and never takes back an answer when more bytes arrive. The first two input
//! bytes choose a split point.

#![no_main]

use icp_gate::internals::{Parsed, parse_proxy_header as parse};
use libfuzzer_sys::fuzz_target;

/// Longest header: v2's 16-byte preamble and the largest length it can give.
const MAX_HEADER: usize = 16 + 65535;
/// Longest v1 header.
const V1_MAX: usize = 107;

fuzz_target!(|input: &[u8]| {
    let Some((split, data)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*split)) % (data.len() + 1);
    let whole = parse(data);
    let prefix = parse(&data[..split]);
    match &whole {
        Parsed::Header { len, addresses } => {
            assert!(
                *len <= data.len() && *len <= MAX_HEADER,
                "{len} of {}",
                data.len()
            );
            assert_eq!(parse(&data[..*len]), whole, "the header alone");
            if split < *len {
                assert_eq!(prefix, Parsed::Incomplete, "a prefix of {split} bytes");
            } else {
                assert_eq!(prefix, whole, "{split} bytes, the header among them");
            }
            if data.starts_with(b"PROXY ") {
                assert!(*len <= V1_MAX, "v1 of {len} bytes");
                assert!(data[..*len].ends_with(b"\r\n"));
                assert!(!data[..*len - 2].windows(2).any(|w| w == b"\r\n"));
            }
            if let Some(a) = addresses {
                assert_eq!(a.client.is_ipv4(), a.dst.is_ipv4(), "{a:?}");
            }
        }
        Parsed::Incomplete => {
            assert!(data.len() < MAX_HEADER);
            if data.starts_with(b"PROXY ") {
                assert!(data.len() < V1_MAX);
            }
            // Fewer bytes than "incomplete" cannot be more.
            assert_eq!(prefix, Parsed::Incomplete, "a prefix of {split} bytes");
        }
        Parsed::Invalid(_) => {
            // Final: more bytes never turn it into a header, or back into "incomplete".
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n");
            more.extend_from_slice(data);
            assert!(matches!(parse(&more), Parsed::Invalid(_)), "taken back");
            // And a prefix is either already refused or still waiting.
            assert!(
                !matches!(prefix, Parsed::Header { .. }),
                "a prefix of {split} bytes"
            );
        }
    }
});
