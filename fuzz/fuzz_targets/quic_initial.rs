//! The QUIC Initial reader on hostile input: raw datagrams (header parsing and the cryptography's
//! refusals), and, since random bytes almost never authenticate, plaintext frame lists sealed into
//! genuine client Initial packets (frames and CRYPTO reassembly). The first byte picks the mode;
//! the rest is a list of chunks, each prefixed with its 2-byte length. No input may panic, an
//! answer of `Invalid` is final, and a `Done` never names more CRYPTO bytes than were offered.

#![no_main]

use icp_gate::wire::quic::{InitialReader, Read, Version, client_initial, peek};
use libfuzzer_sys::fuzz_target;

const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, mut rest)) = input.split_first() else {
        return;
    };
    let mut chunks = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    let version = if mode & 2 == 0 { Version::V1 } else { Version::V2 };
    let mut reader = InitialReader::new(16384);
    let mut offered = 0usize;
    let mut invalid = false;
    for (pn, chunk) in chunks.iter().enumerate() {
        let datagram = if mode & 1 == 0 {
            chunk.to_vec()
        } else {
            client_initial(version, &DCID, &[], pn as u16, chunk)
        };
        let _ = peek(&datagram);
        offered += datagram.len();
        let fed = reader.feed(&datagram);
        match fed.read {
            Read::Invalid(_) => invalid = true,
            _ => assert!(!invalid, "an Invalid answer changed"),
        }
        if let Read::Done(info) = &fed.read {
            assert!(info.len <= offered);
        }
    }
});
