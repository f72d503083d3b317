//! The answer a blocked HTTP request gets (docs/behaviour.md): the bilingual block page, its JSON form, or
//! a redirect to a page the provider hosts.
//!
//! The template is split into literal pieces and placeholders once, when the config is loaded,
//! and specialised per reason (the reason and advice texts filled in), so rendering a page is the
//! host, the request id and the time between a few buffer appends.

use std::path::PathBuf;

use bytes::{BufMut, Bytes};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};

use crate::config::BlockPageConfig;
use crate::core::decision::Reason;
use crate::observe::metrics::UpstreamError;
use crate::wire::{clock, http1};

/// The page used when `block_page.template` is not set.
const BUILT_IN_TEMPLATE: &str = include_str!("../../config/block.html");

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// Header carrying the reason code on every answer icp-gate makes itself.
pub(crate) const REASON_HEADER: HeaderName = HeaderName::from_static("icp-gate-reason");
pub(crate) const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, thiserror::Error)]
pub enum BlockPageError {
    #[error("block_page.template: cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a block answer says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockContext<'a> {
    /// The normalised host (empty when the request had none).
    pub host: &'a str,
    pub reason: Reason,
    /// A [`RequestId`](crate::observe::logging::RequestId)'s text: hex digits, put into pages
    /// and redirects as they are.
    pub request_id: &'a str,
}

/// Short reason texts, in the filing system's own words.
pub(crate) fn reason_texts(reason: Reason) -> (&'static str, &'static str) {
    match reason {
        Reason::Unfiled => ("未备案", "this domain has no ICP filing"),
        Reason::NotAccessed => (
            "已备案但未接入本服务商",
            "filed, but its access (接入) is not registered with this provider",
        ),
        Reason::Revoked => (
            "备案已注销",
            "the ICP filing of this domain has been revoked",
        ),
        Reason::MissingHost => ("请求未携带域名", "the request names no host"),
        Reason::IpLiteral => (
            "不允许通过IP地址直接访问",
            "access by IP address is not allowed",
        ),
        Reason::NoSni => ("请求未携带域名", "the connection names no host (no SNI)"),
        Reason::InvalidHost | Reason::InvalidSni | Reason::NotTls => {
            ("域名无效", "the host name is not valid")
        }
        // Never a block, so never on a page; listed so that a new reason must pick its text.
        Reason::NoRoute
        | Reason::NonMainland
        | Reason::Exempt
        | Reason::FiledElsewhere
        | Reason::Filed => ("域名无效", "the host name is not valid"),
    }
}

/// What the site owner should do about it.
fn advice_texts(reason: Reason) -> (&'static str, &'static str) {
    match reason {
        Reason::Unfiled => (
            "网站所有者：请为该域名办理ICP备案，并通过本服务商完成接入后再访问。",
            "Site owner: obtain an ICP filing for this domain and add its access (接入) through this provider.",
        ),
        Reason::NotAccessed => (
            "网站所有者：该域名已有备案，但尚未在本服务商接入。请在本服务商的备案系统中提交接入（新增接入）申请。",
            "Site owner: this domain is filed, but not with this provider. Submit an access (接入) application in this provider's filing system.",
        ),
        Reason::Revoked => (
            "网站所有者：该域名的备案已被注销。请重新办理ICP备案并在本服务商接入。",
            "Site owner: the filing for this domain was revoked. File again and add access through this provider.",
        ),
        Reason::MissingHost
        | Reason::InvalidHost
        | Reason::InvalidSni
        | Reason::NotTls
        | Reason::IpLiteral
        | Reason::NoSni
        | Reason::NoRoute
        | Reason::NonMainland
        | Reason::Exempt
        | Reason::FiledElsewhere
        | Reason::Filed => (
            "访客：请使用网站的正式域名访问。",
            "Visitor: please use the site's domain name.",
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Host,
    Reason,
    ReasonZh,
    ReasonEn,
    AdviceZh,
    AdviceEn,
    RequestId,
    Time,
}

const SLOTS: [(&str, Slot); 8] = [
    ("{host}", Slot::Host),
    ("{reason}", Slot::Reason),
    ("{reason_zh}", Slot::ReasonZh),
    ("{reason_en}", Slot::ReasonEn),
    ("{advice_zh}", Slot::AdviceZh),
    ("{advice_en}", Slot::AdviceEn),
    ("{request_id}", Slot::RequestId),
    ("{time}", Slot::Time),
];

#[derive(Debug, Clone)]
enum Piece {
    Text(Bytes),
    Slot(Slot),
}

/// A template compiled into pieces. Only the exact placeholder names are special, so the CSS
/// braces of an operator's page pass through untouched.
#[derive(Debug, Clone)]
struct Template {
    pieces: Vec<Piece>,
    literal_len: usize,
}

impl Template {
    fn compile(text: &str) -> Template {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            rest = &rest[open..];
            match SLOTS.iter().find(|(name, _)| rest.starts_with(name)) {
                Some((name, slot)) => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(Bytes::from(std::mem::take(&mut literal))));
                    }
                    pieces.push(Piece::Slot(*slot));
                    rest = &rest[name.len()..];
                }
                None => {
                    literal.push('{');
                    rest = &rest[1..];
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(Bytes::from(literal)));
        }
        Template::new(pieces)
    }

    fn new(pieces: Vec<Piece>) -> Template {
        let literal_len = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Slot(_) => 0,
            })
            .sum();
        Template {
            pieces,
            literal_len,
        }
    }

    /// This template with the slots that depend only on `reason` filled in and merged into the
    /// literal text around them.
    fn for_reason(&self, reason: Reason, escape: fn(&mut Vec<u8>, &str)) -> Template {
        let mut pieces = Vec::new();
        let mut text = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => text.put_slice(t),
                Piece::Slot(slot) => match reason_text(*slot, reason) {
                    Some(fixed) => escape(&mut text, fixed),
                    None => {
                        if !text.is_empty() {
                            pieces.push(Piece::Text(Bytes::from(std::mem::take(&mut text))));
                        }
                        pieces.push(Piece::Slot(*slot));
                    }
                },
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(Bytes::from(text)));
        }
        Template::new(pieces)
    }

    fn render(&self, ctx: &BlockContext<'_>, escape: fn(&mut Vec<u8>, &str)) -> Bytes {
        let mut out = Vec::with_capacity(self.literal_len + 256);
        self.render_into(&mut out, ctx, escape);
        Bytes::from(out)
    }

    /// Appends the filled-in template to `out`.
    fn render_into(
        &self,
        out: &mut Vec<u8>,
        ctx: &BlockContext<'_>,
        escape: fn(&mut Vec<u8>, &str),
    ) {
        out.reserve(self.literal_len + 256);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.put_slice(t),
                Piece::Slot(Slot::Host) => escape(out, ctx.host),
                // Hex digits ([`RequestId`](crate::observe::logging::RequestId)): nothing to
                // escape in HTML or a URL.
                Piece::Slot(Slot::RequestId) => out.put_slice(ctx.request_id.as_bytes()),
                // Digits, '-', ':', 'T' and 'Z': nothing to escape either.
                Piece::Slot(Slot::Time) => out.put_slice(&clock::rfc3339()),
                Piece::Slot(slot) => {
                    if let Some(fixed) = reason_text(*slot, ctx.reason) {
                        escape(out, fixed);
                    }
                }
            }
        }
    }
}

/// The text of a slot that depends only on the reason (`None` for per-request slots).
fn reason_text(slot: Slot, reason: Reason) -> Option<&'static str> {
    let (reason_zh, reason_en) = reason_texts(reason);
    let (advice_zh, advice_en) = advice_texts(reason);
    match slot {
        Slot::Reason => Some(reason.as_str()),
        Slot::ReasonZh => Some(reason_zh),
        Slot::ReasonEn => Some(reason_en),
        Slot::AdviceZh => Some(advice_zh),
        Slot::AdviceEn => Some(advice_en),
        Slot::Host | Slot::RequestId | Slot::Time => None,
    }
}

/// The compiled block answer for the current config: the page (or redirect) specialised for
/// each reason, indexed by `Reason as usize`.
#[derive(Debug, Clone)]
pub(crate) struct BlockPage {
    status: StatusCode,
    pages: Vec<Template>,
    redirects: Option<Vec<Template>>,
    /// Per reason, the HTML and the JSON answer's head up to its request id, written once here
    /// rather than header by header for every request (that was ~8 % of a blocked request's
    /// instructions). `None` with a redirect, whose `location` differs per request.
    heads: Option<Vec<[Vec<u8>; 2]>>,
}

fn per_reason(template: &Template, escape: fn(&mut Vec<u8>, &str)) -> Vec<Template> {
    Reason::ALL
        .iter()
        .enumerate()
        .map(|(i, &reason)| {
            debug_assert_eq!(reason as usize, i);
            template.for_reason(reason, escape)
        })
        .collect()
}

impl BlockPage {
    pub(crate) fn load(cfg: &BlockPageConfig) -> Result<BlockPage, BlockPageError> {
        let text = match &cfg.template {
            Some(path) => std::fs::read_to_string(path).map_err(|source| BlockPageError::Read {
                path: path.clone(),
                source,
            })?,
            None => BUILT_IN_TEMPLATE.to_string(),
        };
        // The config validated the range, so this cannot fail; 403 is the safe fallback.
        let status = StatusCode::from_u16(cfg.status).unwrap_or(StatusCode::FORBIDDEN);
        let redirects = cfg
            .redirect
            .as_deref()
            .map(|r| per_reason(&Template::compile(r), escape_url));
        let heads = redirects.is_none().then(|| {
            Reason::ALL
                .iter()
                .map(|&reason| {
                    [HTML, JSON].map(|content_type| {
                        let answer = Answer {
                            status,
                            content_type,
                            location: None,
                            reason: Some(reason),
                            request_id: "",
                            head_start: None,
                            body: (),
                        };
                        let mut head = Vec::new();
                        http1::write_head_start(&mut head, status, answer.leading_headers());
                        head
                    })
                })
                .collect()
        });
        Ok(BlockPage {
            status,
            pages: per_reason(&Template::compile(&text), escape_html),
            redirects,
            heads,
        })
    }

    /// The answer to a blocked request. `json`: the client asked for `application/json`.
    pub(crate) fn answer<'c>(&'c self, ctx: &BlockContext<'c>, json: bool) -> Answer<'c> {
        let mut body = Vec::new();
        let head = self.answer_in(ctx, json, &mut body).with_body(());
        head.with_body(Bytes::from(body))
    }

    /// [`BlockPage::answer`] with the body rendered into `body` (cleared first), a buffer the
    /// caller reuses from one answer to the next.
    pub(crate) fn answer_in<'c, 'b>(
        &'c self,
        ctx: &BlockContext<'c>,
        json: bool,
        body: &'b mut Vec<u8>,
    ) -> Answer<'c, &'b [u8]> {
        body.clear();
        let i = ctx.reason as usize;
        let (status, content_type, location) = if let Some(redirects) = &self.redirects {
            body.extend_from_slice(b"blocked: see Location\n");
            let url = redirects[i].render(ctx, escape_url);
            (StatusCode::FOUND, TEXT, Some(url))
        } else if json {
            json_body(body, ctx);
            (self.status, JSON, None)
        } else {
            self.pages[i].render_into(body, ctx, escape_html);
            (self.status, HTML, None)
        };
        Answer {
            status,
            content_type,
            location,
            reason: Some(ctx.reason),
            request_id: ctx.request_id,
            head_start: self.heads.as_ref().map(|h| &h[i][usize::from(json)][..]),
            body: &body[..],
        }
    }

    /// [`BlockPage::answer`] as a response for hyper.
    pub(crate) fn response(&self, ctx: &BlockContext<'_>, json: bool) -> Response<Bytes> {
        self.answer(ctx, json).into_response()
    }
}

/// One of icp-gate's own answers (block page, redirect, 400, 502, 504): status, headers and
/// body, written by hyper ([`Answer::into_response`]) or by the HTTP/1.1 fast path
/// ([`Answer::headers`]).
#[derive(Debug)]
pub(crate) struct Answer<'c, B = Bytes> {
    pub status: StatusCode,
    content_type: &'static str,
    /// A URL rendered from a validated template with escaped values.
    location: Option<Bytes>,
    /// Sent as `icp-gate-reason` (every block, and 400s).
    reason: Option<Reason>,
    request_id: &'c str,
    /// The head up to `x-request-id`, when written in advance ([`BlockPage`]'s `heads`).
    head_start: Option<&'c [u8]>,
    pub body: B,
}

impl<'c, B> Answer<'c, B> {
    /// The same answer with another body.
    fn with_body<C>(self, body: C) -> Answer<'c, C> {
        Answer {
            status: self.status,
            content_type: self.content_type,
            location: self.location,
            reason: self.reason,
            request_id: self.request_id,
            head_start: self.head_start,
            body,
        }
    }

    /// The headers, in order: `content-type`, `location`, `cache-control` and `icp-gate-reason`
    /// (with a reason), `x-request-id`.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (HeaderName, &[u8])> {
        self.leading_headers()
            .chain([(REQUEST_ID_HEADER, self.request_id.as_bytes())])
    }

    /// [`Answer::headers`] but the last, `x-request-id`.
    fn leading_headers(&self) -> impl Iterator<Item = (HeaderName, &[u8])> {
        let location = self.location.as_deref().map(|l| (LOCATION, l));
        let reason = self.reason.into_iter().flat_map(|r| {
            [
                (CACHE_CONTROL, &b"no-store"[..]),
                (REASON_HEADER, r.as_str().as_bytes()),
            ]
        });
        [(CONTENT_TYPE, self.content_type.as_bytes())]
            .into_iter()
            .chain(location)
            .chain(reason)
    }
}

impl<B: AsRef<[u8]>> Answer<'_, B> {
    /// Writes the head for the HTTP/1.1 fast path, as hyper would write [`Answer::into_response`].
    pub(crate) fn write_head(&self, out: &mut Vec<u8>, close: bool) {
        match self.head_start {
            Some(start) => {
                out.extend_from_slice(start);
                http1::write_header(out, &REQUEST_ID_HEADER, self.request_id.as_bytes());
            }
            None => http1::write_head_start(out, self.status, self.headers()),
        }
        http1::write_head_end(out, self.body.as_ref().len(), close);
    }
}

impl Answer<'_> {
    pub(crate) fn into_response(self) -> Response<Bytes> {
        let mut headers = HeaderMap::with_capacity(5);
        for (name, value) in self.headers() {
            // Static texts, hex request ids and escaped URLs are always valid header values.
            if let Ok(v) = HeaderValue::from_bytes(value) {
                headers.insert(name, v);
            }
        }
        let mut resp = Response::new(self.body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// The client asked for JSON (`Accept: application/json`).
pub(crate) fn wants_json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .any(|v| http1::names_json(v.as_bytes()))
}

/// A plain-text error answer made by icp-gate itself (400 for protocol errors, 502/504 for origin
/// trouble), carrying the same identifying headers as the block page.
pub(crate) fn error_answer(
    status: StatusCode,
    reason: Option<Reason>,
    request_id: &str,
) -> Answer<'_> {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    Answer {
        status,
        content_type: TEXT,
        location: None,
        reason,
        request_id,
        head_start: None,
        body: Bytes::from(text),
    }
}

/// The answer when the origin failed before sending a response (docs/behaviour.md): 504 when it did not
/// answer in time, 502 otherwise.
pub(crate) fn upstream_error_answer(kind: UpstreamError, request_id: &str) -> Answer<'_> {
    let status = match kind {
        UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Connect | UpstreamError::Reset => StatusCode::BAD_GATEWAY,
    };
    error_answer(status, None, request_id)
}

/// [`error_answer`] as a response for hyper.
pub(crate) fn error_response(
    status: StatusCode,
    reason: Option<Reason>,
    request_id: &str,
) -> Response<Bytes> {
    error_answer(status, reason, request_id).into_response()
}

fn json_body(out: &mut Vec<u8>, ctx: &BlockContext<'_>) {
    let body = serde_json::json!({
        "host": ctx.host,
        "reason": ctx.reason.as_str(),
        "request_id": ctx.request_id,
    });
    // Writing a JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &body);
}

/// The five bytes HTML escapes.
const HTML_SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'&' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\'' as usize] = true;
    t
};

/// Copies `s`, escaping the five HTML specials; runs without one are copied in one piece.
fn escape_html(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // A normalised host has none: one look-up a byte, then one copy.
    if !bytes.iter().any(|&b| HTML_SPECIAL[usize::from(b)]) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let entity: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            b'\'' => b"&#39;",
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        out.put_slice(entity);
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn escape_url(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.put_u8(b);
        } else {
            out.put_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(template: Option<&str>, redirect: Option<&str>) -> BlockPage {
        let dir = tempfile::tempdir().unwrap();
        let template = template.map(|t| {
            let p = dir.path().join("t.html");
            std::fs::write(&p, t).unwrap();
            p
        });
        BlockPage::load(&BlockPageConfig {
            status: 451,
            template,
            redirect: redirect.map(str::to_string),
        })
        .unwrap()
    }

    fn body(resp: Response<Bytes>) -> String {
        String::from_utf8(resp.into_body().to_vec()).unwrap()
    }

    const CTX: BlockContext<'static> = BlockContext {
        host: "unfiled.example.cn",
        reason: Reason::NotAccessed,
        request_id: "abc123",
    };

    #[test]
    fn built_in_page_names_host_reason_advice_and_request_id() {
        let resp = page(None, None).response(&CTX, false);
        assert_eq!(resp.status(), 451);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(resp.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(resp.headers()[&REASON_HEADER], "not_accessed");
        assert_eq!(resp.headers()[&REQUEST_ID_HEADER], "abc123");
        let html = body(resp);
        for want in [
            "unfiled.example.cn",
            "已备案但未接入本服务商",
            "接入",
            "abc123",
            "not_accessed",
        ] {
            assert!(html.contains(want), "missing {want}");
        }
        assert!(!html.contains("{host}") && !html.contains("{time}"));
    }

    #[test]
    fn each_reason_has_its_chinese_wording() {
        for (reason, zh) in [
            (Reason::Unfiled, "未备案"),
            (Reason::NotAccessed, "已备案但未接入本服务商"),
            (Reason::Revoked, "备案已注销"),
        ] {
            let ctx = BlockContext { reason, ..CTX };
            assert!(body(page(None, None).response(&ctx, false)).contains(zh));
        }
    }

    #[test]
    fn operator_template_keeps_css_braces_and_escapes_values() {
        let p = page(
            Some("<style>a { b: c }</style>{host}|{reason}|{unknown}|{request_id}"),
            None,
        );
        let ctx = BlockContext {
            host: "<x>&\"",
            ..CTX
        };
        assert_eq!(
            body(p.response(&ctx, false)),
            "<style>a { b: c }</style>&lt;x&gt;&amp;&quot;|not_accessed|{unknown}|abc123"
        );
    }

    #[test]
    fn every_slot_is_filled_for_every_reason() {
        let p = page(
            Some("{time}|{reason}|{reason_zh}|{advice_en}|{host}|{request_id}|end"),
            None,
        );
        for reason in Reason::ALL {
            let ctx = BlockContext {
                host: "a'b&c",
                reason,
                ..CTX
            };
            let text = body(p.response(&ctx, false));
            let (time, rest) = text.split_once('|').unwrap();
            let parsed = humantime::parse_rfc3339(time).expect("an RFC 3339 time");
            let age = std::time::SystemTime::now()
                .duration_since(parsed)
                .unwrap_or_default();
            assert!(age.as_secs() < 60, "{time} is not now");
            let (zh, _) = reason_texts(reason);
            let (_, advice) = advice_texts(reason);
            assert_eq!(
                rest,
                format!(
                    "{}|{zh}|{}|a&#39;b&amp;c|abc123|end",
                    reason.as_str(),
                    advice.replace('\'', "&#39;")
                )
            );
        }
    }

    #[test]
    fn the_config_checks_templates_against_these_placeholders() {
        let names: Vec<&str> = SLOTS
            .iter()
            .map(|(name, _)| &name[1..name.len() - 1])
            .collect();
        assert_eq!(names, crate::config::template::PLACEHOLDERS);
    }

    #[test]
    fn json_answer() {
        let resp = page(None, None).response(&CTX, true);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body(resp)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"host":"unfiled.example.cn","reason":"not_accessed","request_id":"abc123"})
        );
    }

    #[test]
    fn redirect_answer() {
        let resp = page(
            None,
            Some("https://beian.example/blocked?d={host}&r={reason}"),
        )
        .response(&BlockContext { host: "a b", ..CTX }, false);
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_eq!(
            resp.headers()[LOCATION],
            "https://beian.example/blocked?d=a%20b&r=not_accessed"
        );
        assert_eq!(resp.headers()[&REASON_HEADER], "not_accessed");
        assert_eq!(resp.headers()[CACHE_CONTROL], "no-store");
    }

    #[test]
    fn own_answer_head_is_written_like_hyper_writes_it() {
        let answer = error_answer(StatusCode::BAD_REQUEST, Some(Reason::InvalidHost), "id1");
        let mut out = Vec::new();
        answer.write_head(&mut out, true);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\nicp-gate-reason: invalid_host\r\nx-request-id: id1\r\nconnection: close\r\ncontent-length: 16\r\ndate: "
            ),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        assert_eq!(&answer.body[..], b"400 Bad Request\n");
    }

    #[test]
    fn heads_written_in_advance_are_the_heads_written_header_by_header() {
        for (redirect, reasons) in [
            (None, &Reason::ALL[..]),
            (Some("https://x.example/{host}"), &Reason::ALL[..2]),
        ] {
            let p = page(None, redirect);
            for &reason in reasons {
                for json in [false, true] {
                    for close in [false, true] {
                        let ctx = BlockContext {
                            host: "a<b>.example",
                            reason,
                            request_id: "0123456789abcdef0123",
                        };
                        let mut body = Vec::new();
                        let answer = p.answer_in(&ctx, json, &mut body);
                        assert_eq!(answer.head_start.is_some(), redirect.is_none());
                        let mut fast = Vec::new();
                        answer.write_head(&mut fast, close);
                        let mut slow = Vec::new();
                        http1::write_head_start(&mut slow, answer.status, answer.headers());
                        http1::write_head_end(&mut slow, answer.body.len(), close);
                        assert_eq!(
                            String::from_utf8_lossy(&fast),
                            String::from_utf8_lossy(&slow),
                            "{reason:?} json={json} close={close}"
                        );
                    }
                }
            }
        }
    }
}
