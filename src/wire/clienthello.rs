//! Reads the SNI of a TLS ClientHello without terminating TLS.
//!
//! The TLS listener has to decide on the server name before it forwards anything, and on allow
//! it forwards the client's bytes unchanged, so this parser only looks at them: it reassembles the
//! ClientHello handshake message across any number of TLS records and TCP reads, checks its
//! structure and reports the `host_name`. It does no I/O, and while the ClientHello fits in its
//! first record (as it does for every real client) it copies nothing but the returned name.

/// Record payload bound (RFC 5246 §6.2.3's ciphertext limit, the one rustls enforces too).
const MAX_RECORD_PAYLOAD: usize = (1 << 14) + 2048;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
const TOO_LARGE: &str = "client hello too large";
const TRUNCATED: &str = "truncated client hello";

/// Result of looking at the bytes received so far on a new TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes (the handshake message is not complete yet).
    Incomplete,
    /// The whole ClientHello handshake message was reassembled and parsed.
    Done(ClientHelloInfo),
    /// Definitely not TLS: the first byte is not a handshake record (0x16) or the record version
    /// major is not 3 (plain HTTP, an SSLv2 hello, ...).
    NotTls,
    /// TLS framing but a malformed or unsupported ClientHello; the text says why (for logs).
    Invalid(&'static str),
}

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The single `host_name` of the server_name extension, exactly as sent (not normalised);
    /// `None` when there is no server_name extension.
    pub sni: Option<String>,
    /// The encrypted_client_hello extension (0xfe0d) is present, so `sni` is the outer name.
    pub has_ech: bool,
    /// Version field of the first record header, the one to answer an alert with (0 when the
    /// hello came without records, as in QUIC).
    pub record_version: u16,
    /// Bytes of the input taken by the records carrying the ClientHello, headers included;
    /// whatever follows (early data, ...) is not looked at.
    pub len: usize,
}

/// Parses the ClientHello at the start of `buf`, with no size limit beyond the protocol's.
#[must_use]
pub fn parse(buf: &[u8]) -> Parse {
    ClientHelloParser::new(usize::MAX).advance(buf)
}

/// Parses a ClientHello handshake message carried without TLS records (QUIC CRYPTO frames,
/// RFC 9001 §4): `message` is the handshake header and body, and nothing may follow the body.
/// `Incomplete` until the header and the body it announces are all in `message`.
#[must_use]
pub fn parse_handshake(message: &[u8]) -> Parse {
    let Some(&[kind, a, b, c]) = message.get(..HANDSHAKE_HEADER_LEN) else {
        return match message.first() {
            Some(&kind) if kind != HANDSHAKE_TYPE_CLIENT_HELLO => {
                Parse::Invalid("handshake message is not a client hello")
            }
            _ => Parse::Incomplete,
        };
    };
    if kind != HANDSHAKE_TYPE_CLIENT_HELLO {
        return Parse::Invalid("handshake message is not a client hello");
    }
    let total =
        HANDSHAKE_HEADER_LEN + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
    match message.len().cmp(&total) {
        std::cmp::Ordering::Less => Parse::Incomplete,
        std::cmp::Ordering::Greater => Parse::Invalid("data after the client hello"),
        std::cmp::Ordering::Equal => {
            match parse_client_hello_body(&message[HANDSHAKE_HEADER_LEN..]) {
                Ok(found) => Parse::Done(ClientHelloInfo {
                    sni: found.sni,
                    has_ech: found.has_ech,
                    record_version: 0,
                    len: total,
                }),
                Err(why) => Parse::Invalid(why),
            }
        }
    }
}

/// Resumable [`parse`]: each call only looks at the bytes that arrived since the previous one, so
/// a client that sends one byte per TCP segment or per TLS record costs linear, not quadratic, work.
#[derive(Debug)]
pub struct ClientHelloParser {
    max_bytes: usize,
    /// Offset in the input up to which record framing has been consumed.
    pos: usize,
    /// Payload bytes of the current record not consumed yet; 0 means a record header is next.
    record_left: usize,
    records_seen: usize,
    record_version: u16,
    message: Reassembly,
    /// Handshake bytes (header included) received so far.
    message_len: usize,
    /// Length of the whole handshake message, header included, once its header is in.
    message_total: Option<usize>,
    /// The final answer, repeated if the caller asks again.
    outcome: Option<Parse>,
}

/// Where the handshake bytes received so far are: they stay in the caller's buffer while they all
/// come from the first record, and are copied only once a second record is needed.
#[derive(Debug)]
enum Reassembly {
    FirstRecord,
    Copied(Vec<u8>),
}

impl ClientHelloParser {
    /// A parser that gives up once `max_bytes` of input (record headers included) did not
    /// complete the ClientHello.
    #[must_use]
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            pos: 0,
            record_left: 0,
            records_seen: 0,
            record_version: 0,
            message: Reassembly::FirstRecord,
            message_len: 0,
            message_total: None,
            outcome: None,
        }
    }

    /// `buf` is all bytes received so far on the connection: it must only grow between calls.
    /// Returns `Invalid("client hello too large")` once `buf` reaches `max_bytes` (or the declared
    /// message length cannot fit in them) without a complete ClientHello.
    pub fn advance(&mut self, buf: &[u8]) -> Parse {
        if let Some(outcome) = &self.outcome {
            return outcome.clone();
        }
        if buf.len() < self.pos {
            return self.settle(Parse::Invalid("input shrank between calls"));
        }
        let window = buf.get(..self.max_bytes).unwrap_or(buf);
        match self.consume(window) {
            Parse::Incomplete if buf.len() >= self.max_bytes => {
                self.settle(Parse::Invalid(TOO_LARGE))
            }
            Parse::Incomplete => Parse::Incomplete,
            outcome => self.settle(outcome),
        }
    }

    fn settle(&mut self, outcome: Parse) -> Parse {
        self.outcome = Some(outcome.clone());
        outcome
    }

    /// Walks record headers and payload from `self.pos` until the message is complete, the input
    /// runs out, or something is wrong.
    fn consume(&mut self, input: &[u8]) -> Parse {
        loop {
            if self.record_left == 0 {
                if let Some(rejected) = self.read_record_header(input) {
                    return rejected;
                }
                continue;
            }
            let wanted = match self.message_total {
                None => HANDSHAKE_HEADER_LEN - self.message_len,
                Some(total) => total - self.message_len,
            };
            let available = input.len().saturating_sub(self.pos);
            let take = wanted.min(self.record_left).min(available);
            let Some(chunk) = input
                .get(self.pos..self.pos + take)
                .filter(|c| !c.is_empty())
            else {
                return Parse::Incomplete;
            };
            if self.message_len == 0 && chunk.first() != Some(&HANDSHAKE_TYPE_CLIENT_HELLO) {
                return Parse::Invalid("handshake message is not a client hello");
            }
            if let Reassembly::Copied(bytes) = &mut self.message {
                bytes.extend_from_slice(chunk);
            }
            self.pos += take;
            self.record_left -= take;
            self.message_len += take;

            if self.message_total.is_none() && self.message_len == HANDSHAKE_HEADER_LEN {
                let Some(&[_, a, b, c]) = self.message_bytes(input) else {
                    return Parse::Invalid("input shrank between calls");
                };
                let total = HANDSHAKE_HEADER_LEN
                    + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
                self.message_total = Some(total);
                if self.fewest_bytes_to_complete(total) > self.max_bytes {
                    return Parse::Invalid(TOO_LARGE);
                }
            }
            if self.message_total == Some(self.message_len) {
                return self.finish(input);
            }
        }
    }

    /// Reads the next record header; `None` when it was read and accepted, else the answer.
    fn read_record_header(&mut self, input: &[u8]) -> Option<Parse> {
        let first = self.records_seen == 0;
        let rest = input.get(self.pos..).unwrap_or_default();
        if let Some(rejected) = check_header_start(rest, first) {
            return Some(rejected);
        }
        let Some(&[_, major, minor, len_hi, len_lo]) = rest.get(..RECORD_HEADER_LEN) else {
            return Some(Parse::Incomplete);
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 {
            // RFC 5246 §6.2.1 and RFC 8446 §5.1 both forbid empty handshake records.
            return Some(Parse::Invalid("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Some(Parse::Invalid("record too large"));
        }
        if first {
            self.record_version = u16::from_be_bytes([major, minor]);
        } else if matches!(self.message, Reassembly::FirstRecord) {
            let Some(so_far) = self.message_bytes(input) else {
                return Some(Parse::Invalid("input shrank between calls"));
            };
            self.message = Reassembly::Copied(so_far.to_vec());
        }
        self.records_seen += 1;
        self.pos += RECORD_HEADER_LEN;
        self.record_left = len;
        None
    }

    /// Lower bound on the input length that completes a message of `total` bytes from here: the
    /// payload still missing, plus one more record header if the current record cannot hold it.
    fn fewest_bytes_to_complete(&self, total: usize) -> usize {
        let missing = total - self.message_len;
        let next_header = if self.record_left < missing {
            RECORD_HEADER_LEN
        } else {
            0
        };
        self.pos.saturating_add(missing).saturating_add(next_header)
    }

    fn message_bytes<'a>(&'a self, input: &'a [u8]) -> Option<&'a [u8]> {
        match &self.message {
            Reassembly::FirstRecord => {
                input.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.message_len)
            }
            Reassembly::Copied(bytes) => Some(bytes),
        }
    }

    fn finish(&self, input: &[u8]) -> Parse {
        if self.record_left > 0 {
            // Nothing may follow a ClientHello in the handshake stream before the server answers.
            return Parse::Invalid("data after the client hello in its record");
        }
        let Some(body) = self
            .message_bytes(input)
            .and_then(|m| m.get(HANDSHAKE_HEADER_LEN..))
        else {
            return Parse::Invalid("input shrank between calls");
        };
        match parse_client_hello_body(body) {
            Ok(found) => Parse::Done(ClientHelloInfo {
                sni: found.sni,
                has_ech: found.has_ech,
                record_version: self.record_version,
                len: self.pos,
            }),
            Err(why) => Parse::Invalid(why),
        }
    }
}

/// Judges the first bytes of a record header as soon as they arrive, so that plain HTTP is
/// recognised after one byte rather than after five.
fn check_header_start(header: &[u8], first_record: bool) -> Option<Parse> {
    let (content_type, major) = (header.first()?, header.get(1));
    let reason = if *content_type != CONTENT_TYPE_HANDSHAKE {
        "non-handshake record inside the client hello"
    } else if major.is_some_and(|&m| m != 3) {
        "bad record version"
    } else {
        return None;
    };
    Some(if first_record {
        Parse::NotTls
    } else {
        Parse::Invalid(reason)
    })
}

struct Extensions {
    sni: Option<String>,
    has_ech: bool,
}

/// Checks the ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) and picks out its extensions.
fn parse_client_hello_body(body: &[u8]) -> Result<Extensions, &'static str> {
    let mut hello = Reader(body);
    let version = hello.u16().ok_or(TRUNCATED)?;
    if version >> 8 != 3 {
        return Err("unsupported client version");
    }
    hello.take(32).ok_or(TRUNCATED)?; // random
    if hello.vec8().ok_or(TRUNCATED)?.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let cipher_suites = hello.vec16().ok_or(TRUNCATED)?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if hello.vec8().ok_or(TRUNCATED)?.is_empty() {
        return Err("no compression methods");
    }
    let mut found = Extensions {
        sni: None,
        has_ech: false,
    };
    if hello.is_empty() {
        // A TLS 1.2 hello may end here: no extensions at all.
        return Ok(found);
    }
    let mut extensions = Reader(hello.vec16().ok_or("truncated extensions")?);
    if !hello.is_empty() {
        return Err("bytes after the extensions");
    }
    while !extensions.is_empty() {
        let kind = extensions.u16().ok_or("truncated extension")?;
        let data = extensions.vec16().ok_or("truncated extension")?;
        match kind {
            EXTENSION_SERVER_NAME if found.sni.is_some() => {
                return Err("two server_name extensions");
            }
            EXTENSION_SERVER_NAME => found.sni = Some(parse_server_name(data)?),
            EXTENSION_ENCRYPTED_CLIENT_HELLO => found.has_ech = true,
            _ => {}
        }
    }
    Ok(found)
}

/// Returns the one `host_name` of a server_name extension (RFC 6066 §3).
fn parse_server_name(data: &[u8]) -> Result<String, &'static str> {
    let mut extension = Reader(data);
    let mut list = Reader(extension.vec16().ok_or("truncated server_name list")?);
    if !extension.is_empty() {
        return Err("server_name list does not fill its extension");
    }
    if list.is_empty() {
        return Err("empty server_name list");
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or("truncated server name")?;
        // RFC 6066 makes every name type start with a 16-bit length, so unknown ones can be skipped.
        let name = list.vec16().ok_or("truncated server name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err("several host_name entries");
        }
        host = Some(host_name(name)?);
    }
    host.ok_or("server_name without a host_name")
}

/// Rejects what no DNS name can contain (and what would garble logs); normalisation is the
/// caller's job, so case and trailing dots are left as sent.
fn host_name(name: &[u8]) -> Result<String, &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    if name.iter().any(u8::is_ascii_control) {
        return Err("NUL or control byte in host name");
    }
    // ASCII is UTF-8, so the name is copied whole (char by char it cost a thousand
    // instructions per ClientHello).
    match std::str::from_utf8(name) {
        Ok(text) if text.is_ascii() => Ok(text.to_owned()),
        _ => Err("non-ASCII host name"),
    }
}

/// Cursor over a handshake message: every read is bounds-checked and yields `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    fn u16(&mut self) -> Option<u16> {
        let (&bytes, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(bytes))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNI: &str = "www.filed-example.com.cn";
    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/clienthello");
    const REAL: [&str; 6] = [
        "chromium.bin",
        "curl.bin",
        "python.bin",
        "openssl.bin",
        "node.bin",
        "openssl-nosni.bin",
    ];

    fn real(name: &str) -> Vec<u8> {
        let path = format!("{TESTDATA}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn done(answer: Parse) -> ClientHelloInfo {
        match answer {
            Parse::Done(info) => info,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn len8(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(bytes.len()).expect("test vector fits u8")];
        out.extend_from_slice(bytes);
        out
    }

    fn len16(bytes: &[u8]) -> Vec<u8> {
        let len = u16::try_from(bytes.len()).expect("test vector fits u16");
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(len16(data));
        out
    }

    /// server_name extension data: a ServerNameList of (name_type, name) entries.
    fn server_names(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let list: Vec<u8> = entries
            .iter()
            .flat_map(|(kind, name)| [vec![*kind], len16(name)].concat())
            .collect();
        len16(&list)
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        extension(
            EXTENSION_SERVER_NAME,
            &server_names(&[(NAME_TYPE_HOST_NAME, name)]),
        )
    }

    fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len())
            .expect("test body fits u32")
            .to_be_bytes();
        [&[kind][..], &len[1..], body].concat()
    }

    /// Cuts a handshake payload into handshake records of the given sizes, the last size repeating.
    fn records(version: u16, payload: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = payload;
        let mut sizes = sizes
            .iter()
            .copied()
            .chain(std::iter::repeat(*sizes.last().expect("a size")));
        while !rest.is_empty() {
            let (fragment, tail) = rest.split_at(sizes.next().expect("endless").min(rest.len()));
            out.push(CONTENT_TYPE_HANDSHAKE);
            out.extend(version.to_be_bytes());
            out.extend(len16(fragment));
            rest = tail;
        }
        out
    }

    /// The handshake bytes carried by a sequence of well-formed records.
    fn handshake_payload(mut records: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        while let [_, _, _, hi, lo, rest @ ..] = records {
            let (fragment, tail) = rest.split_at(usize::from(u16::from_be_bytes([*hi, *lo])));
            payload.extend_from_slice(fragment);
            records = tail;
        }
        payload
    }

    /// Re-splits the ClientHello carried by `hello` into records of `record_sizes`.
    fn refragment(hello: &[u8], record_sizes: &[usize]) -> Vec<u8> {
        let version = u16::from_be_bytes([hello[1], hello[2]]);
        records(version, &handshake_payload(hello), record_sizes)
    }

    /// A ClientHello built field by field, so that each test can break exactly one of them.
    struct Hello {
        version: u16,
        session_id: Vec<u8>,
        cipher_suites: Vec<u8>,
        compression: Vec<u8>,
        /// The raw extensions block, length prefix included; `None` for a hello without one.
        extensions: Option<Vec<u8>>,
    }

    impl Hello {
        fn with_extensions(extensions: &[Vec<u8>]) -> Self {
            Self {
                version: 0x0303,
                session_id: vec![7; 32],
                cipher_suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                extensions: Some(len16(&extensions.concat())),
            }
        }

        fn body(&self) -> Vec<u8> {
            let mut body = self.version.to_be_bytes().to_vec();
            body.extend([0x42; 32]);
            body.extend(len8(&self.session_id));
            body.extend(len16(&self.cipher_suites));
            body.extend(len8(&self.compression));
            body.extend(self.extensions.iter().flatten());
            body
        }

        fn records(&self) -> Vec<u8> {
            records(
                0x0301,
                &handshake(HANDSHAKE_TYPE_CLIENT_HELLO, &self.body()),
                &[MAX_RECORD_PAYLOAD],
            )
        }
    }

    fn with_sni() -> Hello {
        Hello::with_extensions(&[
            extension(0x000a, &[0, 2, 0, 0x1d]),
            sni_extension(SNI.as_bytes()),
        ])
    }

    #[test]
    fn a_bare_handshake_message_reads_as_quic_carries_it() {
        let message = handshake(HANDSHAKE_TYPE_CLIENT_HELLO, &with_sni().body());
        for cut in 0..message.len() {
            assert_eq!(parse_handshake(&message[..cut]), Parse::Incomplete, "{cut}");
        }
        let info = done(parse_handshake(&message));
        assert_eq!(info.sni.as_deref(), Some(SNI));
        assert_eq!((info.record_version, info.len), (0, message.len()));
        let longer = [&message[..], b"x"].concat();
        assert_eq!(
            parse_handshake(&longer),
            Parse::Invalid("data after the client hello")
        );
        assert!(matches!(parse_handshake(&[2]), Parse::Invalid(_)));
        assert!(matches!(parse_handshake(&[2, 0, 0, 0]), Parse::Invalid(_)));
    }

    #[test]
    fn real_hellos_give_their_sni() {
        for name in REAL {
            let bytes = real(name);
            let info = done(parse(&bytes));
            let expected = (name != "openssl-nosni.bin").then(|| SNI.to_owned());
            assert_eq!(info.sni, expected, "{name}");
            assert_eq!(info.has_ech, name == "chromium.bin", "{name}");
            assert_eq!(info.record_version, 0x0301, "{name}");
            assert_eq!(info.len, bytes.len(), "{name}");
        }
    }

    #[test]
    fn every_strict_prefix_of_a_real_hello_is_incomplete() {
        for name in REAL {
            let bytes = real(name);
            for end in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..end]),
                    Parse::Incomplete,
                    "{name} cut at {end}"
                );
            }
        }
    }

    #[test]
    fn every_strict_prefix_of_a_built_hello_is_incomplete() {
        let bytes = refragment(&with_sni().records(), &[1, 7, 30]);
        assert!(matches!(parse(&bytes), Parse::Done(_)));
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]), Parse::Incomplete, "cut at {end}");
        }
    }

    #[test]
    fn bytes_after_the_hello_are_left_alone() {
        let hello = real("openssl.bin");
        let early_data = [23, 3, 3, 0, 2, 0xaa, 0xbb];
        let info = done(parse(&[&hello[..], &early_data].concat()));
        assert_eq!(info.len, hello.len());
        assert_eq!(info.sni.as_deref(), Some(SNI));
    }

    #[test]
    fn refragmented_chromium_keeps_its_answer() {
        let original = real("chromium.bin");
        let expected = done(parse(&original));
        for sizes in [&[1][..], &[100], &[500], &[3, 1000, 1]] {
            let split = refragment(&original, sizes);
            let info = done(parse(&split));
            assert_eq!(info.sni, expected.sni, "records of {sizes:?}");
            assert!(info.has_ech);
            assert_eq!(info.len, split.len());
        }
    }

    #[test]
    fn byte_at_a_time_feeding_matches_parse() {
        for name in REAL {
            for input in [real(name), refragment(&real(name), &[1])] {
                let mut parser = ClientHelloParser::new(usize::MAX);
                for end in 0..input.len() {
                    assert_eq!(
                        parser.advance(&input[..end]),
                        Parse::Incomplete,
                        "{name} at {end}"
                    );
                }
                assert_eq!(parser.advance(&input), parse(&input), "{name}");
            }
        }
    }

    #[test]
    fn parser_repeats_its_final_answer() {
        let hello = real("node.bin");
        let mut parser = ClientHelloParser::new(usize::MAX);
        let first = parser.advance(&hello);
        assert!(matches!(first, Parse::Done(_)));
        assert_eq!(parser.advance(&[&hello[..], b"more"].concat()), first);
    }

    #[test]
    fn parser_stops_at_max_bytes() {
        let hello = refragment(&real("curl.bin"), &[1]);
        assert!(matches!(
            ClientHelloParser::new(hello.len()).advance(&hello),
            Parse::Done(_)
        ));
        let mut parser = ClientHelloParser::new(hello.len() - 1);
        assert_eq!(parser.advance(&hello[..hello.len() - 2]), Parse::Incomplete);
        assert_eq!(
            parser.advance(&hello[..hello.len() - 1]),
            Parse::Invalid(TOO_LARGE)
        );
    }

    #[test]
    fn declared_length_beyond_max_is_rejected_early() {
        let header = [22, 3, 1, 0x40, 0, 1, 0x01, 0, 0];
        assert_eq!(
            ClientHelloParser::new(16384).advance(&header),
            Parse::Invalid(TOO_LARGE)
        );
        assert_eq!(parse(&header), Parse::Incomplete);
        let hello = real("curl.bin");
        let mut parser = ClientHelloParser::new(hello.len() - 1);
        assert_eq!(parser.advance(&hello[..8]), Parse::Incomplete);
        assert_eq!(parser.advance(&hello[..9]), Parse::Invalid(TOO_LARGE));
    }

    #[test]
    fn shrinking_input_is_rejected_not_a_panic() {
        let hello = real("openssl.bin");
        let mut parser = ClientHelloParser::new(usize::MAX);
        assert_eq!(parser.advance(&hello[..100]), Parse::Incomplete);
        assert_eq!(
            parser.advance(&hello[..50]),
            Parse::Invalid("input shrank between calls")
        );
    }

    #[test]
    fn not_tls() {
        let sslv2 = [
            0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
        ];
        let junk = [0x5a, 0x01, 0xff, 0x00, 0x13, 0x37, 0x00, 0x00, 0x00, 0x99];
        for input in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"PRI * HTTP/2.0\r\n",
            &sslv2,
            &junk,
            &[0x16, 0x02, 0x00],
        ] {
            assert_eq!(parse(input), Parse::NotTls, "{input:?}");
        }
    }

    #[test]
    fn hellos_without_server_name() {
        let no_extensions = Hello {
            extensions: None,
            ..with_sni()
        };
        let empty_block = Hello::with_extensions(&[]);
        for hello in [no_extensions, empty_block] {
            assert_eq!(done(parse(&hello.records())).sni, None);
        }
    }

    #[test]
    fn host_name_is_returned_as_sent() {
        let hello = Hello::with_extensions(&[sni_extension(b"WWW.Example.COM.")]);
        assert_eq!(
            done(parse(&hello.records())).sni.as_deref(),
            Some("WWW.Example.COM.")
        );
    }

    #[test]
    fn other_name_types_are_skipped() {
        let entries = server_names(&[(7, b"opaque"), (NAME_TYPE_HOST_NAME, SNI.as_bytes())]);
        let hello = Hello::with_extensions(&[extension(EXTENSION_SERVER_NAME, &entries)]);
        assert_eq!(done(parse(&hello.records())).sni.as_deref(), Some(SNI));
    }

    #[test]
    fn ech_is_reported() {
        let hello = Hello::with_extensions(&[
            sni_extension(b"public.example"),
            extension(0xfe0d, &[0, 1, 2]),
        ]);
        let info = done(parse(&hello.records()));
        assert!(info.has_ech);
        assert_eq!(info.sni.as_deref(), Some("public.example"));
    }

    #[test]
    fn record_of_the_largest_allowed_size() {
        let padded = |padding: usize| {
            Hello::with_extensions(&[
                sni_extension(SNI.as_bytes()),
                extension(0x15, &vec![0; padding]),
            ])
        };
        let unpadded = padded(0).records().len() - RECORD_HEADER_LEN;
        let bytes = padded(MAX_RECORD_PAYLOAD - unpadded).records();
        assert_eq!(bytes.len(), RECORD_HEADER_LEN + MAX_RECORD_PAYLOAD);
        assert_eq!(done(parse(&bytes)).sni.as_deref(), Some(SNI));
    }

    /// Each case breaks one rule of the framing; the expected reason pins which check fired.
    #[test]
    fn invalid_framing() {
        let message = handshake(HANDSHAKE_TYPE_CLIENT_HELLO, &with_sni().body());
        let (head, tail) = message.split_at(40);
        let alert = [21, 3, 3, 0, 2, 2, 40];
        let change_cipher_spec = [20, 3, 3, 0, 1, 1];
        let cases: Vec<(Vec<u8>, &'static str)> = vec![
            (
                [
                    records(0x0301, head, &[40]),
                    alert.to_vec(),
                    records(0x0301, tail, &[1000]),
                ]
                .concat(),
                "non-handshake record inside the client hello",
            ),
            (
                [records(0x0301, head, &[40]), change_cipher_spec.to_vec()].concat(),
                "non-handshake record inside the client hello",
            ),
            (
                [records(0x0301, head, &[40]), vec![22, 2, 0, 0, 1, 0]].concat(),
                "bad record version",
            ),
            (
                [vec![22, 3, 1, 0, 0], records(0x0301, &message, &[1000])].concat(),
                "empty handshake record",
            ),
            (
                [records(0x0301, head, &[40]), vec![22, 3, 1, 0, 0]].concat(),
                "empty handshake record",
            ),
            (vec![22, 3, 1, 0x48, 0x01], "record too large"),
            (
                records(0x0301, &handshake(2, &with_sni().body()), &[1000]),
                "handshake message is not a client hello",
            ),
            (
                records(0x0301, &[&message[..], &[0x0b, 0, 0, 0]].concat(), &[1000]),
                "data after the client hello in its record",
            ),
            (records(0x0301, &handshake(1, &[]), &[1000]), TRUNCATED),
            (
                records(0x0301, &handshake(1, &with_sni().body()[..50]), &[1000]),
                TRUNCATED,
            ),
        ];
        for (input, why) in cases {
            assert_eq!(parse(&input), Parse::Invalid(why), "{input:02x?}");
        }
    }

    #[test]
    fn invalid_client_hello_fields() {
        let extensions = with_sni().extensions.expect("built with extensions");
        let cases = [
            (
                Hello {
                    version: 0x0200,
                    ..with_sni()
                },
                "unsupported client version",
            ),
            (
                Hello {
                    session_id: vec![1; 33],
                    ..with_sni()
                },
                "session id longer than 32 bytes",
            ),
            (
                Hello {
                    cipher_suites: vec![],
                    ..with_sni()
                },
                "bad cipher suite list",
            ),
            (
                Hello {
                    cipher_suites: vec![0x13, 0x01, 0x13],
                    ..with_sni()
                },
                "bad cipher suite list",
            ),
            (
                Hello {
                    compression: vec![],
                    ..with_sni()
                },
                "no compression methods",
            ),
            (
                Hello {
                    extensions: Some(vec![0]),
                    ..with_sni()
                },
                "truncated extensions",
            ),
            (
                Hello {
                    extensions: Some([&extensions[..], &[0]].concat()),
                    ..with_sni()
                },
                "bytes after the extensions",
            ),
            (
                Hello {
                    extensions: Some(extensions[..extensions.len() - 1].to_vec()),
                    ..with_sni()
                },
                "truncated extensions",
            ),
            (
                Hello {
                    extensions: Some(len16(&[0, 0x0a, 0, 9, 0, 2])),
                    ..with_sni()
                },
                "truncated extension",
            ),
        ];
        for (hello, why) in cases {
            assert_eq!(parse(&hello.records()), Parse::Invalid(why));
        }
    }

    #[test]
    fn invalid_server_name() {
        let name = SNI.as_bytes();
        let list = server_names(&[(NAME_TYPE_HOST_NAME, name)]);
        let cases: Vec<(Vec<u8>, &'static str)> = vec![
            (vec![], "truncated server_name list"),
            (len16(&[]), "empty server_name list"),
            (
                [&list[..], &[0]].concat(),
                "server_name list does not fill its extension",
            ),
            (
                [&[0, list[1] + 1][..], &list[2..]].concat(),
                "truncated server_name list",
            ),
            (len16(&[0, 0, 30, b'a']), "truncated server name"),
            (len16(&[0]), "truncated server name"),
            (
                server_names(&[
                    (NAME_TYPE_HOST_NAME, name),
                    (NAME_TYPE_HOST_NAME, b"other.example"),
                ]),
                "several host_name entries",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, name), (NAME_TYPE_HOST_NAME, name)]),
                "several host_name entries",
            ),
            (
                server_names(&[(7, name)]),
                "server_name without a host_name",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, b"")]),
                "empty host name",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, b"www.example.com\0.evil")]),
                "NUL or control byte in host name",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, b"www.example.com\r\n")]),
                "NUL or control byte in host name",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, "例子.中国".as_bytes())]),
                "non-ASCII host name",
            ),
            (
                server_names(&[(NAME_TYPE_HOST_NAME, b"caf\xe9.example")]),
                "non-ASCII host name",
            ),
        ];
        for (data, why) in cases {
            let hello = Hello::with_extensions(&[extension(EXTENSION_SERVER_NAME, &data)]);
            assert_eq!(parse(&hello.records()), Parse::Invalid(why), "{data:02x?}");
        }
        let twice = Hello::with_extensions(&[
            sni_extension(name),
            extension(0x0a, &[0, 2, 0, 0x1d]),
            sni_extension(name),
        ]);
        assert_eq!(
            parse(&twice.records()),
            Parse::Invalid("two server_name extensions")
        );
    }
}
