//! HTTP wire details shared by every route: hop-by-hop headers, `X-Forwarded-*`, EG-style
//! JSON errors, and ETags for rewritten bodies. Pure functions over header maps and bytes.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::body::ProxyBody;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, and the older names
/// proxies still meet). Never forwarded as they are.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a request asks to switch protocols (`Connection: upgrade` and an `Upgrade` header).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, every header named in `Connection`, and `Upgrade` (which the
/// upgrade path puts back deliberately).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
        for v in &named {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                // Never let `Connection` strip what identifies the request to EG.
                if !token.eq_ignore_ascii_case("host") && !token.eq_ignore_ascii_case("origin") {
                    headers.remove(token);
                }
            }
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
}

/// The client's address as an `X-Forwarded-For` item, made once per connection.
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).expect("an IP address is a valid header value")
}

/// Appends this hop to `X-Forwarded-For` (`client`, from [`forwarded_for`]),
/// `X-Forwarded-Proto` and `X-Forwarded-Host`. Without earlier hops' headers, the common case,
/// this copies no bytes: the values are shared.
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str) {
    append_list(headers, HeaderName::from_static("x-forwarded-for"), client);
    append_list(headers, HeaderName::from_static("x-forwarded-proto"), &HeaderValue::from_static(proto));
    if let Some(host) = headers.get(header::HOST).cloned() {
        append_list(headers, HeaderName::from_static("x-forwarded-host"), &host);
    }
}

/// Appends `item` to a comma-separated list header, folding earlier lines into one (bytes as
/// received, so that no earlier hop's value is lost).
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &HeaderValue) {
    if !headers.contains_key(&name) {
        headers.insert(name, item.clone());
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(&name) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(item.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(name, v);
    }
}

/// What the raw request head said that hyper's parsed head no longer shows: hyper drops
/// `Content-Length` when `Transfer-Encoding` is there too. Read from the bytes hyper reads by
/// [`crate::rawhead`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawHead {
    /// The head had both a `Content-Length` and a `Transfer-Encoding` line (or envgate could not
    /// follow the connection's bytes up to it, and cannot say it had not).
    pub length_and_chunks: bool,
}

/// A request whose body framing envgate refuses: a front proxy could read it differently (take
/// `Content-Length` where envgate takes the chunks, or skip a coding envgate does not know), and
/// then see a request where envgate sees body bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadFraming {
    /// Both `Content-Length` and `Transfer-Encoding`: 400.
    LengthAndChunks,
    /// A `Transfer-Encoding` other than exactly `chunked` (a list, several lines, another
    /// coding, an empty value): 501.
    Coding,
}

impl BadFraming {
    pub fn status(self) -> StatusCode {
        match self {
            BadFraming::LengthAndChunks => StatusCode::BAD_REQUEST,
            BadFraming::Coding => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The client's message. Names headers, never their values.
    pub fn message(self) -> &'static str {
        match self {
            BadFraming::LengthAndChunks => {
                "envgate refuses a request with both Content-Length and Transfer-Encoding: its length is ambiguous"
            }
            BadFraming::Coding => "envgate accepts no Transfer-Encoding but a single \"chunked\"",
        }
    }

    /// The audit record's `error`: names the problem, never a header value.
    pub fn why(self) -> &'static str {
        match self {
            BadFraming::LengthAndChunks => "both content-length and transfer-encoding",
            BadFraming::Coding => "transfer-encoding other than chunked",
        }
    }

    /// The `kind` label of `framing_refused`.
    pub fn kind(self) -> &'static str {
        match self {
            BadFraming::LengthAndChunks => "content_length_and_transfer_encoding",
            BadFraming::Coding => "transfer_encoding",
        }
    }

    /// envgate's JSON error, closing the connection after it: the bytes after this head cannot
    /// be told apart from a next request, so none is read.
    pub fn response(self) -> Response<ProxyBody> {
        let mut r = json_error(self.status(), self.message());
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// Whether envgate accepts the request's body framing: `Content-Length` alone, a single
/// `Transfer-Encoding: chunked` (any case, surrounding blanks ignored) alone, or neither.
/// `headers` as hyper parsed them, `raw` for the `Content-Length` hyper drops from a head that
/// also has `Transfer-Encoding`. A request without `Transfer-Encoding` needs no look at `raw`.
pub fn framing(headers: &HeaderMap, raw: RawHead) -> Result<(), BadFraming> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else { return Ok(()) };
    if raw.length_and_chunks || headers.contains_key(header::CONTENT_LENGTH) {
        return Err(BadFraming::LengthAndChunks);
    }
    let chunked = first.to_str().is_ok_and(|v| v.trim_matches([' ', '\t']).eq_ignore_ascii_case("chunked"));
    if !chunked || te.next().is_some() {
        return Err(BadFraming::Coding);
    }
    Ok(())
}

#[derive(Serialize)]
struct ErrorBody<'a, T: Serialize> {
    reason: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    extra: Option<T>,
}

/// The bytes of [`json_error_with`]'s body.
pub fn error_body<T: Serialize>(status: StatusCode, message: &str, extra: Option<T>) -> Vec<u8> {
    let body = ErrorBody { reason: status.canonical_reason().unwrap_or("Error"), message, extra };
    serde_json::to_vec(&body).expect("serializing an error body")
}

/// An EG-style JSON error: `{"reason": <status phrase>, "message": ...}` plus optional members.
pub fn json_error_with<T: Serialize>(status: StatusCode, message: &str, extra: Option<T>) -> Response<ProxyBody> {
    let bytes = error_body(status, message, extra);
    let mut r = Response::new(ProxyBody::full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An EG-style JSON error.
pub fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_error_with::<()>(status, message, None)
}

/// The strong ETag of a body envgate rewrote. Distinct from any upstream ETag (which describes
/// other bytes), stable for equal bodies.
pub fn etag(body: &[u8]) -> HeaderValue {
    // SipHash with fixed keys: deterministic within a build, which is all an ETag needs.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x656e_7667_6174_6531, 0x6b65_726e_656c_7370);
    body.hash(&mut h);
    let v = format!("\"envgate-{:016x}-{:x}\"", h.finish(), body.len());
    HeaderValue::from_str(&v).expect("an ETag is ASCII")
}

/// Prepares a request for a kernelspec document envgate will read: uncompressed, and never a
/// 304 for the upstream's validators (which describe other bytes than envgate sends).
pub fn ask_for_kernelspecs(headers: &mut HeaderMap) {
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
}

/// Whether the `If-None-Match` values match `etag` by weak comparison (RFC 9110 §13.1.2), so
/// that the answer is 304.
pub fn if_none_match<'a>(values: impl IntoIterator<Item = &'a HeaderValue>, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else { return false };
    let etag = etag.trim_start_matches("W/");
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "Foo"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("foo", "2"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("authorization", "token t"),
            ("host", "h"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization", "host"]);
    }

    #[test]
    fn connection_cannot_strip_host_or_origin() {
        let mut h = map(&[("connection", "host, origin"), ("host", "h"), ("origin", "http://h")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn upgrade_detection() {
        assert!(wants_upgrade(&map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let mut h =
            map(&[("host", "gw.example:8889"), ("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")]);
        add_forwarded(&mut h, &forwarded_for("127.0.0.1".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example:8889");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &forwarded_for("::1".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = map(&[("x-forwarded-proto", "https"), ("host", "h")]);
        add_forwarded(&mut h, &forwarded_for("10.1.2.3".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https, http");
        assert_eq!(h["x-forwarded-host"], "h");
    }

    #[test]
    fn json_errors_look_like_eg() {
        let r = json_error(StatusCode::FORBIDDEN, "no");
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["content-type"], "application/json");
        let ProxyBody::Full(Some(b)) = r.into_body() else { panic!() };
        assert_eq!(&b[..], br#"{"reason":"Forbidden","message":"no"}"#);
        let r = json_error_with(StatusCode::BAD_REQUEST, "m", Some(serde_json::json!({"rejected": []})));
        let ProxyBody::Full(Some(b)) = r.into_body() else { panic!() };
        assert_eq!(&b[..], br#"{"reason":"Bad Request","message":"m","rejected":[]}"#);
    }

    #[test]
    fn etags_differ_by_body_and_match_if_none_match() {
        let a = etag(b"{\"a\":1}");
        let b = etag(b"{\"a\":2}");
        assert_ne!(a, b);
        assert_eq!(a, etag(b"{\"a\":1}"));
        let tag = a.to_str().unwrap().to_string();
        assert!(if_none_match(map(&[("if-none-match", &tag)]).get_all("if-none-match"), &a));
        assert!(if_none_match(&[HeaderValue::from_str(&format!("\"x\", W/{tag}")).unwrap()], &a));
        assert!(if_none_match(&[HeaderValue::from_static("*")], &a));
        assert!(!if_none_match(&[HeaderValue::from_static("\"4a58b029ecd0\"")], &a));
        assert!(!if_none_match(HeaderMap::new().get_all("if-none-match"), &a));
    }

    const NO: RawHead = RawHead { length_and_chunks: false };
    const BOTH: RawHead = RawHead { length_and_chunks: true };

    #[test]
    fn framing_accepts_one_length_or_one_chunked() {
        assert_eq!(framing(&HeaderMap::new(), NO), Ok(()));
        assert_eq!(framing(&map(&[("content-length", "12")]), NO), Ok(()));
        // Without Transfer-Encoding the raw head is not looked at.
        assert_eq!(framing(&map(&[("content-length", "12")]), BOTH), Ok(()));
        assert_eq!(framing(&HeaderMap::new(), BOTH), Ok(()));
        for v in ["chunked", "Chunked", "CHUNKED", " chunked ", "\tchunked", "chunked\t"] {
            assert_eq!(framing(&map(&[("transfer-encoding", v)]), NO), Ok(()), "{v:?}");
        }
    }

    #[test]
    fn framing_refuses_length_with_chunks() {
        // What hyper hands on: Content-Length dropped, so only the raw head tells.
        assert_eq!(framing(&map(&[("transfer-encoding", "chunked")]), BOTH), Err(BadFraming::LengthAndChunks));
        assert_eq!(framing(&map(&[("transfer-encoding", "gzip, chunked")]), BOTH), Err(BadFraming::LengthAndChunks));
        // Should the parser keep both, the parsed head tells.
        let both = map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert_eq!(framing(&both, NO), Err(BadFraming::LengthAndChunks));
        // Both and a bad coding: the ambiguous length comes first.
        let both = map(&[("content-length", "5"), ("transfer-encoding", "gzip, chunked")]);
        assert_eq!(framing(&both, NO), Err(BadFraming::LengthAndChunks));
        let r = BadFraming::LengthAndChunks.response();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn framing_refuses_every_other_transfer_encoding() {
        for v in [
            "gzip, chunked",
            "chunked, chunked",
            "chunked,",
            ",chunked",
            "identity",
            "gzip",
            "chunked, gzip",
            "",
            " ",
            "chunked;q=1",
            "\"chunked\"",
            "chunked chunked",
            "x-chunked",
        ] {
            assert_eq!(framing(&map(&[("transfer-encoding", v)]), NO), Err(BadFraming::Coding), "{v:?}");
        }
        let not_ascii = HeaderValue::from_bytes(b"chunked\xff").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, not_ascii);
        assert_eq!(framing(&h, NO), Err(BadFraming::Coding));
        for lines in [["chunked", "chunked"], ["gzip", "chunked"], ["chunked", "gzip"]] {
            let h = map(&[("transfer-encoding", lines[0]), ("transfer-encoding", lines[1])]);
            assert_eq!(framing(&h, NO), Err(BadFraming::Coding), "{lines:?}");
        }
        let r = BadFraming::Coding.response();
        assert_eq!(r.status(), 501);
        assert_eq!(r.headers()["connection"], "close");
        let ProxyBody::Full(Some(b)) = r.into_body() else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["reason"], "Not Implemented");
        assert_eq!(v["message"], BadFraming::Coding.message());
    }
}
