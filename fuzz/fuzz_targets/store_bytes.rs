//! Arbitrary bytes as `snapshot.bin` and as a journal: loading never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| icp_gate::internals::check_state_bytes(data));
