//! Reads the SNI of a QUIC connection from the client's Initial packets, without terminating QUIC.
//!
//! A QUIC client's first flight is a TLS ClientHello carried in CRYPTO frames of Initial packets
//! (RFC 9000 §17.2.2, RFC 9001 §4). Initial packets are encrypted, but with keys that anyone can
//! derive from the Destination Connection ID the client chose (RFC 9001 §5.2; RFC 9369 §3 for
//! QUIC v2), so a middlebox can read them. [`InitialReader`] does that: it parses long headers,
//! derives the client's Initial keys from the first packet's Destination Connection ID, removes
//! header protection, decrypts, walks the frames (PADDING, PING, ACK, CRYPTO; CONNECTION_CLOSE),
//! reassembles the CRYPTO stream by offset — in any order, with gaps and overlaps, across
//! coalesced packets, several Initial packets and several datagrams — into a bounded buffer, and
//! hands the ClientHello to [`clienthello::parse_handshake`]. It answers `Incomplete` until the
//! ClientHello is whole.
//!
//! It does no I/O and keeps no clock: the listener owns the datagrams (which it relays unchanged),
//! the time-out and the flow table. [`close_packet`] builds the server Initial that refuses a
//! connection with a CONNECTION_CLOSE, protected with the server Initial keys the client expects.
//!
//! Keeping the view of the ClientHello identical to the server's is what makes the decision
//! binding: CRYPTO bytes that change at an offset already seen, packets whose number was already
//! seen, and coalesced packets for another connection are what a server ignores or refuses, so
//! they are refused or ignored here too rather than read differently.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{self, HKDF_SHA256, KeyType, Prk, Salt};
use std::sync::LazyLock;

use crate::wire::clienthello::{self, ClientHelloInfo, Parse};

/// QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 1;
/// QUIC version 2 (RFC 9369).
pub const VERSION_2: u32 = 0x6b33_43cf;
/// A client must pad every datagram carrying an Initial packet to at least this (RFC 9000 §14.1);
/// servers drop smaller ones, and so does the proxy, before any cryptography.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// Connection IDs of QUIC v1 and v2 are at most 20 bytes (RFC 9000 §17.2).
pub const MAX_CID_LEN: usize = 20;
/// A client's first Destination Connection ID has at least 8 bytes (RFC 9000 §7.2).
const MIN_CLIENT_DCID_LEN: usize = 8;
/// Header protection samples 16 bytes, starting 4 bytes after the packet number (RFC 9001 §5.4.2).
const SAMPLE_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Initial packets one reader decrypts at most: a 16 KiB ClientHello fills about 15.
const MAX_PACKETS: usize = 64;
/// Packet buffer capacity a reader keeps between datagrams.
const SCRATCH_KEPT: usize = 2048;
/// Separate pieces of the CRYPTO stream held at once.
const MAX_RANGES: usize = 64;

const FRAME_PADDING: u64 = 0x00;
const FRAME_PING: u64 = 0x01;
const FRAME_ACK: u64 = 0x02;
const FRAME_ACK_ECN: u64 = 0x03;
const FRAME_CRYPTO: u64 = 0x06;
const FRAME_CONNECTION_CLOSE: u64 = 0x1c;

/// CONNECTION_REFUSED (RFC 9000 §20.1): the server refuses to accept a new connection.
pub const CONNECTION_REFUSED: u64 = 0x02;

/// The QUIC versions whose Initial packets can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Long-header packet types, by meaning (their wire bits differ between versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

impl Version {
    /// The version for a long header's version field, if it is one this module reads.
    #[must_use]
    pub fn from_wire(version: u32) -> Option<Version> {
        match version {
            VERSION_1 => Some(Version::V1),
            VERSION_2 => Some(Version::V2),
            _ => None,
        }
    }

    #[must_use]
    pub fn wire(self) -> u32 {
        match self {
            Version::V1 => VERSION_1,
            Version::V2 => VERSION_2,
        }
    }

    /// RFC 9000 §17.2 and RFC 9369 §3.2: v2 rotates the type bits.
    fn long_type(self, bits: u8) -> LongType {
        let types = match self {
            Version::V1 => [
                LongType::Initial,
                LongType::ZeroRtt,
                LongType::Handshake,
                LongType::Retry,
            ],
            Version::V2 => [
                LongType::Retry,
                LongType::Initial,
                LongType::ZeroRtt,
                LongType::Handshake,
            ],
        };
        types[usize::from(bits & 3)]
    }

    fn type_bits(self, kind: LongType) -> u8 {
        (0..4u8)
            .find(|&b| self.long_type(b) == kind)
            .unwrap_or_default()
    }

    /// The Initial salt (RFC 9001 §5.2, RFC 9369 §3.3.1).
    fn initial_salt(self) -> &'static [u8; 20] {
        match self {
            Version::V1 => &[
                0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8,
                0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a,
            ],
            Version::V2 => &[
                0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26,
                0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9,
            ],
        }
    }

    /// The Initial salt as an HMAC key, set up once per process: it is the same for every
    /// connection of a version.
    fn salt(self) -> &'static Salt {
        static SALTS: LazyLock<[Salt; 2]> = LazyLock::new(|| {
            [Version::V1, Version::V2].map(|v| Salt::new(HKDF_SHA256, v.initial_salt()))
        });
        match self {
            Version::V1 => &SALTS[0],
            Version::V2 => &SALTS[1],
        }
    }

    /// The labels of the packet key, IV and header protection key (RFC 9001 §5.1, RFC 9369
    /// §3.3.2).
    fn key_labels(self) -> [&'static [u8]; 3] {
        match self {
            Version::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Version::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }
}

/// What the first packet of a datagram says in the clear, before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek<'a> {
    /// A long-header packet of a version this module reads.
    Long {
        version: Version,
        kind: LongType,
        dcid: &'a [u8],
        scid: &'a [u8],
    },
    /// A Version Negotiation packet (version 0).
    VersionNegotiation,
    /// A long header with a version this module does not read.
    UnknownVersion(u32),
    /// A short-header (1-RTT) packet: its connection ID's length is not in the packet.
    Short,
    /// Too short or malformed to be a QUIC packet.
    NotQuic,
}

impl Peek<'_> {
    /// A client's Initial packet of a known version.
    #[must_use]
    pub fn is_initial(&self) -> bool {
        matches!(
            self,
            Peek::Long {
                kind: LongType::Initial,
                ..
            }
        )
    }
}

/// Reads the invariant header fields of the first packet in `datagram` (RFC 8999 §5).
#[must_use]
pub fn peek(datagram: &[u8]) -> Peek<'_> {
    let Some(&first) = datagram.first() else {
        return Peek::NotQuic;
    };
    if first & 0x80 == 0 {
        return if datagram.len() > 1 {
            Peek::Short
        } else {
            Peek::NotQuic
        };
    }
    let mut r = Reader(&datagram[1..]);
    let Some(version) = r.u32() else {
        return Peek::NotQuic;
    };
    let Some((dcid, scid)) = r.cid().zip(r.cid()) else {
        return Peek::NotQuic;
    };
    if version == 0 {
        return Peek::VersionNegotiation;
    }
    let Some(v) = Version::from_wire(version) else {
        return Peek::UnknownVersion(version);
    };
    if dcid.len() > MAX_CID_LEN || scid.len() > MAX_CID_LEN {
        return Peek::NotQuic;
    }
    Peek::Long {
        version: v,
        kind: v.long_type(first >> 4),
        dcid,
        scid,
    }
}

/// The answer for the datagrams read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The ClientHello is not complete yet.
    Incomplete,
    /// The ClientHello was reassembled and parsed.
    Done(ClientHelloInfo),
    /// A malformed, oversize or contradictory first flight; the text says why (for logs).
    Invalid(&'static str),
}

/// What one datagram did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fed {
    pub read: Read,
    /// At least one Initial packet in the datagram was new and decrypted with the connection's
    /// keys.
    pub accepted: bool,
    /// An Initial packet in the datagram, wherever among its coalesced packets, was not read:
    /// another connection's, undecryptable, or a repeated packet number. A listener that relays
    /// only what the reader vouches for drops such a datagram while the flow is undecided.
    pub unread: bool,
}

#[derive(Default)]
struct Seen {
    accepted: bool,
    unread: bool,
}

/// The version and Destination Connection ID of the first Initial packet among the coalesced
/// packets of `datagram` (of a version this module reads), in the clear: where a listener must
/// look for a connection's first flight, whatever packets precede it. The version matters too: a
/// client that starts over in another version (after the server's Version Negotiation) may keep
/// its Destination Connection ID, and its keys then differ.
#[must_use]
pub fn first_initial(datagram: &[u8]) -> Option<(Version, &[u8])> {
    let mut rest = datagram;
    while let Some(header) = LongHeader::parse(rest) {
        if header.kind == LongType::Initial {
            return Some((header.version, header.dcid));
        }
        rest = &rest[header.packet_len..];
    }
    None
}

/// Resumable reader of one client's Initial packets: feed it every datagram the client sends.
pub struct InitialReader {
    max_crypto: usize,
    conn: Option<Conn>,
    crypto: Crypto,
    /// Packet numbers decrypted so far (a repeated one is ignored, as a server ignores it).
    packets: Vec<u64>,
    outcome: Option<Read>,
    scratch: Vec<u8>,
}

/// The connection the first Initial packet named.
struct Conn {
    version: Version,
    dcid: Vec<u8>,
    /// The client's Source Connection ID: the Destination Connection ID of server packets.
    scid: Vec<u8>,
    keys: Keys,
}

impl std::fmt::Debug for InitialReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialReader")
            .field("version", &self.conn.as_ref().map(|c| c.version))
            .field("packets", &self.packets.len())
            .field("crypto_ranges", &self.crypto.ranges)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl InitialReader {
    /// A reader that gives up once the CRYPTO stream would need more than `max_crypto` bytes.
    #[must_use]
    pub fn new(max_crypto: usize) -> InitialReader {
        InitialReader {
            max_crypto,
            conn: None,
            crypto: Crypto::default(),
            packets: Vec::new(),
            outcome: None,
            scratch: Vec::new(),
        }
    }

    /// The connection's version, once a first Initial packet was accepted.
    #[must_use]
    pub fn version(&self) -> Option<Version> {
        self.conn.as_ref().map(|c| c.version)
    }

    /// The Destination Connection ID of the first accepted Initial packet: the one its keys
    /// derive from.
    #[must_use]
    pub fn original_dcid(&self) -> Option<&[u8]> {
        self.conn.as_ref().map(|c| c.dcid.as_slice())
    }

    /// The client's Source Connection ID, which a server's packets are addressed to.
    #[must_use]
    pub fn client_scid(&self) -> Option<&[u8]> {
        self.conn.as_ref().map(|c| c.scid.as_slice())
    }

    /// Bytes this reader holds (the CRYPTO stream so far and its packet buffer), for callers that
    /// bound the memory of many readers together.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.crypto.buf.capacity() + self.scratch.capacity()
    }

    /// Reads the Initial packets of one datagram from the client. Other packets (0-RTT,
    /// Handshake, short header) are skipped unread. Once the answer is `Done`, later datagrams are
    /// still checked: CRYPTO data that contradicts the ClientHello turns it into `Invalid`.
    pub fn feed(&mut self, datagram: &[u8]) -> Fed {
        if let Some(Read::Invalid(_)) = &self.outcome {
            return Fed {
                read: self.outcome.clone().unwrap_or(Read::Incomplete),
                accepted: false,
                unread: true,
            };
        }
        let mut seen = Seen::default();
        if let Err(why) = self.packets_of(datagram, &mut seen) {
            self.outcome = Some(Read::Invalid(why));
        }
        let Seen { accepted, unread } = seen;
        if self.scratch.capacity() > SCRATCH_KEPT {
            // A jumbo datagram's copy is not kept for the next one.
            self.scratch = Vec::new();
        }
        let read = match &self.outcome {
            Some(outcome) => outcome.clone(),
            None if accepted => match self.try_finish() {
                Read::Incomplete => Read::Incomplete,
                outcome => {
                    self.outcome = Some(outcome.clone());
                    outcome
                }
            },
            None => Read::Incomplete,
        };
        Fed {
            read,
            accepted,
            unread,
        }
    }

    /// Walks the coalesced packets of a datagram, noting in `seen` the Initial packets read and
    /// not read.
    fn packets_of(&mut self, datagram: &[u8], seen: &mut Seen) -> Result<(), &'static str> {
        let mut rest = datagram;
        let mut first_dcid: Option<&[u8]> = None;
        while let Some(header) = LongHeader::parse(rest) {
            let (packet, tail) = rest.split_at(header.packet_len);
            rest = tail;
            // RFC 9000 §12.2: coalesced packets share one Destination Connection ID; a server
            // ignores those that do not, so they must not be read as part of this connection.
            match first_dcid {
                Some(d) if d != header.dcid => {
                    return Err("coalesced packets for different connections");
                }
                _ => first_dcid = Some(header.dcid),
            }
            if header.kind != LongType::Initial {
                continue;
            }
            if self.initial_packet(packet, &header)? {
                seen.accepted = true;
            } else {
                seen.unread = true;
            }
        }
        Ok(())
    }

    /// One Initial packet: `Ok(true)` when it was new and decrypted.
    fn initial_packet(
        &mut self,
        packet: &[u8],
        header: &LongHeader<'_>,
    ) -> Result<bool, &'static str> {
        let conn = match &self.conn {
            Some(conn) => {
                if conn.version != header.version || conn.dcid != header.dcid {
                    // Another connection (or garbage): not readable with these keys.
                    return Ok(false);
                }
                conn
            }
            None => {
                if header.dcid.len() < MIN_CLIENT_DCID_LEN {
                    return Ok(false);
                }
                &*self.conn.insert(Conn {
                    version: header.version,
                    dcid: header.dcid.to_vec(),
                    scid: header.scid.to_vec(),
                    keys: Keys::derive(header.version, header.dcid, Side::Client),
                })
            }
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(packet);
        let largest = self.packets.iter().copied().max();
        let Some((pn, payload)) = open(&mut self.scratch, header.pn_offset, &conn.keys, largest)
        else {
            if self.packets.is_empty() {
                // The first packet chose the keys; one that does not decrypt chose nothing.
                self.conn = None;
            }
            return Ok(false);
        };
        if self.packets.contains(&pn) {
            return Ok(false);
        }
        if self.packets.len() >= MAX_PACKETS {
            return Err("too many initial packets");
        }
        self.packets.push(pn);
        let frames = std::mem::take(&mut self.scratch);
        let result = self.frames(&frames[payload]);
        self.scratch = frames;
        result.map(|()| true)
    }

    /// The frames of a decrypted Initial packet (RFC 9000 §12.4: only these may appear there).
    fn frames(&mut self, mut payload: &[u8]) -> Result<(), &'static str> {
        if payload.is_empty() {
            return Err("initial packet without frames");
        }
        while let Some(&first) = payload.first() {
            if first == 0 {
                // PADDING fills most of a client's Initial (RFC 9000 §14.1): a run of them is
                // skipped at once rather than read as a frame per byte.
                payload = &payload[zero_run(payload)..];
                continue;
            }
            let mut r = Reader(payload);
            let kind = r.varint().ok_or("truncated frame")?;
            match kind {
                FRAME_PADDING | FRAME_PING => {}
                FRAME_ACK | FRAME_ACK_ECN => skip_ack(&mut r, kind == FRAME_ACK_ECN)?,
                FRAME_CRYPTO => {
                    let offset = r.varint().ok_or("truncated crypto frame")?;
                    let len = r.varint().ok_or("truncated crypto frame")?;
                    let data = usize::try_from(len)
                        .ok()
                        .and_then(|len| r.take(len))
                        .ok_or("truncated crypto frame")?;
                    self.crypto.insert(offset, data, self.max_crypto)?;
                }
                FRAME_CONNECTION_CLOSE => return Err("the client closed the connection"),
                _ => return Err("frame not allowed in an initial packet"),
            }
            payload = r.0;
        }
        Ok(())
    }

    /// Parses the ClientHello once the CRYPTO stream holds all of it.
    fn try_finish(&self) -> Read {
        let prefix = self.crypto.prefix();
        let Some(&[kind, a, b, c]) = prefix.get(..4) else {
            return match prefix.first() {
                Some(&k) if k != 1 => Read::Invalid("handshake message is not a client hello"),
                _ => Read::Incomplete,
            };
        };
        if kind != 1 {
            return Read::Invalid("handshake message is not a client hello");
        }
        let total = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if total > self.max_crypto {
            return Read::Invalid("client hello too large");
        }
        if self.crypto.end() > total {
            return Read::Invalid("data after the client hello");
        }
        let Some(message) = prefix.get(..total) else {
            return Read::Incomplete;
        };
        match clienthello::parse_handshake(message) {
            Parse::Done(info) => Read::Done(info),
            Parse::Incomplete => Read::Incomplete,
            Parse::NotTls => Read::Invalid("not a client hello"),
            Parse::Invalid(why) => Read::Invalid(why),
        }
    }
}

/// The length of the run of zero bytes that `bytes` starts with, compared 32 at a time.
fn zero_run(bytes: &[u8]) -> usize {
    let mut run = 0;
    for chunk in bytes.chunks_exact(32) {
        if <[u8; 32]>::try_from(chunk).is_ok_and(|c| c != [0; 32]) {
            break;
        }
        run += 32;
    }
    let rest = &bytes[run..];
    run + rest.iter().position(|&b| b != 0).unwrap_or(rest.len())
}

/// Skips an ACK frame's fields after its type (RFC 9000 §19.3).
fn skip_ack(r: &mut Reader<'_>, ecn: bool) -> Result<(), &'static str> {
    const TRUNCATED: &str = "truncated ack frame";
    r.varint().ok_or(TRUNCATED)?; // largest acknowledged
    r.varint().ok_or(TRUNCATED)?; // ack delay
    let ranges = r.varint().ok_or(TRUNCATED)?;
    r.varint().ok_or(TRUNCATED)?; // first range
    for _ in 0..ranges {
        r.varint().ok_or(TRUNCATED)?; // gap
        r.varint().ok_or(TRUNCATED)?; // range length
    }
    if ecn {
        for _ in 0..3 {
            r.varint().ok_or(TRUNCATED)?;
        }
    }
    Ok(())
}

/// The CRYPTO stream so far: bytes by offset, and which ranges of it have arrived.
#[derive(Debug, Default)]
struct Crypto {
    buf: Vec<u8>,
    /// Sorted, disjoint, non-adjacent `[start, end)` ranges received.
    ranges: Vec<(usize, usize)>,
}

impl Crypto {
    fn insert(&mut self, offset: u64, data: &[u8], max: usize) -> Result<(), &'static str> {
        const TOO_LARGE: &str = "client hello too large";
        let start = usize::try_from(offset).map_err(|_| TOO_LARGE)?;
        let end = start.checked_add(data.len()).ok_or(TOO_LARGE)?;
        if end > max {
            return Err(TOO_LARGE);
        }
        if data.is_empty() {
            return Ok(());
        }
        // Bytes already received must not change (RFC 9000 §2.2): a server keeps what it got
        // first, so reading the new ones would decide on a ClientHello it never sees.
        for &(s, e) in &self.ranges {
            let (lo, hi) = (s.max(start), e.min(end));
            if lo < hi && self.buf[lo..hi] != data[lo - start..hi - start] {
                return Err("crypto data changed at an offset already received");
            }
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[start..end].copy_from_slice(data);
        let mut merged = (start, end);
        self.ranges.retain(|&(s, e)| {
            let touches = s <= merged.1 && merged.0 <= e;
            if touches {
                merged = (merged.0.min(s), merged.1.max(e));
            }
            !touches
        });
        let at = self.ranges.partition_point(|&(s, _)| s < merged.0);
        self.ranges.insert(at, merged);
        if self.ranges.len() > MAX_RANGES {
            return Err("crypto data too fragmented");
        }
        Ok(())
    }

    /// The bytes received without a gap from offset 0.
    fn prefix(&self) -> &[u8] {
        match self.ranges.first() {
            Some(&(0, end)) => &self.buf[..end],
            _ => &[],
        }
    }

    /// One past the highest offset received.
    fn end(&self) -> usize {
        self.ranges.last().map_or(0, |&(_, e)| e)
    }
}

/// A long-header packet of a known version whose length is known (not Retry).
struct LongHeader<'a> {
    version: Version,
    kind: LongType,
    dcid: &'a [u8],
    scid: &'a [u8],
    /// Offset of the packet number field from the start of the packet.
    pn_offset: usize,
    /// The whole packet, header included.
    packet_len: usize,
}

impl<'a> LongHeader<'a> {
    /// Parses the long header at the start of `buf`; `None` for a short header, an unknown
    /// version, a Retry or Version Negotiation packet, or a malformed or truncated one: whatever
    /// follows cannot be delimited, so the datagram's remaining bytes are not read.
    fn parse(buf: &'a [u8]) -> Option<LongHeader<'a>> {
        let (&first, rest) = buf.split_first()?;
        if first & 0x80 == 0 {
            return None;
        }
        let mut r = Reader(rest);
        let version = Version::from_wire(r.u32()?)?;
        let dcid = r.cid().filter(|c| c.len() <= MAX_CID_LEN)?;
        let scid = r.cid().filter(|c| c.len() <= MAX_CID_LEN)?;
        let kind = version.long_type(first >> 4);
        match kind {
            LongType::Retry => return None,
            LongType::Initial => {
                let token_len = usize::try_from(r.varint()?).ok()?;
                r.take(token_len)?;
            }
            LongType::ZeroRtt | LongType::Handshake => {}
        }
        let length = usize::try_from(r.varint()?).ok()?;
        let pn_offset = buf.len() - r.0.len();
        if length > r.0.len() {
            return None;
        }
        Some(LongHeader {
            version,
            kind,
            dcid,
            scid,
            pn_offset,
            packet_len: pn_offset + length,
        })
    }
}

/// Whose packets a set of Initial keys protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// One direction's Initial keys: AEAD_AES_128_GCM with its IV, and AES-128 header protection.
/// Only the direction needed is derived: reading a client's Initials costs half of deriving both.
struct Keys {
    packet: LessSafeKey,
    iv: [u8; 12],
    header: aead::quic::HeaderProtectionKey,
}

/// An output length for ring's HKDF.
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The packet protection IV (RFC 9001 §5.1), straight out of HKDF.
struct Iv([u8; 12]);

impl From<hkdf::Okm<'_, Len>> for Iv {
    fn from(okm: hkdf::Okm<'_, Len>) -> Iv {
        let mut iv = [0u8; 12];
        okm.fill(&mut iv).expect("expanded to the IV's length");
        Iv(iv)
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1), into what `len` describes: ring's
/// output keying material goes straight into the key, with no copy in between.
fn expand_label<L: KeyType, T>(secret: &Prk, label: &[u8], len: L) -> T
where
    T: for<'a> From<hkdf::Okm<'a, L>>,
{
    let out_len = u16::try_from(len.len()).unwrap_or(u16::MAX).to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).unwrap_or(u8::MAX)];
    let info = [&out_len[..], &label_len, b"tls13 ", label, &[0]];
    secret
        .expand(&info, len)
        .map(T::from)
        .expect("lengths within HKDF-SHA256's limit")
}

impl Keys {
    /// The Initial keys protecting `side`'s packets, from the client's first Destination
    /// Connection ID (RFC 9001 §5.2, RFC 9369 §3.3).
    fn derive(version: Version, original_dcid: &[u8], side: Side) -> Keys {
        let initial = version.salt().extract(original_dcid);
        let label: &[u8] = match side {
            Side::Client => b"client in",
            Side::Server => b"server in",
        };
        let secret: Prk = expand_label(&initial, label, HKDF_SHA256);
        let [key_label, iv_label, hp_label] = version.key_labels();
        let key: UnboundKey = expand_label(&secret, key_label, &aead::AES_128_GCM);
        let iv: Iv = expand_label(&secret, iv_label, Len(12));
        Keys {
            packet: LessSafeKey::new(key),
            iv: iv.0,
            header: expand_label(&secret, hp_label, &aead::quic::AES_128),
        }
    }

    /// The nonce of packet `pn`: the IV with the packet number XORed into its end (RFC 9001
    /// §5.3).
    fn nonce(&self, pn: u64) -> Nonce {
        let mut nonce = self.iv;
        for (n, p) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
            *n ^= p;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// The header protection mask for `sample` (RFC 9001 §5.4.1).
    fn mask(&self, sample: &[u8]) -> Option<[u8; 5]> {
        self.header.new_mask(sample).ok()
    }
}

/// Removes header protection from the long-header packet `packet` (exactly one packet, modified
/// in place) and decrypts its payload. Returns the full packet number and where the plaintext
/// frames are in `packet`; `None` when the packet is too short or does not authenticate.
fn open(
    packet: &mut [u8],
    pn_offset: usize,
    keys: &Keys,
    largest: Option<u64>,
) -> Option<(u64, std::ops::Range<usize>)> {
    let sample_at = pn_offset + 4;
    let mask = keys.mask(packet.get(sample_at..sample_at + SAMPLE_LEN)?)?;
    let first = packet.first_mut()?;
    *first ^= mask[0] & 0x0f; // long header: the low 4 bits are protected
    let pn_len = usize::from(*first & 3) + 1;
    let pn_field = packet.get_mut(pn_offset..pn_offset + pn_len)?;
    for (b, m) in pn_field.iter_mut().zip(&mask[1..]) {
        *b ^= m;
    }
    let truncated = pn_field.iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let pn = decode_packet_number(largest, truncated, pn_len * 8);
    let header_len = pn_offset + pn_len;
    let (header, payload) = packet.split_at_mut(header_len);
    if payload.len() < TAG_LEN {
        return None;
    }
    let plain = keys
        .packet
        .open_in_place(keys.nonce(pn), Aad::from(&*header), payload)
        .ok()?
        .len();
    Some((pn, header_len..header_len + plain))
}

/// RFC 9000 Appendix A.3.
fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: usize) -> u64 {
    let expected = largest.map_or(0, |l| l + 1);
    let win = 1u64 << bits;
    let hwin = win / 2;
    let mask = win - 1;
    let candidate = (expected & !mask) | truncated;
    if candidate + hwin <= expected && candidate < (1 << 62) - win {
        candidate + win
    } else if candidate > expected + hwin && candidate >= win {
        candidate - win
    } else {
        candidate
    }
}

/// Builds and protects one long-header packet of `kind` with `keys` (a 2-byte packet number, a
/// 2-byte Length). `payload` is the frames; it is padded with PADDING if too short to sample.
fn seal(
    version: Version,
    kind: LongType,
    keys: &Keys,
    dcid: &[u8],
    scid: &[u8],
    pn: u16,
    payload: &[u8],
) -> Vec<u8> {
    const PN_LEN: usize = 2;
    let mut payload = payload.to_vec();
    // The sample needs 4 bytes after the packet number's start plus 16 (RFC 9001 §5.4.2).
    payload.resize(payload.len().max(4 - PN_LEN + SAMPLE_LEN - TAG_LEN + 2), 0);
    let mut packet = vec![0xc0 | version.type_bits(kind) << 4 | (PN_LEN as u8 - 1)];
    packet.extend_from_slice(&version.wire().to_be_bytes());
    for cid in [dcid, scid] {
        packet.push(u8::try_from(cid.len()).unwrap_or(u8::MAX));
        packet.extend_from_slice(cid);
    }
    if kind == LongType::Initial {
        packet.push(0); // no token
    }
    let length = (PN_LEN + payload.len() + TAG_LEN) as u64;
    write_varint2(&mut packet, length);
    let pn_offset = packet.len();
    packet.extend_from_slice(&pn.to_be_bytes());
    let tag = keys
        .packet
        .seal_in_place_separate_tag(keys.nonce(u64::from(pn)), Aad::from(&packet), &mut payload)
        .expect("an Initial packet is far below the AEAD's size limit");
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(tag.as_ref());
    let mask = keys
        .mask(&packet[pn_offset + 4..pn_offset + 4 + SAMPLE_LEN])
        .expect("a 16-byte sample");
    packet[0] ^= mask[0] & 0x0f;
    for (b, m) in packet[pn_offset..pn_offset + PN_LEN]
        .iter_mut()
        .zip(&mask[1..])
    {
        *b ^= m;
    }
    packet
}

/// A varint in two bytes (values below 16 384), as a Length field is usually written.
fn write_varint2(out: &mut Vec<u8>, value: u64) {
    let v = u16::try_from(value).unwrap_or(0x3fff).min(0x3fff) | 0x4000;
    out.extend_from_slice(&v.to_be_bytes());
}

/// A varint in its shortest form (RFC 9000 §16).
fn write_varint(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0x3f => out.push(value as u8),
        0x40..=0x3fff => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// The server Initial packet that refuses a connection: a CONNECTION_CLOSE frame with
/// CONNECTION_REFUSED and `reason`, protected with the server Initial keys that derive from the
/// client's `original_dcid`. It is addressed to the client's `client_scid`; `server_scid` is
/// the connection ID the "server" claims.
#[must_use]
pub fn close_packet(
    version: Version,
    original_dcid: &[u8],
    client_scid: &[u8],
    server_scid: &[u8],
    reason: &[u8],
) -> Vec<u8> {
    let keys = Keys::derive(version, original_dcid, Side::Server);
    let mut frame = Vec::with_capacity(8 + reason.len());
    write_varint(&mut frame, FRAME_CONNECTION_CLOSE);
    write_varint(&mut frame, CONNECTION_REFUSED);
    write_varint(&mut frame, 0); // the frame type that caused it: none
    write_varint(&mut frame, reason.len() as u64);
    frame.extend_from_slice(reason);
    seal(
        version,
        LongType::Initial,
        &keys,
        client_scid,
        server_scid,
        0,
        &frame,
    )
}

/// A client Initial packet carrying `frames`, protected with the client Initial keys of `dcid`,
/// as a client would send it (without the padding to 1 200 bytes: add a PADDING-filled packet or
/// pass padded `frames`). For tests, benches and fuzzing.
#[must_use]
pub fn client_initial(
    version: Version,
    dcid: &[u8],
    scid: &[u8],
    pn: u16,
    frames: &[u8],
) -> Vec<u8> {
    let keys = Keys::derive(version, dcid, Side::Client);
    seal(version, LongType::Initial, &keys, dcid, scid, pn, frames)
}

/// A CRYPTO frame carrying `data` at `offset`. For tests, benches and fuzzing.
#[must_use]
pub fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = vec![FRAME_CRYPTO as u8];
    write_varint(&mut out, offset);
    write_varint(&mut out, data.len() as u64);
    out.extend_from_slice(data);
    out
}

/// A ClientHello handshake message for `sni` with `pad` bytes of an unknown extension, so that
/// it can be made to span several packets. For tests, benches and fuzzing; `sni` and `pad` stay
/// well under 64 KiB.
#[must_use]
pub fn client_hello(sni: &str, pad: usize) -> Vec<u8> {
    let be16 = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes();
    let mut body = vec![3, 3];
    body.extend([0x11; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // one cipher suite
    body.extend([1, 0]); // null compression
    let name = sni.as_bytes();
    let list_len = name.len() + 3;
    let mut ext = vec![0, 0];
    ext.extend(be16(list_len + 2));
    ext.extend(be16(list_len));
    ext.push(0);
    ext.extend(be16(name.len()));
    ext.extend(name);
    ext.extend([0xff, 0x99]);
    ext.extend(be16(pad));
    ext.extend(std::iter::repeat_n(0x5a, pad));
    body.extend(be16(ext.len()));
    body.extend(ext);
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes();
    [&[1u8][..], &len[1..], &body].concat()
}

/// Cursor over packet bytes: every read is bounds-checked and yields `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let (&bytes, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(bytes))
    }

    /// A connection ID with its one-byte length.
    fn cid(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.0.split_first()?;
        self.0 = rest;
        self.take(usize::from(len))
    }

    /// A variable-length integer (RFC 9000 §16).
    fn varint(&mut self) -> Option<u64> {
        let &first = self.0.first()?;
        let len = 1usize << (first >> 6);
        let bytes = self.take(len)?;
        Some(
            bytes[1..]
                .iter()
                .fold(u64::from(first & 0x3f), |n, &b| n << 8 | u64::from(b)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/quic");
    /// RFC 9001 Appendix A and RFC 9369 Appendix A: the client's original Destination
    /// Connection ID.
    const RFC_DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
    const DCID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
    const SCID: [u8; 4] = [9, 9, 9, 9];

    fn hex_file(name: &str) -> Vec<u8> {
        let path = format!("{TESTDATA}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn done(fed: Fed) -> ClientHelloInfo {
        match fed.read {
            Read::Done(info) => info,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    /// Pads a datagram to the 1 200 bytes a client sends, with a PADDING-only frame list.
    fn padded(frames: &[u8], target_packet: usize) -> Vec<u8> {
        let mut f = frames.to_vec();
        // Header overhead of `client_initial` with DCID/SCID above: 1+4+1+8+1+4+1+2+2 = 24, tag 16.
        let overhead = 24 + TAG_LEN;
        if f.len() + overhead < target_packet {
            f.resize(target_packet - overhead, 0);
        }
        f
    }

    fn initial(pn: u16, frames: &[u8]) -> Vec<u8> {
        client_initial(
            Version::V1,
            &DCID,
            &SCID,
            pn,
            &padded(frames, MIN_INITIAL_DATAGRAM),
        )
    }

    #[test]
    fn rfc9001_client_initial_decrypts_to_the_known_crypto_frame() {
        let packet = hex_file("rfc9001-a2-client-initial.hex");
        let frame = hex_file("rfc9001-a2-crypto-frame.hex");
        assert_eq!(packet.len(), 1200);
        let header = LongHeader::parse(&packet).expect("a long header");
        assert_eq!(
            (header.version, header.kind),
            (Version::V1, LongType::Initial)
        );
        assert_eq!(header.dcid, RFC_DCID);
        let keys = Keys::derive(Version::V1, header.dcid, Side::Client);
        let mut buf = packet.clone();
        let (pn, plain) = open(&mut buf, header.pn_offset, &keys, None).unwrap();
        assert_eq!(pn, 2);
        assert_eq!(&buf[plain.clone()][..frame.len()], &frame[..]);
        assert!(buf[plain][frame.len()..].iter().all(|&b| b == 0), "PADDING");

        let mut reader = InitialReader::new(16384);
        let info = done(reader.feed(&packet));
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert_eq!(reader.version(), Some(Version::V1));
        assert_eq!(reader.original_dcid(), Some(&RFC_DCID[..]));
    }

    #[test]
    fn rfc9369_client_initial_decrypts_to_the_known_crypto_frame() {
        let packet = hex_file("rfc9369-a2-client-initial.hex");
        let frame = hex_file("rfc9001-a2-crypto-frame.hex");
        let header = LongHeader::parse(&packet).expect("a long header");
        assert_eq!(
            (header.version, header.kind),
            (Version::V2, LongType::Initial)
        );
        let keys = Keys::derive(Version::V2, header.dcid, Side::Client);
        let mut buf = packet.clone();
        let (pn, plain) = open(&mut buf, header.pn_offset, &keys, None).unwrap();
        assert_eq!(pn, 2);
        assert_eq!(&buf[plain][..frame.len()], &frame[..]);
        let info = done(InitialReader::new(16384).feed(&packet));
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert!(peek(&packet).is_initial());
    }

    /// RFC 9001 A.3 and RFC 9369 A.3: the server's Initial opens with the server keys derived
    /// from the client's DCID (the derivation the forged close packet uses), and with packet
    /// number 1 and the known payload.
    #[test]
    fn rfc_server_initials_open_with_the_server_keys() {
        let payload = hex_file("rfc9001-a3-server-payload.hex");
        for (version, file) in [
            (Version::V1, "rfc9001-a3-server-initial.hex"),
            (Version::V2, "rfc9369-a3-server-initial.hex"),
        ] {
            let packet = hex_file(file);
            let header = LongHeader::parse(&packet).expect("a long header");
            assert_eq!((header.version, header.kind), (version, LongType::Initial));
            assert_eq!(header.packet_len, packet.len());
            let mut buf = packet.clone();
            let keys = Keys::derive(version, &RFC_DCID, Side::Server);
            let (pn, plain) = open(&mut buf, header.pn_offset, &keys, None).unwrap();
            assert_eq!(pn, 1, "{version:?}");
            assert_eq!(&buf[plain], &payload[..], "{version:?}");
            let mut buf = packet.clone();
            let wrong = Keys::derive(version, &RFC_DCID, Side::Client);
            assert!(open(&mut buf, header.pn_offset, &wrong, None).is_none());
        }
    }

    #[test]
    fn a_corrupted_packet_is_not_accepted_and_chooses_no_keys() {
        let mut packet = hex_file("rfc9001-a2-client-initial.hex");
        packet[600] ^= 1;
        let mut reader = InitialReader::new(16384);
        let fed = reader.feed(&packet);
        assert_eq!(
            fed,
            Fed {
                read: Read::Incomplete,
                accepted: false,
                unread: true,
            }
        );
        assert_eq!(reader.version(), None);
        // The genuine packet still reads afterwards.
        packet[600] ^= 1;
        assert!(matches!(reader.feed(&packet).read, Read::Done(_)));
    }

    #[test]
    fn peek_reads_headers_in_the_clear() {
        let v1 = hex_file("rfc9001-a2-client-initial.hex");
        assert_eq!(
            peek(&v1),
            Peek::Long {
                version: Version::V1,
                kind: LongType::Initial,
                dcid: &RFC_DCID,
                scid: &[],
            }
        );
        let mut vn = v1.clone();
        vn[1..5].copy_from_slice(&[0; 4]);
        assert_eq!(peek(&vn), Peek::VersionNegotiation);
        vn[1..5].copy_from_slice(&[0xfa, 0xce, 0xb0, 0x0c]);
        assert_eq!(peek(&vn), Peek::UnknownVersion(0xface_b00c));
        assert_eq!(peek(&[0x40, 1, 2, 3]), Peek::Short);
        assert_eq!(peek(&[]), Peek::NotQuic);
        assert_eq!(peek(&[0xc0, 0, 0, 0, 1, 30]), Peek::NotQuic);
        assert_eq!(peek(b"GET / HTTP/1.1\r\n"), Peek::Short);
    }

    #[test]
    fn a_client_hello_across_two_datagrams_out_of_order() {
        let hello = client_hello("www.filed.cn", 3000);
        let (a, b) = hello.split_at(1100);
        let second = initial(1, &crypto_frame(1100, b));
        let first = initial(0, &crypto_frame(0, a));
        let mut reader = InitialReader::new(16384);
        let fed = reader.feed(&second);
        assert_eq!(
            fed,
            Fed {
                read: Read::Incomplete,
                accepted: true,
                unread: false,
            }
        );
        let info = done(reader.feed(&first));
        assert_eq!(info.sni.as_deref(), Some("www.filed.cn"));
        assert_eq!(info.len, hello.len());
    }

    #[test]
    fn coalesced_packets_ping_ack_and_padding_between_frames() {
        let hello = client_hello("a.example.cn", 200);
        let (a, b) = hello.split_at(50);
        let mut frames1 = vec![0, 0, 1]; // PADDING, PADDING, PING
        frames1.extend([2, 0, 0, 0, 0]); // ACK largest 0, delay 0, no extra range, first 0
        frames1.extend(crypto_frame(50, b));
        frames1.extend([3, 1, 0, 1, 0, 0, 0, 7, 8, 9]); // ACK_ECN with one more range
        let frames2 = [crypto_frame(0, a), vec![0; 10]].concat();
        let mut datagram = client_initial(Version::V2, &DCID, &SCID, 7, &frames1);
        datagram.extend(client_initial(
            Version::V2,
            &DCID,
            &SCID,
            8,
            &padded(&frames2, 1100),
        ));
        let info = done(InitialReader::new(16384).feed(&datagram));
        assert_eq!(info.sni.as_deref(), Some("a.example.cn"));
    }

    #[test]
    fn non_initial_packets_are_skipped_and_short_headers_end_the_datagram() {
        let hello = client_hello("x.example.cn", 0);
        let keys = Keys::derive(Version::V1, &DCID, Side::Client);
        let mut datagram = seal(
            Version::V1,
            LongType::ZeroRtt,
            &keys,
            &DCID,
            &SCID,
            0,
            &[0xaa; 40],
        );
        datagram.extend(initial(0, &crypto_frame(0, &hello)));
        datagram.extend([0x40, 1, 2, 3]);
        let fed = InitialReader::new(16384).feed(&datagram);
        assert!(fed.accepted);
        assert_eq!(done(fed).sni.as_deref(), Some("x.example.cn"));
    }

    #[test]
    fn an_initial_behind_another_packet_is_found_and_read() {
        let hello = client_hello("x.example.cn", 0);
        let keys = Keys::derive(Version::V1, &DCID, Side::Client);
        let zero_rtt = seal(
            Version::V1,
            LongType::ZeroRtt,
            &keys,
            &DCID,
            &SCID,
            0,
            &[0xaa; 40],
        );
        assert_eq!(first_initial(&zero_rtt), None);
        let datagram = [zero_rtt.clone(), initial(0, &crypto_frame(0, &hello))].concat();
        assert!(!peek(&datagram).is_initial());
        assert_eq!(first_initial(&datagram), Some((Version::V1, &DCID[..])));
        let fed = InitialReader::new(16384).feed(&datagram);
        assert!(fed.accepted && !fed.unread);
        assert_eq!(done(fed).sni.as_deref(), Some("x.example.cn"));

        // The same, with an Initial that does not decrypt: flagged unread.
        let mut bad = initial(0, &crypto_frame(0, &hello));
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let fed = InitialReader::new(16384).feed(&[zero_rtt, bad].concat());
        assert!(!fed.accepted && fed.unread);
    }

    #[test]
    fn changed_crypto_bytes_are_refused_even_after_the_decision() {
        let hello = client_hello("www.filed.cn", 0);
        let mut reader = InitialReader::new(16384);
        done(reader.feed(&initial(0, &crypto_frame(0, &hello))));
        // A retransmission with the same bytes is fine.
        assert!(matches!(
            reader.feed(&initial(1, &crypto_frame(0, &hello))).read,
            Read::Done(_)
        ));
        let other = client_hello("www.other.cn", 0);
        let fed = reader.feed(&initial(2, &crypto_frame(0, &other)));
        assert_eq!(
            fed.read,
            Read::Invalid("crypto data changed at an offset already received")
        );
        // Sticky.
        assert!(matches!(
            reader.feed(&initial(3, &crypto_frame(0, &hello))).read,
            Read::Invalid(_)
        ));
    }

    #[test]
    fn a_repeated_packet_number_is_ignored_as_a_server_ignores_it() {
        let hello = client_hello("www.filed.cn", 0);
        let (a, b) = hello.split_at(20);
        let mut reader = InitialReader::new(16384);
        assert!(reader.feed(&initial(0, &crypto_frame(0, a))).accepted);
        let fed = reader.feed(&initial(0, &crypto_frame(20, b)));
        assert_eq!(
            fed,
            Fed {
                read: Read::Incomplete,
                accepted: false,
                unread: true,
            }
        );
        assert!(matches!(
            reader.feed(&initial(1, &crypto_frame(20, b))).read,
            Read::Done(_)
        ));
    }

    #[test]
    fn bad_first_flights_are_invalid() {
        let hello = client_hello("www.filed.cn", 0);
        let cases: [(Vec<u8>, &str); 6] = [
            (vec![0x08, 0, 0], "frame not allowed in an initial packet"),
            (
                [&[0x1c, 0, 0, 0][..]].concat(),
                "the client closed the connection",
            ),
            (
                crypto_frame(0, &[2, 0, 0, 1, 0]),
                "handshake message is not a client hello",
            ),
            (crypto_frame(20_000, b"x"), "client hello too large"),
            (
                crypto_frame(0, &[1, 0xff, 0xff, 0xff]),
                "client hello too large",
            ),
            (
                [
                    crypto_frame(0, &hello),
                    crypto_frame(hello.len() as u64, b"more"),
                ]
                .concat(),
                "data after the client hello",
            ),
        ];
        for (frames, why) in cases {
            let fed = InitialReader::new(16384).feed(&initial(0, &frames));
            assert_eq!(fed.read, Read::Invalid(why), "{frames:02x?}");
        }
        // Packets of another connection coalesced behind the first.
        let mut datagram = initial(0, &crypto_frame(0, &hello));
        datagram.extend(client_initial(Version::V1, &[7; 8], &SCID, 1, &[1]));
        assert_eq!(
            InitialReader::new(16384).feed(&datagram).read,
            Read::Invalid("coalesced packets for different connections")
        );
    }

    #[test]
    fn initials_for_another_connection_id_are_not_read() {
        let hello = client_hello("www.filed.cn", 0);
        let mut reader = InitialReader::new(16384);
        let (a, b) = hello.split_at(10);
        assert!(reader.feed(&initial(0, &crypto_frame(0, a))).accepted);
        let other = client_initial(
            Version::V1,
            &[7; 8],
            &SCID,
            1,
            &padded(&crypto_frame(10, b), 1200),
        );
        assert_eq!(
            reader.feed(&other),
            Fed {
                read: Read::Incomplete,
                accepted: false,
                unread: true,
            }
        );
        let v2 = client_initial(
            Version::V2,
            &DCID,
            &SCID,
            1,
            &padded(&crypto_frame(10, b), 1200),
        );
        assert_eq!(
            reader.feed(&v2),
            Fed {
                read: Read::Incomplete,
                accepted: false,
                unread: true,
            }
        );
        // Too short a first connection ID chooses no keys.
        let short = client_initial(
            Version::V1,
            &[7; 4],
            &SCID,
            0,
            &padded(&crypto_frame(0, &hello), 1200),
        );
        assert_eq!(
            InitialReader::new(16384).feed(&short),
            Fed {
                read: Read::Incomplete,
                accepted: false,
                unread: true,
            }
        );
    }

    #[test]
    fn zero_runs_are_measured_across_the_32_byte_steps() {
        for len in [0usize, 1, 31, 32, 33, 64, 100] {
            for at in 0..=len {
                let mut bytes = vec![0u8; len];
                if let Some(b) = bytes.get_mut(at) {
                    *b = 0x06;
                }
                assert_eq!(zero_run(&bytes), at.min(len), "len {len}, nonzero at {at}");
            }
        }
    }

    #[test]
    fn packet_numbers_decode_per_rfc9000_a3() {
        assert_eq!(
            decode_packet_number(Some(0xa82f30ea), 0x9b32, 16),
            0xa82f9b32
        );
        assert_eq!(decode_packet_number(None, 2, 32), 2);
        assert_eq!(decode_packet_number(Some(255), 0, 8), 256);
    }

    #[test]
    fn the_forged_close_decrypts_as_a_connection_close_for_the_client() {
        for version in [Version::V1, Version::V2] {
            let packet = close_packet(version, &DCID, &SCID, &[0xee; 8], b"ICP filing required");
            let header = LongHeader::parse(&packet).unwrap();
            assert_eq!(header.packet_len, packet.len());
            assert_eq!((header.version, header.kind), (version, LongType::Initial));
            assert_eq!(
                header.dcid, SCID,
                "addressed to the client's source connection id"
            );
            // The client's view: it opens server packets with the server keys it derives.
            let server = Keys::derive(version, &DCID, Side::Server);
            let client = Keys::derive(version, &DCID, Side::Client);
            let mut buf = packet.clone();
            let (pn, plain) = open(&mut buf, header.pn_offset, &server, None).unwrap();
            assert_eq!(pn, 0);
            let mut r = Reader(&buf[plain]);
            assert_eq!(r.varint(), Some(FRAME_CONNECTION_CLOSE));
            assert_eq!(r.varint(), Some(CONNECTION_REFUSED));
            assert_eq!(r.varint(), Some(0));
            let len = r.varint().unwrap() as usize;
            assert_eq!(r.take(len), Some(&b"ICP filing required"[..]));
            // The client's own keys cannot open it: it really is a server packet.
            let mut buf = packet.clone();
            assert!(open(&mut buf, header.pn_offset, &client, None).is_none());
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// However the ClientHello is cut into CRYPTO frames, packed into packets and
            /// datagrams, repeated in overlapping pieces and reordered, the reader finds the
            /// same SNI, and answers Incomplete until the last missing byte arrives.
            #[test]
            fn any_splitting_and_order_reads_the_same_sni(
                pad in 0usize..4000,
                cuts in proptest::collection::vec(80usize..1100, 1..12),
                overlap in proptest::collection::vec(0usize..64, 12),
                order in any::<u64>(),
                per_packet in 1usize..4,
            ) {
                let hello = client_hello("www.split.example.cn", pad);
                // Frames [start, end) covering the hello, each reaching back `overlap` bytes.
                let mut frames = Vec::new();
                let mut start = 0;
                let mut i = 0;
                while start < hello.len() {
                    let end = (start + cuts[i % cuts.len()]).min(hello.len());
                    let from = start.saturating_sub(overlap[i % overlap.len()]);
                    frames.push(crypto_frame(from as u64, &hello[from..end]));
                    start = end;
                    i += 1;
                }
                // Shuffle deterministically from the drawn seed.
                let mut seed = order;
                for k in (1..frames.len()).rev() {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    frames.swap(k, (seed >> 33) as usize % (k + 1));
                }
                let datagrams: Vec<Vec<u8>> = frames
                    .chunks(per_packet)
                    .enumerate()
                    .map(|(pn, group)| initial(pn as u16, &group.concat()))
                    .collect();
                let mut reader = InitialReader::new(16384);
                for (n, d) in datagrams.iter().enumerate() {
                    let fed = reader.feed(d);
                    prop_assert!(fed.accepted);
                    if n + 1 < datagrams.len() {
                        prop_assert!(matches!(fed.read, Read::Incomplete | Read::Done(_)));
                    } else {
                        let info = match fed.read {
                            Read::Done(info) => info,
                            other => return Err(TestCaseError::fail(format!("{other:?}"))),
                        };
                        prop_assert_eq!(info.sni.as_deref(), Some("www.split.example.cn"));
                    }
                }
            }

            /// Arbitrary bytes never panic the reader, and peek agrees with it about Initials.
            #[test]
            fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
                let mut reader = InitialReader::new(16384);
                let _ = reader.feed(&bytes);
                let _ = peek(&bytes);
            }
        }
    }
}
