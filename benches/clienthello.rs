//! Cost of reading the SNI, per connection: a small classic hello, a 2 KB post-quantum one, and
//! the same post-quantum hello in 1-byte records (the worst framing a client can choose).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use icp_gate::wire::clienthello::{Parse, parse};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/clienthello");

fn real(name: &str) -> Vec<u8> {
    let path = format!("{TESTDATA}/{name}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Re-sends the handshake payload of `hello` (one record) as records of one byte each.
fn one_byte_records(hello: &[u8]) -> Vec<u8> {
    let (header, payload) = hello.split_at(5);
    payload
        .iter()
        .flat_map(|&byte| [header[0], header[1], header[2], 0, 1, byte])
        .collect()
}

fn bench_parse(c: &mut Criterion) {
    let chromium = real("chromium.bin");
    let inputs = [
        ("openssl", real("openssl.bin")),
        ("chromium", chromium.clone()),
        ("chromium_1_byte_records", one_byte_records(&chromium)),
    ];
    let mut group = c.benchmark_group("clienthello_parse");
    for (name, input) in &inputs {
        assert!(matches!(parse(input), Parse::Done(_)), "{name} must parse");
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(*name, |b| b.iter(|| parse(black_box(input))));
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
