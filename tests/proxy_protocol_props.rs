//! The PROXY header parser against headers split by TCP anywhere: whatever prefix of a valid v1
//! or v2 header has arrived, the answer is "incomplete" (never "invalid"), and once the header is
//! all there the answer is the one the unsplit buffer gets, whatever follows it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use icp_gate::internals::{Addresses, Parsed, parse_proxy_header as parse};
use ppp::v2::{Builder, Command, Protocol, Version};
use proptest::prelude::*;

/// A valid header's bytes, with the addresses it names (`None`: `UNKNOWN` or `LOCAL`).
#[derive(Debug, Clone)]
struct Header {
    bytes: Vec<u8>,
    addresses: Option<Addresses>,
}

fn v4() -> impl Strategy<Value = SocketAddr> {
    (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port)))
}

fn v6() -> impl Strategy<Value = SocketAddr> {
    (any::<u128>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port)))
}

fn v1_tcp(client: SocketAddr, dst: SocketAddr) -> Header {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let line = format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        dst.ip(),
        client.port(),
        dst.port()
    );
    Header {
        bytes: line.into_bytes(),
        addresses: Some(Addresses { client, dst }),
    }
}

/// `PROXY UNKNOWN`, alone or with whatever the sender put before the CRLF (at most 107 bytes).
fn v1_unknown() -> impl Strategy<Value = Header> {
    prop::option::of("[ -~]{0,91}").prop_map(|rest| {
        let mut line = String::from("PROXY UNKNOWN");
        if let Some(rest) = rest {
            line.push(' ');
            line.push_str(&rest);
        }
        line.push_str("\r\n");
        Header {
            bytes: line.into_bytes(),
            addresses: None,
        }
    })
}

fn tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
        0..4,
    )
}

/// v2 `PROXY` over TCP, or `LOCAL` (with or without addresses), with TLVs.
fn v2((client, dst): (SocketAddr, SocketAddr), local: bool, tlvs: Vec<(u8, Vec<u8>)>) -> Header {
    let command = if local {
        Command::Local
    } else {
        Command::Proxy
    };
    let mut builder = Builder::with_addresses(
        Version::Two as u8 | command as u8,
        Protocol::Stream,
        (client, dst),
    );
    for (kind, value) in &tlvs {
        builder = builder.write_tlv(*kind, value).unwrap();
    }
    Header {
        bytes: builder.build().unwrap(),
        addresses: (!local).then_some(Addresses { client, dst }),
    }
}

/// v2 `LOCAL` with no addresses at all (a health check), with TLVs.
fn v2_local_unspecified(tlvs: Vec<(u8, Vec<u8>)>) -> Header {
    let mut builder = Builder::new(Version::Two as u8 | Command::Local as u8, 0x00);
    for (kind, value) in &tlvs {
        builder = builder.write_tlv(*kind, value).unwrap();
    }
    Header {
        bytes: builder.build().unwrap(),
        addresses: None,
    }
}

fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        (v4(), v4()).prop_map(|(c, d)| v1_tcp(c, d)),
        (v6(), v6()).prop_map(|(c, d)| v1_tcp(c, d)),
        v1_unknown(),
        ((v4(), v4()), any::<bool>(), tlvs()).prop_map(|(a, local, t)| v2(a, local, t)),
        ((v6(), v6()), any::<bool>(), tlvs()).prop_map(|(a, local, t)| v2(a, local, t)),
        tlvs().prop_map(v2_local_unspecified),
    ]
}

/// What usually follows a header, or anything at all.
fn trailing() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"GET / HTTP/1.1\r\nHost: a.cn\r\n\r\n".to_vec()),
        Just(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_split_gives_the_unsplit_answer(header in header(), rest in trailing()) {
        let mut buf = header.bytes.clone();
        buf.extend_from_slice(&rest);
        let want = Parsed::Header { len: header.bytes.len(), addresses: header.addresses };
        let whole = parse(&buf);
        prop_assert_eq!(&whole, &want, "{:?}", String::from_utf8_lossy(&header.bytes));
        for split in 0..buf.len() {
            let first = parse(&buf[..split]);
            if split < header.bytes.len() {
                // A prefix of a valid header: wait for more, never refuse.
                prop_assert_eq!(first, Parsed::Incomplete, "prefix of {}", split);
            } else {
                prop_assert_eq!(first, want.clone(), "prefix of {}", split);
            }
            // Then the rest arrives.
            prop_assert_eq!(parse(&buf), whole.clone());
        }
    }
}
