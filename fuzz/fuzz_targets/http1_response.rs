//! The fast path's origin-response framing on arbitrary bytes: `parse_response` and the chunked
//! body scanner. Neither may panic or claim more bytes than it was given. The head the client
//! gets must frame the body exactly as icp-gate relays it (else the client and icp-gate disagree
//! on where the response ends: the client waits for a body that never comes, or reads the next
//! response as part of this one), carry no hop-by-hop header but `Transfer-Encoding`, and a
//! `Date`. The chunked scanner must find the same end however the body is split.
//!
//! Input: a flags byte (bit 0: the request was `HEAD`; bit 1: the rest is a chunked body alone),
//! two bytes choosing a split point, then the origin's bytes.

#![no_main]

use icp_gate::internals::{
    BadResponse, ChunkedEnd, Framing, MAX_HEADERS, ResponseHead, finish_client_head, is_hop_by_hop,
    parse_response,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some(([flags, s0, s1], data)) = input.split_first_chunk::<3>() else {
        return;
    };
    let head_request = flags & 1 != 0;
    let split = usize::from(u16::from_be_bytes([*s0, *s1])) % (data.len() + 1);
    if flags & 2 != 0 {
        chunked(data, split);
        return;
    }

    let mut out = b"stale".to_vec();
    let head = match parse_response(data, head_request, &mut out) {
        Ok(ResponseHead::Final(head)) => head,
        Ok(ResponseHead::Interim { len }) => {
            assert!(len <= data.len());
            let mut again = Vec::new();
            assert!(matches!(
                parse_response(&data[..len], head_request, &mut again),
                Ok(ResponseHead::Interim { len: l }) if l == len
            ));
            return;
        }
        Ok(ResponseHead::Partial) | Err(_) => return,
    };
    assert!(head.len <= data.len());
    assert!((200..=999).contains(&head.status), "{}", head.status);
    if head_request || head.status == 204 || head.status == 304 {
        assert_eq!(head.framing, Framing::Empty);
    }
    if head.reusable {
        assert_ne!(head.framing, Framing::UntilClose);
    }

    // As the relay finishes it: closing after a body delimited by the close.
    let close = head.framing == Framing::UntilClose;
    finish_client_head(&mut out, close);
    let text = String::from_utf8_lossy(&out).into_owned();

    let dates = |headers: &[httparse::Header<'_>]| {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("date"))
            .count()
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut origin = httparse::Response::new(&mut fields);
    assert!(matches!(
        origin.parse(data),
        Ok(httparse::Status::Complete(_))
    ));
    // Up to two headers more than the origin sent: `date` and `connection: close`.
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
    let mut resp = httparse::Response::new(&mut fields);
    assert_eq!(
        resp.parse(&out),
        Ok(httparse::Status::Complete(out.len())),
        "the client head does not parse: {text:?}"
    );
    assert_eq!(resp.version, Some(1));
    assert_eq!(resp.code, Some(head.status));
    for h in resp.headers.iter() {
        let te = h.name.eq_ignore_ascii_case("transfer-encoding");
        let ours = close && h.name == "connection" && h.value == b"close";
        assert!(te || ours || !is_hop_by_hop(h.name), "{}: {text:?}", h.name);
    }
    // The origin's own, or one added when it sent none.
    assert_eq!(
        dates(resp.headers),
        dates(origin.headers).max(1),
        "{text:?}"
    );

    // The client frames the body as icp-gate relays it (read as icp-gate reads a response,
    // which stops at MAX_HEADERS headers; a client has no such limit).
    if resp.headers.len() <= MAX_HEADERS {
        let mut client = Vec::new();
        let Ok(ResponseHead::Final(seen)) = parse_response(&out, head_request, &mut client) else {
            panic!("the client head does not parse: {text:?}");
        };
        assert_eq!(seen.len, out.len(), "{text:?}");
        assert_eq!(seen.status, head.status, "{text:?}");
        assert_eq!(
            seen.framing, head.framing,
            "the client frames the body otherwise: {text:?}"
        );
    }

    if head.framing == Framing::Chunked {
        chunked(&data[head.len..], split.saturating_sub(head.len));
    }
});

/// Scans `body` at once and in two parts split at `split`: the same answer, within the bytes
/// given, and an end found is exactly where the body ends.
fn chunked(body: &[u8], split: usize) {
    let split = split.min(body.len());
    let whole = ChunkedEnd::default().scan(body);
    let mut parts = ChunkedEnd::default();
    let two = parts.scan(&body[..split]).and_then(|(n, done)| {
        if done {
            return Ok((n, true));
        }
        assert_eq!(n, split, "a part taken only in part, without an end");
        parts.scan(&body[split..]).map(|(m, done)| (n + m, done))
    });
    match (whole, two) {
        (Ok(w), Ok(t)) => assert_eq!(w, t, "split at {split}"),
        (Err(BadResponse::Chunk), Err(BadResponse::Chunk)) => {}
        (w, t) => panic!("at once {w:?}, split at {split} {t:?}"),
    }
    match whole {
        Ok((n, true)) => {
            assert!(n <= body.len());
            assert_eq!(ChunkedEnd::default().scan(&body[..n]), Ok((n, true)));
            assert_eq!(
                ChunkedEnd::default().scan(&body[..n - 1]),
                Ok((n - 1, false))
            );
        }
        Ok((n, false)) => assert_eq!(n, body.len()),
        Err(_) => {}
    }
}
