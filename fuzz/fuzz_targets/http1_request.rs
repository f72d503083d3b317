//! The fast path's request-head classifier on arbitrary bytes. A request it calls simple must
//! really be one (one non-empty `Host`, origin-form path, no body or hop-by-hop header but
//! `Connection: close|keep-alive`), its length must not depend on what follows it or on how it
//! arrived, and the request the origin gets (`write_origin_request`) must read back as the same
//! request: nothing the client sent can turn into a different request, or two, at the origin.
//! The first two input bytes choose a split point.

#![no_main]

use icp_gate::internals::{
    MAX_HEADERS, RequestHead, Simple, header_slots, is_hop_by_hop, parse_request,
    write_origin_request,
};
use libfuzzer_sys::fuzz_target;

fn eq_any(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// The fields of a simple request that decide how it is served.
fn key(s: &Simple<'_, '_>) -> (usize, String, String, Vec<u8>, bool, bool) {
    (
        s.len,
        s.method.to_owned(),
        s.path.to_owned(),
        s.host.to_vec(),
        s.close,
        s.json,
    )
}

fuzz_target!(|input: &[u8]| {
    let Some((split, data)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*split)) % (data.len() + 1);
    let mut headers = header_slots();
    let RequestHead::Simple(req) = parse_request(data, &mut headers) else {
        // Not simple: hyper serves it. A prefix must not be taken for a simple request either
        // (it would be a shorter request than the one the client sent).
        let mut headers = header_slots();
        if let RequestHead::Simple(s) = parse_request(&data[..split], &mut headers) {
            panic!("a prefix of {split} bytes is simple ({} bytes)", s.len);
        }
        return;
    };

    assert!(req.len <= data.len());
    assert!(data[..req.len].ends_with(b"\n"));
    assert!(req.path.starts_with('/'), "{:?}", req.path);
    assert_ne!(req.method, "CONNECT");
    assert!(!req.host.is_empty());
    let mut hosts = 0;
    for h in req.headers {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                assert!(
                    t.is_empty()
                        || t.eq_ignore_ascii_case(b"close")
                        || t.eq_ignore_ascii_case(b"keep-alive"),
                    "Connection: {:?}",
                    String::from_utf8_lossy(h.value)
                );
            }
        } else {
            assert!(!is_hop_by_hop(h.name), "{}", h.name);
            assert!(!eq_any(h.name, &["content-length", "expect"]), "{}", h.name);
        }
    }
    assert_eq!(hosts, 1);

    // The head alone, and the head split in two reads, give the same request.
    let mut alone = header_slots();
    let RequestHead::Simple(again) = parse_request(&data[..req.len], &mut alone) else {
        panic!("the head alone is not simple");
    };
    assert_eq!(key(&again), key(&req));
    let mut part = header_slots();
    match parse_request(&data[..split], &mut part) {
        RequestHead::Partial if split < req.len => {}
        RequestHead::Simple(s) if split >= req.len => assert_eq!(key(&s), key(&req)),
        other => panic!(
            "a prefix of {split} bytes of a {}-byte head: {other:?}",
            req.len
        ),
    }

    // What the origin gets reads back as this request, with the client appended to
    // X-Forwarded-For (one header more: room for it).
    for forwarded_for in [None, Some(&b"198.51.100.7"[..])] {
        let mut out = Vec::new();
        write_origin_request(&mut out, &req, forwarded_for);
        let mut back = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
        let mut origin = httparse::Request::new(&mut back);
        let len = match origin.parse(&out) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!(
                "origin request {:?}: {other:?}",
                String::from_utf8_lossy(&out)
            ),
        };
        assert_eq!(len, out.len(), "one request, nothing after it");
        assert_eq!(origin.method, Some(req.method));
        assert_eq!(origin.path, Some(req.path));
        assert_eq!(origin.version, Some(1));
        let sent: Vec<_> = req
            .headers
            .iter()
            .filter(|h| !h.name.eq_ignore_ascii_case("connection"))
            .filter(|h| forwarded_for.is_none() || !h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|h| (h.name, h.value))
            .collect();
        let got: Vec<_> = origin.headers.iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(&got[..sent.len()], &sent[..]);
        match forwarded_for {
            None => assert_eq!(got.len(), sent.len()),
            Some(client) => {
                assert_eq!(got.len(), sent.len() + 1);
                let (name, value) = got[sent.len()];
                assert_eq!(name, "x-forwarded-for");
                assert!(value.ends_with(client));
            }
        }
    }
});
