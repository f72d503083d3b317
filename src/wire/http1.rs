//! A hand-written HTTP/1.1 codec for the requests that make up nearly all traffic: a bodiless
//! origin-form HTTP/1.1 request with one `Host` and no hop-by-hop headers beyond
//! `Connection: keep-alive|close`. The HTTP listener serves those itself (block page or a forward
//! over a raw pooled origin connection) and hands every other request — bodies, upgrades,
//! `Expect`, HTTP/1.0, h2c, anything malformed — with the rest of the connection to hyper.
//!
//! Why: on the forwarded path hyper's server and client dispatchers were about half of icp-gate's
//! user time per request (~12.7 µs before this path, ~6.5 µs with it; docs/performance.md,
//! "Where the CPU goes"). Parsing stays with `httparse` (what hyper uses); this module only
//! decides what is simple enough, writes the heads, and frames origin responses. It does no I/O.

use std::mem::MaybeUninit;

use httparse::{Header, Status};

use http::{HeaderName, StatusCode, header};

use crate::wire::clock;

/// Request or response headers read by the fast path; a message with more goes to hyper (request)
/// or is refused with 502 (response).
pub const MAX_HEADERS: usize = 64;

/// What a buffer holds at the start of a request.
#[derive(Debug)]
pub enum RequestHead<'h, 'b> {
    /// Not a complete head yet.
    Partial,
    /// Complete or not, hyper must serve this request and the rest of the connection.
    Other,
    Simple(Simple<'h, 'b>),
}

/// A request the fast path serves.
#[derive(Debug)]
pub struct Simple<'h, 'b> {
    /// Length of the head in the buffer; the request has no body, so also of the request.
    pub len: usize,
    pub method: &'b str,
    pub path: &'b str,
    /// The one `Host` header's value, not empty.
    pub host: &'b [u8],
    /// The client sent `Connection: close`.
    pub close: bool,
    /// `Accept` names `application/json` (the block page answers in JSON).
    pub json: bool,
    pub headers: &'h [Header<'b>],
}

impl Simple<'_, '_> {
    pub(crate) fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Safe to send again on a fresh connection when a pooled one closed before answering.
    pub(crate) fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }
}

/// Request headers that make a request not simple besides the hop-by-hop ones
/// ([`is_hop_by_hop`]): a body, or an interim response to wait for.
const NOT_SIMPLE: [&str; 2] = ["content-length", "expect"];

/// Room for a request's headers, left uninitialised: [`parse_request`] writes only the ones it
/// finds (filling 64 empty headers first was half of the fast path's own parsing time).
pub fn header_slots<'b>() -> [MaybeUninit<Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Parses the request at the start of `buf`.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>],
) -> RequestHead<'h, 'b> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return RequestHead::Partial,
        Err(_) => return RequestHead::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return RequestHead::Other;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return RequestHead::Other;
    }
    let headers: &'h [Header<'b>] = req.headers;
    let mut host = None;
    let mut close = false;
    let mut json = false;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return RequestHead::Other;
            }
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return RequestHead::Other;
                }
            }
        } else if name.eq_ignore_ascii_case("accept") {
            json |= names_json(h.value);
        } else if is_hop_by_hop(name) || NOT_SIMPLE.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            return RequestHead::Other;
        }
    }
    match host {
        Some(host) if !host.is_empty() => RequestHead::Simple(Simple {
            len,
            method,
            path,
            host,
            close,
            json,
            headers,
        }),
        _ => RequestHead::Other,
    }
}

/// `value` contains `application/json` (any case).
pub(crate) fn names_json(value: &[u8]) -> bool {
    value
        .windows(16)
        .any(|w| w.eq_ignore_ascii_case(b"application/json"))
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Writes the request as the origin gets it: the same request line in HTTP/1.1, every header
/// but `Connection`, and with `forwarded_for` the client appended to `X-Forwarded-For` (earlier
/// values joined into one header, last).
pub fn write_origin_request(out: &mut Vec<u8>, req: &Simple<'_, '_>, forwarded_for: Option<&[u8]>) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let is_xff = |h: &Header<'_>| h.name.eq_ignore_ascii_case("x-forwarded-for");
    for h in req.headers {
        if h.name.eq_ignore_ascii_case("connection") || (forwarded_for.is_some() && is_xff(h)) {
            continue;
        }
        push_header(out, h.name.as_bytes(), h.value);
    }
    if let Some(client) = forwarded_for {
        out.extend_from_slice(b"x-forwarded-for: ");
        for h in req.headers.iter().filter(|h| is_xff(h)) {
            out.extend_from_slice(h.value);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the head of one of icp-gate's own answers (block page, 400, 502, 504) as hyper would,
/// in two parts: [`write_head_start`], the status line and its headers, then
/// [`write_head_end`]. The body follows, unless the request was `HEAD`.
pub(crate) fn write_head_start<'a>(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: impl Iterator<Item = (HeaderName, &'a [u8])>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        write_header(out, &name, value);
    }
}

pub(crate) fn write_header(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    push_header(out, name.as_str().as_bytes(), value);
}

/// The end of an answer's head: `connection: close` when the connection ends after it,
/// `content-length` of its body and `date`.
pub(crate) fn write_head_end(out: &mut Vec<u8>, body_len: usize, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(&clock::http_date());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Headers that describe one hop (RFC 9110 §7.6.1), never forwarded (`Upgrade` is handled apart:
/// a WebSocket handshake keeps it).
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// A hop-by-hop header by name (any case): `Connection`, `Keep-Alive`, `Proxy-*`, `TE`,
/// `Trailer`, `Transfer-Encoding` or `Upgrade`. Both HTTP paths drop the same list.
pub fn is_hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case(header::UPGRADE.as_str())
        || HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// How an origin response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the origin closes the connection; the client connection closes after it too.
    UntilClose,
}

/// An origin response head, parsed.
#[derive(Debug)]
pub enum ResponseHead {
    Partial,
    /// A 1xx other than 101, `len` bytes long: skipped, the final response follows.
    Interim {
        len: usize,
    },
    Final(Final),
}

#[derive(Debug)]
pub struct Final {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The origin connection may carry another request after this response.
    pub reusable: bool,
}

/// Why an origin response can't be relayed: the client gets a 502 and the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("unparseable response head")]
    Head,
    #[error("101 Switching Protocols without an upgrade request")]
    UnaskedSwitch,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("invalid chunked encoding")]
    Chunk,
}

/// Parses the origin's response at the start of `buf`. `head_request`: the request was `HEAD`.
/// For a final response, `out` receives the head as the client gets it, without the final blank
/// line (added, with `connection: close` when needed, by [`finish_client_head`]).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, BadResponse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Ok(ResponseHead::Partial),
        Err(_) => return Err(BadResponse::Head),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse::Head);
    };
    match status {
        // httparse reads any three digits; "020" is no status (hyper refuses it too).
        0..=99 => return Err(BadResponse::Head),
        101 => return Err(BadResponse::UnaskedSwitch),
        100..=199 => return Ok(ResponseHead::Interim { len }),
        _ => {}
    }
    let headers: &[Header<'_>] = resp.headers;
    let facts = ResponseFacts::scan(headers, version)?;
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (facts.chunked, facts.length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    // Both framings at once is how smuggling starts: relay by Transfer-Encoding, never reuse.
    let conflicting = facts.chunked.is_some() && facts.length.is_some();
    let reusable = !facts.close && !conflicting && framing != Framing::UntilClose;
    write_client_head(out, status, resp.reason.unwrap_or(""), headers, &facts);
    Ok(ResponseHead::Final(Final {
        len,
        status,
        framing,
        reusable,
    }))
}

/// What an origin response's headers say about its framing and the connection.
struct ResponseFacts {
    length: Option<u64>,
    /// Whether the last transfer coding is `chunked`, when there is a `Transfer-Encoding`.
    chunked: Option<bool>,
    close: bool,
    has_date: bool,
    /// `Connection` names a header to drop (rare: usually only `keep-alive` or `close`).
    lists_headers: bool,
}

impl ResponseFacts {
    #[inline]
    fn scan(headers: &[Header<'_>], version: u8) -> Result<ResponseFacts, BadResponse> {
        let mut f = ResponseFacts {
            length: None,
            chunked: None,
            close: version == 0,
            has_date: false,
            lists_headers: false,
        };
        for h in headers {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(h.value).ok_or(BadResponse::ContentLength)?;
                if f.length.is_some_and(|l| l != n) {
                    return Err(BadResponse::ContentLength);
                }
                f.length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Only the last coding counts (RFC 9112 §6.3 rule 4); later headers come later.
                if let Some(last) = tokens(h.value).last() {
                    f.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        f.close &= version != 0;
                    } else {
                        f.lists_headers = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("date") {
                f.has_date = true;
            }
        }
        Ok(f)
    }
}

/// Writes the response head the client gets: HTTP/1.1, the origin's status and headers less the
/// hop-by-hop ones (`Transfer-Encoding` stays: the body passes in the framing it names), and a
/// `date` when the origin sent none.
#[inline]
fn write_client_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    headers: &[Header<'_>],
    facts: &ResponseFacts,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let listed = |name: &str| {
        facts.lists_headers
            && headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .flat_map(|h| tokens(h.value))
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    };
    for h in headers {
        let name = h.name;
        let te = name.eq_ignore_ascii_case("transfer-encoding");
        let length = name.eq_ignore_ascii_case("content-length");
        // The body passes in the origin's framing, so its headers stay even when `Connection`
        // lists them: without them the client would read the body until the close.
        let drop = (is_hop_by_hop(name) && !te)
            || (facts.chunked.is_some() && length)
            || (!te && !length && listed(name));
        if !drop {
            push_header(out, name.as_bytes(), h.value);
        }
    }
    if !facts.has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&clock::http_date());
        out.extend_from_slice(b"\r\n");
    }
}

/// Ends a client head from [`parse_response`].
pub fn finish_client_head(head: &mut Vec<u8>, close: bool) {
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: digits only (no sign, no list), at most 18 of them.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Finds where a chunked body ends while its bytes pass through unchanged (RFC 9112 §7.1).
/// Strict: CRLF line ends, hex sizes without overflow, bounded extensions and trailers.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    /// Chunk data bytes left in the current chunk.
    left: u64,
    /// Size digits of the current size line.
    digits: u8,
    /// Bytes of chunk extension or trailer section so far.
    extra: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Longest chunk extension, and trailer section, accepted.
const MAX_CHUNK_EXTRA: usize = 8 * 1024;

impl ChunkedEnd {
    /// Consumes body bytes from `data`: how many belong to the body, and whether the body ended
    /// with them (bytes after that are not part of this response).
    pub fn scan(&mut self, data: &[u8]) -> Result<(usize, bool), BadResponse> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            if self.state == Data {
                let take = (data.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                i += take;
                self.left -= take as u64;
                if self.left == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Size, b';') if self.digits > 0 => Ext,
                (Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return Err(BadResponse::Chunk);
                    }
                    self.digits += 1;
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.left = self.left << 4 | u64::from(d);
                    Size
                }
                (Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(BadResponse::Chunk),
                (Ext, _) => self.more_extra(Ext)?,
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    self.extra = 0;
                    if self.left == 0 { TrailerStart } else { Data }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => EndLf,
                (TrailerLine, b'\r') => TrailerLf,
                (TrailerStart | TrailerLine, b'\n') => return Err(BadResponse::Chunk),
                (TrailerStart | TrailerLine, _) => self.more_extra(TrailerLine)?,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(BadResponse::Chunk),
            };
            if self.state == Done {
                return Ok((i, true));
            }
        }
        Ok((i, false))
    }

    fn more_extra(&mut self, next: ChunkState) -> Result<ChunkState, BadResponse> {
        self.extra += 1;
        if self.extra > MAX_CHUNK_EXTRA {
            return Err(BadResponse::Chunk);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(raw: &[u8]) -> Option<(usize, String, bool, bool)> {
        let mut headers = header_slots();
        match parse_request(raw, &mut headers) {
            RequestHead::Simple(s) => Some((
                s.len,
                String::from_utf8_lossy(s.host).into_owned(),
                s.close,
                s.json,
            )),
            _ => None,
        }
    }

    fn kind(raw: &[u8]) -> &'static str {
        let mut headers = header_slots();
        match parse_request(raw, &mut headers) {
            RequestHead::Partial => "partial",
            RequestHead::Other => "other",
            RequestHead::Simple(_) => "simple",
        }
    }

    #[test]
    fn a_plain_get_is_simple() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: Filed.CN\r\nAccept: application/JSON\r\nConnection: keep-alive, close\r\n\r\nGET";
        let (len, host, close, json) = simple(raw).unwrap();
        assert_eq!(len, raw.len() - 3);
        assert_eq!(host, "Filed.CN");
        assert!(close && json);
        assert_eq!(kind(b"GET / HTTP/1.1\r\nHost: a.cn\r\n"), "partial");
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for raw in [
            &b"GET / HTTP/1.0\r\nHost: a.cn\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a.cn\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.cn\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\nConnection: x-secret\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\nHost: b.cn\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET http://a.cn/ HTTP/1.1\r\nHost: a.cn\r\n\r\n",
            b"CONNECT a.cn:443 HTTP/1.1\r\nHost: a.cn:443\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a.cn\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a.cn\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.cn\r\n folded\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nHost: a.cn\r\n\r\n",
        ] {
            assert_eq!(kind(raw), "other", "{}", String::from_utf8_lossy(raw));
        }
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            kind(format!("GET / HTTP/1.1\r\nHost: a.cn\r\n{many}\r\n").as_bytes()),
            "other"
        );
    }

    #[test]
    fn origin_request_drops_connection_and_appends_forwarded_for() {
        let raw = b"GET /p HTTP/1.1\r\nHost: a.cn\r\nConnection: close\r\nX-Forwarded-For: 203.0.113.1\r\nX-Kept: 1\r\nx-forwarded-for: 10.0.0.1\r\n\r\n";
        let mut headers = header_slots();
        let RequestHead::Simple(req) = parse_request(raw, &mut headers) else {
            panic!("not simple")
        };
        let mut out = Vec::new();
        write_origin_request(&mut out, &req, Some(b"127.0.0.1"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nHost: a.cn\r\nX-Kept: 1\r\nx-forwarded-for: 203.0.113.1, 10.0.0.1, 127.0.0.1\r\n\r\n"
        );
        let mut out = Vec::new();
        write_origin_request(&mut out, &req, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nHost: a.cn\r\nX-Forwarded-For: 203.0.113.1\r\nX-Kept: 1\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
    }

    fn fin(raw: &[u8], head: bool) -> Final {
        fin_head(raw, head).0
    }

    fn fin_head(raw: &[u8], head: bool) -> (Final, Vec<u8>) {
        let mut out = b"stale".to_vec();
        match parse_response(raw, head, &mut out) {
            Ok(ResponseHead::Final(f)) => (f, out),
            other => panic!("{other:?}"),
        }
    }

    fn parse(raw: &[u8]) -> Result<ResponseHead, BadResponse> {
        parse_response(raw, false, &mut Vec::new())
    }

    #[test]
    fn response_framing() {
        let f = fin(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
        assert_eq!(
            (f.framing, f.reusable, f.status),
            (Framing::Length(5), true, 200)
        );
        assert_eq!(f.len, 38);
        let f = fin(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(f.framing, Framing::Empty);
        let f = fin(b"HTTP/1.1 304 Not Modified\r\n\r\n", false);
        assert_eq!((f.framing, f.reusable), (Framing::Empty, true));
        let f = fin(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!((f.framing, f.reusable), (Framing::Chunked, true));
        let (f, head) = fin_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!((f.framing, f.reusable), (Framing::Chunked, false));
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("Content-Length"));
        let f = fin(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((f.framing, f.reusable), (Framing::UntilClose, false));
        let f = fin(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((f.framing, f.reusable), (Framing::UntilClose, false));
        let f = fin(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(!f.reusable);
        let f = fin(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!f.reusable);
        let f = fin(
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n",
            false,
        );
        assert!(f.reusable);
        let f = fin(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            false,
        );
        assert_eq!(f.framing, Framing::Length(2));
    }

    #[test]
    fn bad_and_interim_responses() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(BadResponse::ContentLength));
        }
        assert_eq!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").err(),
            Some(BadResponse::UnaskedSwitch)
        );
        assert_eq!(
            parse(b"HTTX/1.1 200 OK\r\n\r\n").err(),
            Some(BadResponse::Head)
        );
        // Found by the http1_response fuzz target: httparse reads "020" as status 20, which the
        // client head would have carried as "HTTP/1.1 20 OK".
        for raw in [&b"HTTP/1.1 020 OK\r\n\r\n"[..], b"HTTP/1.1 000 X\r\n\r\n"] {
            let text = String::from_utf8_lossy(raw);
            assert_eq!(parse(raw).err(), Some(BadResponse::Head), "{text:?}");
        }
        assert!(matches!(
            parse(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200"),
            Ok(ResponseHead::Interim { len: 40 })
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\n"),
            Ok(ResponseHead::Partial)
        ));
    }

    #[test]
    fn client_head_drops_hop_by_hop_and_listed_headers() {
        let (_, mut head) = fin_head(
            b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nUpgrade: h2c\r\nDate: Sun, 29 Nov 2026 08:56:34 GMT\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n",
            false,
        );
        finish_client_head(&mut head, true);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 200 Fine\r\nDate: Sun, 29 Nov 2026 08:56:34 GMT\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\nconnection: close\r\n\r\n"
        );
    }

    /// Caught by the http1_response fuzz target's framing property (on an input tried by hand):
    /// `Connection` naming a framing header dropped it from the client head while the body was
    /// relayed in that framing, so the client read a kept-alive response until the close.
    #[test]
    fn client_head_keeps_framing_headers_that_connection_lists() {
        let (f, head) = fin_head(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Secret\r\nContent-Length: 5\r\nX-Secret: 1\r\n\r\n",
            false,
        );
        assert_eq!((f.framing, f.reusable), (Framing::Length(5), true));
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("\r\nContent-Length: 5\r\n"), "{head}");
        assert!(!head.contains("X-Secret"), "{head}");
        let (f, head) = fin_head(
            b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(f.framing, Framing::Chunked);
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.contains("\r\nTransfer-Encoding: chunked\r\n"),
            "{head}"
        );
    }

    fn scan_all(body: &[u8], step: usize) -> Result<(usize, bool), BadResponse> {
        let mut c = ChunkedEnd::default();
        let mut used = 0;
        for part in body.chunks(step) {
            let (n, done) = c.scan(part)?;
            used += n;
            if done {
                return Ok((used, true));
            }
        }
        Ok((used, false))
    }

    #[test]
    fn chunked_end_is_found_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(
                scan_all(body, step),
                Ok((body.len() - 4, true)),
                "step {step}"
            );
        }
        assert_eq!(scan_all(b"3\r\nabc\r\n", 100), Ok((8, false)));
    }

    #[test]
    fn bad_chunks_are_refused() {
        for body in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad\ntrailer\r\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert_eq!(scan_all(body, 100), Err(BadResponse::Chunk), "{body:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A valid chunked body: chunk sizes, optional extensions and trailers.
        fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
            (
                prop::collection::vec((0usize..300, any::<bool>()), 0..8),
                prop::collection::vec("[a-z]{1,8}: [a-z0-9]{0,8}", 0..3),
            )
                .prop_map(|(chunks, trailers)| {
                    let mut body = Vec::new();
                    for (len, ext) in chunks.into_iter().filter(|(len, _)| *len > 0) {
                        body.extend_from_slice(format!("{len:X}").as_bytes());
                        if ext {
                            body.extend_from_slice(b";name=\"v\"");
                        }
                        body.extend_from_slice(b"\r\n");
                        body.extend(std::iter::repeat_n(b'x', len));
                        body.extend_from_slice(b"\r\n");
                    }
                    body.extend_from_slice(b"0\r\n");
                    for t in trailers {
                        body.extend_from_slice(t.as_bytes());
                        body.extend_from_slice(b"\r\n");
                    }
                    body.extend_from_slice(b"\r\n");
                    body
                })
        }

        proptest! {
            /// However the bytes are split, the end is found exactly where the body ends.
            #[test]
            fn chunked_end_is_exact(body in chunked_body(), cuts in prop::collection::vec(1usize..64, 1..40)) {
                let mut stream = body.clone();
                stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                let mut c = ChunkedEnd::default();
                let (mut at, mut cut) = (0, cuts.iter().cycle());
                loop {
                    let step = (*cut.next().unwrap()).min(stream.len() - at);
                    prop_assert!(step > 0, "ran past the end without finding it");
                    let (n, done) = c.scan(&stream[at..at + step]).unwrap();
                    at += n;
                    if done {
                        break;
                    }
                    prop_assert_eq!(n, step);
                }
                prop_assert_eq!(at, body.len());
            }

            /// Garbage never panics and never reads past what it was given.
            #[test]
            fn arbitrary_bytes_are_handled(data in prop::collection::vec(any::<u8>(), 0..512)) {
                let mut c = ChunkedEnd::default();
                if let Ok((n, _)) = c.scan(&data) {
                    prop_assert!(n <= data.len());
                }
                let _ = parse(&data);
                if let Some((len, ..)) = simple(&data) {
                    prop_assert!(len <= data.len());
                }
            }

            /// A simple request never carries a body or an upgrade past the fast path.
            #[test]
            fn simple_requests_have_no_framing_headers(
                names in prop::collection::vec(prop::sample::select(vec![
                    "Content-Length", "transfer-encoding", "UPGRADE", "Expect", "te", "X-Ok",
                    "Accept", "Connection", "host",
                ]), 0..6),
            ) {
                let mut raw = String::from("GET / HTTP/1.1\r\nHost: a.cn\r\n");
                for n in &names {
                    raw.push_str(&format!("{n}: 1\r\n"));
                }
                raw.push_str("\r\n");
                let simple = kind(raw.as_bytes()) == "simple";
                let framing = names.iter().any(|n| {
                    ["content-length", "transfer-encoding", "upgrade", "expect", "te", "host", "connection"]
                        .contains(&n.to_ascii_lowercase().as_str())
                });
                prop_assert_eq!(simple, !framing, "{}", raw);
            }
        }
    }
}
