//! A state folder (seed snapshot + journal records the input chooses) with one byte changed:
//! loading refuses, or drops only a damaged last record, never a shorter registry otherwise.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| icp_gate::internals::check_damaged_state(data));
