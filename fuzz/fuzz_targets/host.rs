//! Host normalisation on arbitrary bytes (a `Host` header, an `:authority`, an SNI, a registry
//! domain): nothing panics, and a name it accepts is in normal form — ASCII lower-case letters,
//! digits, hyphens and dots, labels of 1..=63 bytes, at most 253 bytes — that normalises to
//! itself. An ASCII name is decided the same whatever its letters' case, and a registrable domain
//! is a suffix of its name on a label boundary that is its own registrable domain.

#![no_main]

use std::borrow::Cow;

use icp_gate::wire::host::{
    Host, normalize_name, parse_authority, parse_host, registrable_domain,
    registrable_domain_full_list,
};
use libfuzzer_sys::fuzz_target;

fn assert_normal(name: &str, raw: &[u8]) {
    let shown = String::from_utf8_lossy(raw);
    assert!(
        !name.is_empty() && name.len() <= 253,
        "{name:?} from {shown:?}"
    );
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
        "{name:?} from {shown:?}"
    );
    for label in name.split('.') {
        assert!((1..=63).contains(&label.len()), "{name:?} from {shown:?}");
    }
    assert_eq!(
        normalize_name(name.as_bytes()).as_deref(),
        Ok(name),
        "not idempotent: from {shown:?}"
    );
    for (list, registrable) in [
        ("icann", registrable_domain(name)),
        ("full", registrable_domain_full_list(name)),
    ] {
        let Some(r) = registrable else { continue };
        assert!(
            r == name || name.ends_with(&format!(".{r}")),
            "{list}: {r:?} of {name:?}"
        );
        let again = match list {
            "icann" => registrable_domain(r),
            _ => registrable_domain_full_list(r),
        };
        assert_eq!(again, Some(r), "{list}: registrable domain of {name:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let normal = normalize_name(data);
    if let Ok(name) = &normal {
        assert_normal(name, data);
    }
    // Plain ASCII: upper and lower case are one name (a filing cannot be dodged by case).
    if data.is_ascii() {
        let upper = normalize_name(&data.to_ascii_uppercase()).map(Cow::into_owned);
        let lower = normalize_name(&data.to_ascii_lowercase()).map(Cow::into_owned);
        assert_eq!(upper, lower, "{:?}", String::from_utf8_lossy(data));
        assert_eq!(lower, normal.clone().map(Cow::into_owned));
    }
    for parsed in [parse_host(data), parse_authority(data)] {
        match parsed {
            Ok(Host::Name(name)) => assert_normal(&name, data),
            Ok(Host::Ip(ip)) => assert!(!ip.to_string().is_empty()),
            Err(_) => {}
        }
    }
    // A host is a name or an address, never both: the name normal form of an accepted host is
    // what parse_host decides for that form too.
    if let Ok(Host::Name(name)) = parse_host(data) {
        assert_eq!(
            parse_host(name.as_bytes()),
            Ok(Host::Name(Cow::Borrowed(&*name))),
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
});
