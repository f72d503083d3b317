//! Forwarding allowed HTTP requests to the route's origin (docs/behaviour.md, "HTTP: what clients and origins see").
//!
//! One keep-alive pool ([`pool`]) serves all routes; bodies stream both ways without buffering.
//! A route that sends a PROXY header gets a pool per client connection instead, since the header
//! names one client and a pooled origin connection must never carry another's.

mod origin;
mod pool;
mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::config::{Limits, Origin, ProxyProtocolVersion};
use crate::observe::metrics::UpstreamError;
use crate::wire::http1;
use crate::wire::proxy_protocol;

pub(crate) use origin::{ForwardError, connect_origin};
pub(crate) use pool::{OriginBody, OriginClient};
pub(crate) use raw::{ExchangeError, Outgoing, RawOrigins};

/// Builds an origin client. `proxy_header`: the PROXY header every new connection starts with.
pub(crate) fn origin_client(limits: &Limits, proxy_header: Option<Vec<u8>>) -> OriginClient {
    OriginClient::new(
        limits.origin_connect_timeout,
        limits.idle_timeout,
        proxy_header,
    )
}

/// The plain origin connections of the HTTP fast path.
pub(crate) fn raw_origins(limits: &Limits) -> RawOrigins {
    RawOrigins::new(limits.origin_connect_timeout, limits.idle_timeout)
}

/// A client whose connections each start with a PROXY header for this client connection.
pub(crate) fn proxied_origin_client(
    limits: &Limits,
    version: ProxyProtocolVersion,
    client: SocketAddr,
    dst: SocketAddr,
) -> OriginClient {
    origin_client(limits, Some(proxy_protocol::encode(version, client, dst)))
}

/// How the forwarded request should be adjusted.
pub(crate) struct ForwardOptions<'a> {
    pub origin: &'a Origin,
    /// The client address to append to `X-Forwarded-For` ([`client_ip_value`]), or `None` when
    /// the route turns it off.
    pub forwarded_for: Option<&'a HeaderValue>,
    /// When the request asks to switch protocols: the protocols offered to the origin
    /// ([`upgrade_offer`]).
    pub upgrade: Option<HeaderValue>,
}

/// The client's address as an `X-Forwarded-For` element, made once per client connection.
pub(crate) fn client_ip_value(client: SocketAddr) -> HeaderValue {
    let ip = client.ip().to_canonical().to_string();
    // An IP address is always a valid header value.
    HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sends `req` to the origin and returns its response head (the body streams). `timeout` bounds
/// the wait for the response head.
pub(crate) async fn forward(
    client: &OriginClient,
    mut req: Request<Incoming>,
    opts: ForwardOptions<'_>,
    timeout: Duration,
) -> Result<Response<OriginBody>, ForwardError> {
    let upgrade = opts.upgrade.is_some();
    prepare_request(&mut req, &opts);
    let sent = client.send(opts.origin.authority(), req);
    let mut resp = tokio::time::timeout(timeout, sent)
        .await
        .map_err(|_| ForwardError::Upstream(UpstreamError::Timeout))??;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    remove_hop_by_hop(resp.headers_mut(), upgrade && switching);
    Ok(resp)
}

/// Rewrites the request for the origin: origin-form target, `Host` from the target when the
/// client used absolute-form or HTTP/2, hop-by-hop headers dropped,
/// `X-Forwarded-For` appended. Everything else reaches the origin untouched.
fn prepare_request(req: &mut Request<Incoming>, opts: &ForwardOptions<'_>) {
    if let Some(authority) = req.uri().authority() {
        // Absolute-form (HTTP/1.1) or :authority (HTTP/2): the target names the host.
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    *req.version_mut() = Version::HTTP_11;
    if let Some(offer) = &opts.upgrade {
        req.headers_mut().insert(header::UPGRADE, offer.clone());
    }
    remove_hop_by_hop(req.headers_mut(), opts.upgrade.is_some());
    if let Some(client) = opts.forwarded_for {
        append_forwarded_for(req.headers_mut(), client);
    }
}

/// For a request that asks to switch protocols (`Connection: upgrade` and an `Upgrade` header:
/// WebSocket and friends), the protocols of its `Upgrade` header that are passed on: all but
/// `h2c`; `None` when it does not ask, or nothing is left. A switched connection is relayed
/// without being looked at again, and HTTP/2 carries requests for any host (each stream names
/// its own `:authority`), so an upgrade to h2c on a request for a filed host would carry
/// requests for unfiled ones past the decision ("h2c smuggling"). Without it the client carries
/// on in HTTP/1.1, each request decided (RFC 9110 §7.8 lets a server ignore `Upgrade`); HTTP/2
/// itself is served by icp-gate, per stream.
pub(crate) fn upgrade_offer(headers: &HeaderMap) -> Option<HeaderValue> {
    if !headers.contains_key(header::UPGRADE)
        || !connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
    {
        return None;
    }
    let mut offer = Vec::new();
    for value in headers.get_all(header::UPGRADE) {
        for protocol in http1::tokens(value.as_bytes()) {
            let name = protocol.split(|&b| b == b'/').next().unwrap_or(protocol);
            if name.trim_ascii().eq_ignore_ascii_case(b"h2c") {
                continue;
            }
            if !offer.is_empty() {
                offer.extend_from_slice(b", ");
            }
            offer.extend_from_slice(protocol);
        }
    }
    if offer.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&offer).ok()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| http1::tokens(v.as_bytes()))
}

fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of nine hash lookups.
    let any = headers
        .keys()
        .any(|name| *name == header::UPGRADE || http1::HOP_BY_HOP.contains(name));
    if !any && !keep_upgrade {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // `close`, `keep-alive` and `upgrade` (the usual tokens) go below anyway; naming
        // only the others skips a parse and an allocation per message.
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| {
                !t.eq_ignore_ascii_case(b"close")
                    && std::str::from_utf8(t).is_ok_and(|t| !http1::is_hop_by_hop(t))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &http1::HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    if !headers.contains_key(XFF) {
        headers.insert(XFF, client.clone());
        return;
    }
    let mut value = Vec::new();
    for v in headers.get_all(XFF) {
        value.extend_from_slice(v.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(client.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        headers.insert(XFF, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed_including_listed_ones() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(upgrade_offer(&h).is_some());
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(upgrade_offer(&headers(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn h2c_is_never_offered_to_the_origin() {
        let upgrade = |conn: &str, up: &str| {
            let offer = upgrade_offer(&headers(&[("connection", conn), ("upgrade", up)]));
            (offer.is_some(), offer)
        };
        let offer = |v: &'static str| Some(HeaderValue::from_static(v));
        assert_eq!(
            upgrade("Upgrade, HTTP2-Settings", "h2c"),
            (false, None),
            "h2c alone: no upgrade"
        );
        assert_eq!(upgrade("upgrade", "H2C/1.0"), (false, None));
        assert_eq!(
            upgrade("Upgrade, HTTP2-Settings", "h2c, websocket"),
            (true, offer("websocket"))
        );
        assert_eq!(
            upgrade("upgrade", "websocket , h2c,foo/2"),
            (true, offer("websocket, foo/2"))
        );
        assert_eq!(upgrade("upgrade", "websocket"), (true, offer("websocket")));
        assert!(!upgrade("keep-alive", "websocket").0);

        // Not an upgrade: Upgrade, Connection and the HTTP2-Settings it lists go.
        let mut h = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("x-kept", "yes"),
        ]);
        let upgrade = upgrade_offer(&h).is_some();
        remove_hop_by_hop(&mut h, upgrade);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        let client = client_ip_value("[::ffff:198.51.100.2]:1".parse().unwrap());
        append_forwarded_for(&mut h, &client);
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 10.0.0.1, 198.51.100.2");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &client_ip_value("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }
}
