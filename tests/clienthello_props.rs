//! Properties of the ClientHello parser over the real captured hellos, re-framed and mutated, and
//! over arbitrary bytes.

use std::sync::LazyLock;

use icp_gate::wire::clienthello::{ClientHelloParser, Parse, parse};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/clienthello");
const TOO_LARGE: Parse = Parse::Invalid("client hello too large");

static REAL: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    [
        "chromium.bin",
        "curl.bin",
        "python.bin",
        "openssl.bin",
        "node.bin",
        "openssl-nosni.bin",
    ]
    .iter()
    .map(|name| {
        let path = format!("{TESTDATA}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    })
    .collect()
});

fn real_hello() -> impl Strategy<Value = &'static [u8]> {
    (0..REAL.len()).prop_map(|i| REAL[i].as_slice())
}

/// Re-splits the handshake payload of `hello` (well-formed records) into records of `sizes`,
/// cycling through them.
fn refragment(hello: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut rest = hello;
    while let [_, _, _, hi, lo, tail @ ..] = rest {
        let (fragment, tail) = tail.split_at(usize::from(u16::from_be_bytes([*hi, *lo])));
        payload.extend_from_slice(fragment);
        rest = tail;
    }
    let mut out = Vec::new();
    for size in sizes.iter().cycle() {
        if payload.is_empty() {
            break;
        }
        let fragment: Vec<u8> = payload.drain(..(*size).min(payload.len())).collect();
        out.extend_from_slice(&hello[..3]);
        out.extend(
            u16::try_from(fragment.len())
                .expect("record sizes fit u16")
                .to_be_bytes(),
        );
        out.extend(fragment);
    }
    out
}

/// Feeds `input` to `parser` as it would arrive in TCP segments ending at `cuts`, then whole;
/// checks that nothing is decided early without staying decided, and returns the last answer.
fn feed(parser: &mut ClientHelloParser, input: &[u8], cuts: &[Index]) -> Parse {
    let mut ends: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
    ends.sort_unstable();
    ends.push(input.len());
    let mut decided: Option<Parse> = None;
    let mut last = Parse::Incomplete;
    for end in ends {
        last = parser.advance(&input[..end]);
        if let Some(earlier) = &decided {
            assert_eq!(&last, earlier, "a final answer changed");
        } else if last != Parse::Incomplete {
            decided = Some(last.clone());
        }
    }
    last
}

proptest! {
    #[test]
    fn any_reframing_of_a_real_hello_gives_the_same_answer(
        hello in real_hello(),
        record_sizes in vec(1..600usize, 1..12),
        cuts in vec(any::<Index>(), 0..40),
    ) {
        let Parse::Done(expected) = parse(hello) else { panic!("real hello must parse") };
        let reframed = refragment(hello, &record_sizes);
        let mut parser = ClientHelloParser::new(usize::MAX);
        let Parse::Done(info) = feed(&mut parser, &reframed, &cuts) else {
            panic!("reframed hello must parse");
        };
        prop_assert_eq!(&info.sni, &expected.sni);
        prop_assert_eq!(info.has_ech, expected.has_ech);
        prop_assert_eq!(info.record_version, expected.record_version);
        prop_assert_eq!(info.len, reframed.len());
        prop_assert_eq!(parse(&reframed), Parse::Done(info));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_feeding_agrees(
        bytes in vec(any::<u8>(), 0..3000),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let whole = parse(&bytes);
        prop_assert_eq!(feed(&mut ClientHelloParser::new(usize::MAX), &bytes, &cuts), whole);
    }

    /// Arbitrary bytes after a plausible client version behind valid framing, so that the body
    /// checks get exercised too.
    #[test]
    fn arbitrary_hello_bodies_never_panic(
        body in vec(any::<u8>(), 0..1500),
        record_sizes in vec(1..300usize, 1..4),
    ) {
        let len = u32::try_from(body.len() + 2).expect("small body").to_be_bytes();
        let message = [&[1u8, len[1], len[2], len[3], 3, 3][..], &body].concat();
        let record = [&[22u8, 3, 1][..], &u16::try_from(message.len()).expect("fits").to_be_bytes(), &message].concat();
        let reframed = refragment(&record, &record_sizes);
        match parse(&reframed) {
            Parse::Done(info) => prop_assert_eq!(info.len, reframed.len()),
            Parse::Invalid(_) => {}
            other => panic!("a complete hello cannot be {other:?}"),
        }
    }

    #[test]
    fn mutated_real_hellos_never_panic_and_feeding_agrees(
        hello in real_hello(),
        flips in vec((any::<Index>(), any::<u8>()), 1..6),
        keep in proptest::option::of(any::<Index>()),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let mut bytes = hello.to_vec();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(keep) = keep {
            bytes.truncate(keep.index(bytes.len() + 1));
        }
        let whole = parse(&bytes);
        prop_assert_eq!(feed(&mut ClientHelloParser::new(usize::MAX), &bytes, &cuts), whole);
    }

    #[test]
    fn parser_never_exceeds_max_bytes(
        hello in real_hello(),
        record_sizes in vec(1..600usize, 1..6),
        slack in -60..60isize,
        cuts in vec(any::<Index>(), 0..20),
    ) {
        let reframed = refragment(hello, &record_sizes);
        let max = reframed.len().saturating_add_signed(slack);
        let mut parser = ClientHelloParser::new(max);
        let mut ends: Vec<usize> = cuts.iter().map(|cut| cut.index(reframed.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(reframed.len());
        for end in ends {
            match parser.advance(&reframed[..end]) {
                Parse::Incomplete => prop_assert!(end < max),
                Parse::Done(info) => prop_assert!(info.len <= max),
                other => prop_assert_eq!(other, TOO_LARGE),
            }
        }
        let last = parser.advance(&reframed);
        if reframed.len() <= max {
            prop_assert_eq!(last, parse(&reframed));
        } else {
            prop_assert_eq!(last, TOO_LARGE);
        }
    }

    #[test]
    fn max_bytes_holds_on_arbitrary_input(
        bytes in vec(any::<u8>(), 0..600),
        max in 0..700usize,
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let mut parser = ClientHelloParser::new(max);
        let answer = feed(&mut parser, &bytes, &cuts);
        match &answer {
            Parse::Incomplete => prop_assert!(bytes.len() < max),
            Parse::Done(info) => prop_assert!(info.len <= max),
            Parse::NotTls | Parse::Invalid(_) => {}
        }
        prop_assert_eq!(answer, ClientHelloParser::new(max).advance(&bytes));
    }
}
