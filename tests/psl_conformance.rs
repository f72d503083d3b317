//! The public suffix list's own conformance cases (tests/data/psl/test_psl.txt).
//!
//! They are written for the whole list, so every case runs against the full list to prove the
//! suffix engine. Enforcement uses the ICANN section only (a filing covers a name bought from a
//! registrar): those answers are checked too, and where the two differ the ICANN answer is
//! spelled out below.

mod common;

use icp_gate::wire::host::{normalize_name, registrable_domain, registrable_domain_full_list};

/// `(input, registrable domain on the ICANN section only)` for the cases whose answer differs
/// from the full list's: `uk.com` is a private-section suffix (CentralNic), so under ICANN rules
/// `example.uk.com` is a sub-domain of the registrable domain `uk.com`.
const ICANN_DIFFERS: &[(&str, Option<&str>)] = &[
    ("uk.com", Some("uk.com")),
    ("example.uk.com", Some("uk.com")),
    ("b.example.uk.com", Some("uk.com")),
    ("a.b.example.uk.com", Some("uk.com")),
];

fn cases() -> Vec<(Option<String>, Option<String>)> {
    let text = std::fs::read_to_string(common::testdata("psl/test_psl.txt")).unwrap();
    let arg = |s: &str| -> Option<String> {
        let s = s.trim();
        (s != "null").then(|| s.trim_matches('\'').to_string())
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("checkPublicSuffix("))
        .map(|l| {
            let inner = l.trim_end_matches(");");
            let (input, expected) = inner.split_once(',').expect("two arguments");
            (arg(input), arg(expected))
        })
        .collect()
}

/// Normalises like a request host; an input that does not normalise has no registrable domain.
fn answer(input: &Option<String>, lookup: fn(&str) -> Option<&str>) -> Option<String> {
    let name = normalize_name(input.as_deref()?.as_bytes()).ok()?;
    lookup(&name).map(str::to_string)
}

fn normalised(expected: &Option<String>) -> Option<String> {
    expected
        .as_deref()
        .map(|e| normalize_name(e.as_bytes()).unwrap().into_owned())
}

#[test]
fn full_list_passes_every_case() {
    let cases = cases();
    assert!(cases.len() >= 70, "only {} cases read", cases.len());
    for (input, expected) in &cases {
        assert_eq!(
            answer(input, registrable_domain_full_list),
            normalised(expected),
            "full list, input {input:?}"
        );
    }
}

#[test]
fn icann_section_answers_with_the_differences_spelled_out() {
    let mut differing = Vec::new();
    for (input, expected) in cases() {
        let icann = answer(&input, registrable_domain);
        let full = normalised(&expected);
        match ICANN_DIFFERS
            .iter()
            .find(|(i, _)| Some(*i) == input.as_deref())
        {
            Some((_, want)) => {
                assert_eq!(icann.as_deref(), *want, "ICANN, input {input:?}");
                assert_ne!(icann, full, "{input:?} is listed as differing but does not");
                differing.push(input.clone().unwrap_or_default());
            }
            None => assert_eq!(icann, full, "ICANN, input {input:?}"),
        }
    }
    assert_eq!(
        differing.len(),
        ICANN_DIFFERS.len(),
        "a listed difference is missing from the cases"
    );
}
