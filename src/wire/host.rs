//! Host normalisation (docs/behaviour.md#host-normalisation): one set of rules for the HTTP `Host` header, an HTTP/2
//! `:authority`, the authority of an absolute-form request-target and the TLS SNI.
//!
//! Every name the proxy compares — request hosts, registry domains, `policy.exempt` — goes through
//! [`normalize_name`], so two spellings of one name can never be decided differently.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use idna::AsciiDenyList;
use idna::uts46::{DnsLength, Hyphens, Uts46};
use publicsuffix::{IcannList, List, Psl};

/// Longest name DNS can carry, without the root dot.
const MAX_NAME_BYTES: usize = 253;
/// Longest DNS label.
const MAX_LABEL_BYTES: usize = 63;

/// Why a host was rejected. Every variant ends as `invalid_host` (HTTP) or `invalid_sni` (TLS);
/// the variant is kept for logs and `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("userinfo (`user@`) is not allowed in a host")]
    Userinfo,
    #[error("bad port")]
    BadPort,
    #[error("bad IPv6 literal")]
    BadIpLiteral,
    #[error("empty label")]
    EmptyLabel,
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    #[error("name longer than 253 bytes")]
    NameTooLong,
    #[error("character outside letters, digits and hyphen, or invalid IDN")]
    BadCharacter,
}

/// A normalised host: an A-label, lower-case, LDH domain name without trailing dot, or an IP
/// literal. The name borrows the input when it was already in normal form (the common case), so
/// normalising costs no allocation on the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host<'a> {
    Name(Cow<'a, str>),
    Ip(IpAddr),
}

impl Host<'_> {
    /// The host as text: the name, or the IP literal.
    pub fn to_text(&self) -> Cow<'_, str> {
        match self {
            Host::Name(name) => Cow::Borrowed(name.as_ref()),
            Host::Ip(ip) => Cow::Owned(ip.to_string()),
        }
    }

    pub fn into_owned(self) -> Host<'static> {
        match self {
            Host::Name(name) => Host::Name(Cow::Owned(name.into_owned())),
            Host::Ip(ip) => Host::Ip(ip),
        }
    }
}

/// Parses an HTTP authority (`Host` header value, `:authority`, or the authority of an
/// absolute-form target): `name[:port]`, `v4[:port]` or `[v6][:port]`. Userinfo is rejected
/// rather than stripped: `filed.example@unfiled.example` is a bypass attempt, not a host.
pub fn parse_authority(raw: &[u8]) -> Result<Host<'_>, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.contains(&b'@') {
        return Err(HostError::Userinfo);
    }
    if raw[0] == b'[' {
        let close = raw
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::BadIpLiteral)?;
        check_port(&raw[close + 1..])?;
        let inner = std::str::from_utf8(&raw[1..close]).map_err(|_| HostError::BadIpLiteral)?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| HostError::BadIpLiteral)?;
        return Ok(Host::Ip(IpAddr::V6(ip)));
    }
    let (name, port) = match raw.iter().rposition(|&b| b == b':') {
        Some(colon) => (&raw[..colon], &raw[colon..]),
        None => (raw, &raw[raw.len()..]),
    };
    check_port(port)?;
    if name.contains(&b':') {
        return Err(HostError::BadPort);
    }
    parse_host(name)
}

/// Parses a host without port: used for the TLS SNI (RFC 6066 `host_name`), registry domains and
/// `policy.exempt`. An IPv4 literal is recognised (browsers never send one as SNI, but a client
/// may, and `policy.ip_literal` decides it like the HTTP case).
pub fn parse_host(raw: &[u8]) -> Result<Host<'_>, HostError> {
    let trimmed = raw.strip_suffix(b".").unwrap_or(raw);
    if let Some(ip) = parse_ipv4(trimmed) {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = normalize_name(raw)?;
    // UTS #46 maps full-width digits and full stops to ASCII: `１０．０．０．１` is 10.0.0.1, an
    // address, not a name (a registry entry could otherwise file an address, and a host spelled
    // so would dodge `policy.ip_literal`).
    if let Some(ip) = parse_ipv4(name.as_bytes()) {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    Ok(Host::Name(name))
}

/// Normalises a domain name: strip one trailing dot, UTS #46 (lower-casing, mapping, Unicode to
/// A-labels, validating existing `xn--` labels), then require LDH labels of 1..=63 bytes and a
/// name of at most 253 bytes.
pub fn normalize_name(raw: &[u8]) -> Result<Cow<'_, str>, HostError> {
    let (input, stripped_dot) = match raw.strip_suffix(b".") {
        Some(rest) => (rest, true),
        None => (raw, false),
    };
    if input.is_empty() {
        return Err(HostError::Empty);
    }
    // Fast path for the common case, plain LDH ASCII: UTS #46 maps it to itself lower-cased, so
    // the full mapping (~200 ns) is only needed for non-ASCII input and `xn--` labels to verify.
    if let Some(plain) = scan_plain_ldh(input) {
        let upper = plain?;
        // Only ASCII was admitted, so this cannot fail.
        let text = std::str::from_utf8(input).map_err(|_| HostError::BadCharacter)?;
        return Ok(if upper {
            Cow::Owned(text.to_ascii_lowercase())
        } else {
            Cow::Borrowed(text)
        });
    }
    // An empty label ("a..b", ".a") would otherwise be reported as a bad character by UTS #46.
    if input.first() == Some(&b'.') || input.windows(2).any(|w| w == b"..") {
        return Err(HostError::EmptyLabel);
    }
    let mut ascii = Uts46::new()
        .to_ascii(
            input,
            AsciiDenyList::STD3,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| HostError::BadCharacter)?;
    // A Unicode full stop (U+3002 etc.) maps to '.', so the root dot can also appear only now.
    if !stripped_dot && ascii.ends_with('.') {
        match &mut ascii {
            Cow::Borrowed(s) => *s = &s[..s.len() - 1],
            Cow::Owned(s) => {
                s.pop();
            }
        }
    }
    check_lengths(&ascii)?;
    Ok(ascii)
}

fn check_lengths(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(HostError::NameTooLong);
    }
    name.split('.').try_for_each(|label| label_ok(label.len()))
}

/// One pass over a name that may be plain LDH ASCII. `None`: it is not (non-ASCII, another
/// character, or an `xn--` label whose punycode needs checking), so UTS #46 must look at it.
/// Otherwise the length rules' verdict, with whether any letter is upper-case.
fn scan_plain_ldh(name: &[u8]) -> Option<Result<bool, HostError>> {
    let mut upper = false;
    let mut label_start = 0;
    let mut verdict = Ok(());
    for (i, &b) in name.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' => {}
            b'A'..=b'Z' => upper = true,
            b'.' => {
                verdict = verdict.and(label_ok(i - label_start));
                label_start = i + 1;
                continue;
            }
            _ => return None,
        }
        if i == label_start + 3 && name[label_start..=i].eq_ignore_ascii_case(b"xn--") {
            return None;
        }
    }
    verdict = verdict.and(label_ok(name.len() - label_start));
    if name.len() > MAX_NAME_BYTES {
        verdict = Err(HostError::NameTooLong);
    }
    Some(verdict.map(|()| upper))
}

fn label_ok(len: usize) -> Result<(), HostError> {
    match len {
        0 => Err(HostError::EmptyLabel),
        1..=MAX_LABEL_BYTES => Ok(()),
        _ => Err(HostError::LabelTooLong),
    }
}

/// `""` or `":"` followed by up to five digits forming a number ≤ 65535 (RFC 3986 allows an
/// empty port).
fn check_port(port: &[u8]) -> Result<(), HostError> {
    let Some(digits) = port.strip_prefix(b":") else {
        return if port.is_empty() {
            Ok(())
        } else {
            Err(HostError::BadPort)
        };
    };
    if digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HostError::BadPort);
    }
    let value = digits
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    if value > u32::from(u16::MAX) {
        return Err(HostError::BadPort);
    }
    Ok(())
}

/// Strict dotted-quad only: the forms some URL parsers accept (`127.1`, `0x7f.0.0.1`) are not IP
/// literals here, so they are looked up as names, find no entry and are blocked.
fn parse_ipv4(raw: &[u8]) -> Option<Ipv4Addr> {
    if !raw.first()?.is_ascii_digit() || !raw.last()?.is_ascii_digit() {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The public suffix list shipped with the binary (Mozilla, MPL-2.0), both sections.
const PUBLIC_SUFFIX_LIST: &str = include_str!("public_suffix_list.dat");

static ICANN_LIST: LazyLock<IcannList> = LazyLock::new(|| {
    PUBLIC_SUFFIX_LIST
        .parse()
        .expect("the built-in public suffix list parses")
});

static FULL_LIST: LazyLock<List> = LazyLock::new(|| {
    PUBLIC_SUFFIX_LIST
        .parse()
        .expect("the built-in public suffix list parses")
});

/// The registrable domain of a normalised name on the ICANN section of the public suffix list:
/// the domain a filing covers. `None` when the name is itself a public suffix (`com.cn`) or has
/// no registrable domain (`localhost`).
///
/// ICANN only, because a filing covers a name bought from a registrar: `user.github.io` belongs to
/// the filing of `github.io`.
pub fn registrable_domain(name: &str) -> Option<&str> {
    registrable_with(&*ICANN_LIST, name)
}

/// Like [`registrable_domain`] on the whole list (ICANN and private sections). Enforcement never
/// uses it; it exists so the suffix engine can be checked against the list's own conformance cases.
pub fn registrable_domain_full_list(name: &str) -> Option<&str> {
    registrable_with(&*FULL_LIST, name)
}

/// Forces the lazy parse of the list, so the first request does not pay for it.
pub fn warm_up() {
    LazyLock::force(&ICANN_LIST);
}

fn registrable_with<'a>(list: &impl Psl, name: &'a str) -> Option<&'a str> {
    let bytes = name.as_bytes();
    let suffix_len = list.find(bytes.rsplit(|&b| b == b'.')).len;
    if suffix_len == 0 || suffix_len >= bytes.len() {
        return None;
    }
    // The registrable domain is the suffix plus one more label.
    let before_suffix = &bytes[..bytes.len() - suffix_len - 1];
    let start = before_suffix
        .iter()
        .rposition(|&b| b == b'.')
        .map_or(0, |dot| dot + 1);
    Some(&name[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> Result<String, HostError> {
        normalize_name(raw.as_bytes()).map(Cow::into_owned)
    }

    fn authority(raw: &str) -> Result<Host<'static>, HostError> {
        parse_authority(raw.as_bytes()).map(Host::into_owned)
    }

    fn named(n: &str) -> Host<'static> {
        Host::Name(Cow::Owned(n.to_string()))
    }

    #[test]
    fn already_normal_names_are_borrowed() {
        assert!(matches!(
            normalize_name(b"www.example.com"),
            Ok(Cow::Borrowed("www.example.com"))
        ));
        assert!(matches!(
            normalize_name(b"www.example.com."),
            Ok(Cow::Borrowed("www.example.com"))
        ));
    }

    #[test]
    fn case_port_and_trailing_dot() {
        assert_eq!(authority("WWW.Example.COM"), Ok(named("www.example.com")));
        assert_eq!(authority("example.com:8080"), Ok(named("example.com")));
        assert_eq!(authority("example.com.:443"), Ok(named("example.com")));
        assert_eq!(authority("example.com:"), Ok(named("example.com")));
        assert_eq!(name("example.com.."), Err(HostError::EmptyLabel));
    }

    #[test]
    fn unicode_and_punycode_are_the_same_name() {
        assert_eq!(name("例子.中国"), Ok("xn--fsqu00a.xn--fiqs8s".into()));
        assert_eq!(
            name("xn--fsqu00a.xn--fiqs8s"),
            Ok("xn--fsqu00a.xn--fiqs8s".into())
        );
        assert_eq!(
            name("XN--FSQU00A.XN--FIQS8S"),
            Ok("xn--fsqu00a.xn--fiqs8s".into())
        );
        // Ideographic full stop is a label separator under UTS #46.
        assert_eq!(name("例子。中国"), Ok("xn--fsqu00a.xn--fiqs8s".into()));
        assert_eq!(name("例子.中国。"), Ok("xn--fsqu00a.xn--fiqs8s".into()));
        // Full-width letters map to ASCII.
        assert_eq!(name("ＥＸＡＭＰＬＥ.com"), Ok("example.com".into()));
        // Broken punycode is not silently accepted.
        assert_eq!(name("xn--zz.com"), Err(HostError::BadCharacter));
    }

    #[test]
    fn rejects_userinfo_and_bad_characters() {
        assert_eq!(authority("user@example.com"), Err(HostError::Userinfo));
        assert_eq!(
            authority("filed.example@unfiled.example"),
            Err(HostError::Userinfo)
        );
        for bad in [
            "exa mple.com",
            "exa_mple.com",
            "example.com/x",
            "exa%6dple.com",
            "example.com\0.evil",
            "*.example.com",
        ] {
            assert_eq!(name(bad), Err(HostError::BadCharacter), "{bad:?}");
        }
        assert_eq!(authority(""), Err(HostError::Empty));
        assert_eq!(name("."), Err(HostError::Empty));
        assert_eq!(name(".example.com"), Err(HostError::EmptyLabel));
        assert_eq!(authority("example.com:80:80"), Err(HostError::BadPort));
        assert_eq!(authority("example.com:65536"), Err(HostError::BadPort));
        assert_eq!(authority("example.com:http"), Err(HostError::BadPort));
        assert_eq!(parse_authority(&[0xff, b'a']), Err(HostError::BadCharacter));
    }

    #[test]
    fn length_limits() {
        let label63 = "a".repeat(63);
        assert!(name(&format!("{label63}.com")).is_ok());
        assert_eq!(
            name(&format!("a{label63}.com")),
            Err(HostError::LabelTooLong)
        );
        let long = format!("{label63}.{label63}.{label63}.{}.cn", "b".repeat(58));
        assert_eq!(long.len(), 253);
        assert!(name(&long).is_ok());
        assert_eq!(name(&format!("{long}.")).map(|n| n.len()), Ok(253));
        assert_eq!(name(&format!("x{long}")), Err(HostError::NameTooLong));
    }

    #[test]
    fn ip_literals() {
        assert_eq!(
            authority("10.1.2.3"),
            Ok(Host::Ip("10.1.2.3".parse().unwrap()))
        );
        assert_eq!(
            authority("10.1.2.3:80"),
            Ok(Host::Ip("10.1.2.3".parse().unwrap()))
        );
        assert_eq!(
            authority("[::1]:8080"),
            Ok(Host::Ip("::1".parse().unwrap()))
        );
        assert_eq!(authority("[::1]"), Ok(Host::Ip("::1".parse().unwrap())));
        assert_eq!(authority("[::1"), Err(HostError::BadIpLiteral));
        assert_eq!(authority("[example.com]"), Err(HostError::BadIpLiteral));
        assert_eq!(authority("::1"), Err(HostError::BadPort));
        // Non-canonical numeric forms are names, not addresses.
        assert_eq!(authority("127.1"), Ok(named("127.1")));
        assert_eq!(
            parse_host(b"10.1.2.3."),
            Ok(Host::Ip("10.1.2.3".parse().unwrap()))
        );
    }

    /// Caught by the `host` fuzz target's idempotence property: normalisation maps full-width
    /// digits and full stops to ASCII, so these are the address 10.0.0.1 (as browsers take them
    /// too), not the name "10.0.0.1", which parse_host itself calls an address.
    #[test]
    fn full_width_ip_literals_are_addresses() {
        let ten = Ok(Host::Ip("10.0.0.1".parse().unwrap()));
        for raw in [
            "１０.０.０.１",
            "１０。０。０。１",
            "１０．０．０．１．",
            "10.0.0.１",
        ] {
            assert_eq!(parse_host(raw.as_bytes()), ten, "{raw}");
            assert_eq!(authority(raw), ten, "{raw}");
            assert_eq!(authority(&format!("{raw}:80")), ten, "{raw}:80");
        }
        assert_eq!(authority("１２７.１"), Ok(named("127.1")));
    }

    #[test]
    fn registrable_domains_on_icann_section() {
        assert_eq!(
            registrable_domain("a.b.example.com.cn"),
            Some("example.com.cn")
        );
        assert_eq!(
            registrable_domain("x.beijing.gov.cn"),
            Some("beijing.gov.cn")
        );
        assert_eq!(registrable_domain("www.x.gov.cn"), Some("x.gov.cn"));
        assert_eq!(registrable_domain("com.cn"), None);
        assert_eq!(registrable_domain("cn"), None);
        assert_eq!(registrable_domain("localhost"), None);
        assert_eq!(registrable_domain("user.github.io"), Some("github.io"));
        assert_eq!(
            registrable_domain_full_list("user.github.io"),
            Some("user.github.io")
        );
        assert_eq!(
            registrable_domain("www.xn--fsqu00a.xn--fiqs8s"),
            Some("xn--fsqu00a.xn--fiqs8s")
        );
    }
}
