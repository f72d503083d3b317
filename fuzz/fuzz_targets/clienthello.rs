//! The one-shot parser and the resumable one must agree however the bytes arrive, and neither
//! may panic. The first two input bytes choose where the input is split into two TCP reads.

#![no_main]

use icp_gate::wire::clienthello::{ClientHelloParser, Parse, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((split, data)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*split)) % (data.len() + 1);
    let whole = parse(data);

    let mut parser = ClientHelloParser::new(usize::MAX);
    let first = parser.advance(&data[..split]);
    let second = parser.advance(data);
    if first != Parse::Incomplete {
        assert_eq!(first, second, "a final answer changed");
    }
    assert_eq!(second, whole, "split at {split}");
    if let Parse::Done(info) = &whole {
        assert!(info.len <= data.len());
    }
});
