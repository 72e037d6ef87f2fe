//! The hyper service: one function per route class, in the spirit of Pingora's phases
//! (classify the request, filter it, send it upstream, filter the response).
//!
//! - pass-through: headers cleaned, bodies streamed both ways, upgrades spliced;
//! - kernel start: body read (bounded), parsed strictly, decided by [`crate::policy`],
//!   re-serialized by [`crate::rewrite::start`], audited;
//! - session start: refused unless allowed, audited;
//! - kernelspecs: response rewritten by [`crate::rewrite::kernelspecs`], with its own ETag.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::audit::{AuditLog, Ids, Record};
use crate::body::ProxyBody;
use crate::config::Config;
use crate::policy::{Mode, Sessions};
use crate::rewrite::{kernelspecs, start};
use crate::routes::{Route, Routes};
use crate::upstream::{SpecCache, Upstream};
use crate::wire;

/// Largest kernelspecs response envgate rewrites; a larger one passes through unchanged.
const MAX_KERNELSPECS_REWRITE: usize = 8 << 20;

/// Everything a request needs, shared by all connections.
pub struct State {
    pub config: Config,
    pub routes: Routes,
    pub upstream: Upstream,
    pub specs: SpecCache,
    pub audit: AuditLog,
    pub ids: Ids,
}

impl State {
    pub fn new(config: Config, audit: AuditLog) -> State {
        State {
            routes: Routes::new(&config.upstream.base),
            upstream: Upstream::new(&config),
            specs: SpecCache::new(config.kernelspec_cache_ttl),
            audit,
            ids: Ids::default(),
            config,
        }
    }
}

/// Serves one request.
pub async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    st: Arc<State>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(wire::json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "envgate is a reverse proxy; CONNECT is not supported",
        ));
    }
    let route = st.routes.classify(req.method(), req.uri().path_and_query().map_or("/", |p| p.as_str()));
    let resp = match route {
        Route::KernelStart => kernel_start(req, peer, &st).await,
        Route::SessionStart => session_start(req, peer, &st).await,
        Route::KernelspecList | Route::KernelspecOne => kernelspecs(req, route, peer, &st).await,
        Route::Other => pass(req, peer, &st).await,
    };
    Ok(resp)
}

/// Points a request at the upstream and cleans its headers for the next hop.
fn to_upstream(parts: &mut Parts, peer: SocketAddr, st: &State) {
    let pq = std::mem::take(&mut parts.uri).into_parts().path_and_query;
    parts.uri = st.upstream.uri(pq);
    wire::strip_hop_by_hop(&mut parts.headers);
    wire::add_forwarded(&mut parts.headers, peer.ip(), "http");
}

/// A response from the upstream, cleaned for the client.
fn from_upstream(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    wire::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::Stream(body))
}

/// Everything no rule claims: streamed both ways; upgrades (WebSockets) spliced.
async fn pass(mut req: Request<Incoming>, peer: SocketAddr, st: &State) -> Response<ProxyBody> {
    let upgrade = if wire::wants_upgrade(req.headers()) {
        let proto = req.headers().get(header::UPGRADE).cloned();
        Some((hyper::upgrade::on(&mut req), proto))
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    to_upstream(&mut parts, peer, st);
    if let Some((_, Some(proto))) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    let resp = match st.upstream.send(Request::from_parts(parts, ProxyBody::Stream(body))).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            return e.response();
        }
    };
    match upgrade {
        Some((client_upgrade, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => splice(client_upgrade, resp),
        _ => from_upstream(resp),
    }
}

/// Answers the client with the upstream's 101 and, once both sides have switched, copies bytes
/// both ways until either closes. No frame parsing, no idle timeout.
fn splice(client: hyper::upgrade::OnUpgrade, mut resp: Response<Incoming>) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut c = TokioIo::new(c);
        let mut u = TokioIo::new(u);
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
            tracing::debug!(error = %e, "spliced connection ended with an error");
        }
    });
    let (parts, _) = resp.into_parts();
    // The 101 keeps Connection/Upgrade and every Sec-WebSocket-* header as the upstream sent them.
    Response::from_parts(parts, ProxyBody::empty())
}

/// The client's `X-Forwarded-For`, as received, for the audit record.
fn xff(headers: &HeaderMap) -> Option<String> {
    headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[derive(Serialize)]
struct RejectedJson<'a> {
    name: &'a str,
    reason: &'static str,
}

#[derive(Serialize)]
struct RejectedList<'a> {
    rejected: Vec<RejectedJson<'a>>,
}

/// `POST {base}api/kernels`: the env policy.
async fn kernel_start(req: Request<Incoming>, peer: SocketAddr, st: &State) -> Response<ProxyBody> {
    let id = st.ids.next();
    let policy = &st.config.policy;
    let (mut parts, body) = req.into_parts();
    let xff = xff(&parts.headers);
    let mut rec = Record::new(&id, "kernel_start", policy.mode, peer, xff.as_deref());

    // Read the body, bounded, refusing what cannot be read.
    let bytes = match read_body(&parts.headers, body, st.config.max_body_bytes).await {
        Ok(b) => b,
        Err(resp) => {
            let why = resp.status().canonical_reason().unwrap_or("refused").to_string();
            let (rec, resp) = refused(rec, resp, &why);
            return finish(st, rec, &id, resp).await;
        }
    };
    let parsed = match start::parse(&bytes) {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            let resp = wire::json_error(StatusCode::BAD_REQUEST, &msg);
            let (rec, resp) = refused(rec, resp, &msg);
            return finish(st, rec, &id, resp).await;
        }
    };
    rec.user = parsed.env.iter().find(|(k, _)| k == "KERNEL_USERNAME").map(|(_, v)| v.as_str());

    // Learn the kernelspec's own facts (and the default kernelspec) from the upstream.
    let query = parts.uri.query().map(str::to_string);
    let mut fetch_headers = parts.headers.clone();
    wire::strip_hop_by_hop(&mut fetch_headers);
    wire::add_forwarded(&mut fetch_headers, peer.ip(), "http");
    let index = match st.specs.get(&st.upstream, &st.routes.kernelspecs_path(), query.as_deref(), &fetch_headers).await
    {
        Ok(i) => i,
        Err(e) => {
            let resp = e.response();
            let why = "cannot learn the kernelspecs from the upstream";
            let (rec, resp) = refused(rec, resp, why);
            return finish(st, rec, &id, resp).await;
        }
    };
    let (kernelspec, facts) = index.resolve(parsed.name.as_deref());
    let decision = policy.decide(kernelspec.as_deref(), facts, parsed.env.iter().map(|(k, _)| k.as_str()));
    rec.kernelspec = kernelspec.as_deref();
    let rec = rec.with_decision(&decision);

    if policy.mode == Mode::Reject && !decision.rejected.is_empty() {
        let names: Vec<String> =
            decision.rejected.iter().map(|r| format!("{} ({})", r.name, r.reason.as_str())).collect();
        let msg = format!("envgate refused the kernel start: environment variables not allowed: {}", names.join(", "));
        let list = RejectedList {
            rejected: decision
                .rejected
                .iter()
                .map(|r| RejectedJson { name: &r.name, reason: r.reason.as_str() })
                .collect(),
        };
        let resp = wire::json_error_with(StatusCode::FORBIDDEN, &msg, Some(list));
        let (rec, resp) = refused(rec, resp, "policy");
        return finish(st, rec, &id, resp).await;
    }
    let forwarded = match policy.mode {
        Mode::Report => parsed.render(|_| true),
        Mode::Drop | Mode::Reject => parsed.render(|n| decision.kept.iter().any(|k| k.name == n)),
    };

    to_upstream(&mut parts, peer, st);
    for h in [header::CONTENT_ENCODING, header::EXPECT] {
        parts.headers.remove(h);
    }
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(forwarded.len()));
    let mut rec = rec;
    rec.outcome = "forwarded";
    let resp = match st.upstream.send(Request::from_parts(parts, ProxyBody::full(forwarded))).await {
        Ok(r) => r,
        Err(e) => {
            let resp = e.response();
            rec.status = Some(resp.status().as_u16());
            let why = format!("upstream {}", e.kind());
            rec.error = Some(&why);
            return finish(st, rec, &id, resp).await;
        }
    };
    rec.status = Some(resp.status().as_u16());
    let kernel_id = kernel_id_of(resp.headers());
    rec.kernel_id = kernel_id.as_deref();
    finish(st, rec, &id, from_upstream(resp)).await
}

/// Marks a record as refused with `resp`'s status and the reason `why`.
fn refused<'a>(mut rec: Record<'a>, resp: Response<ProxyBody>, why: &'a str) -> (Record<'a>, Response<ProxyBody>) {
    rec.status = Some(resp.status().as_u16());
    rec.error = Some(why);
    (rec, resp)
}

/// Writes the audit record and tags the response with the decision id.
async fn finish(st: &State, rec: Record<'_>, id: &str, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    st.audit.write(&rec).await;
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-envgate-decision", v);
    }
    resp
}

/// The new kernel's id, from EG's `Location: {base}api/kernels/<id>`.
fn kernel_id_of(headers: &HeaderMap) -> Option<String> {
    let loc = headers.get(header::LOCATION)?.to_str().ok()?;
    let id = loc.rsplit('/').next()?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| id.to_string())
}

/// Reads a policy route's body: identity encoding only, at most `max` bytes.
async fn read_body(headers: &HeaderMap, body: Incoming, max: usize) -> Result<Bytes, Response<ProxyBody>> {
    for v in headers.get_all(header::CONTENT_ENCODING) {
        if !v.to_str().is_ok_and(|v| v.split(',').all(|e| e.trim().eq_ignore_ascii_case("identity"))) {
            return Err(wire::json_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "envgate cannot read a kernel start body with a Content-Encoding; send it uncompressed",
            ));
        }
    }
    let too_large = || {
        wire::json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the kernel start body is larger than the limit of {max} bytes"),
        )
    };
    if body.size_hint().lower() > max as u64 {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => {
            tracing::debug!(error = %e, "reading a kernel start body failed");
            Err(wire::json_error(StatusCode::BAD_REQUEST, "the kernel start body could not be read"))
        }
    }
}

/// `POST {base}api/sessions`: refused by default, passed (and audited) when allowed.
async fn session_start(req: Request<Incoming>, peer: SocketAddr, st: &State) -> Response<ProxyBody> {
    let id = st.ids.next();
    let xff = xff(req.headers());
    let mut rec = Record::new(&id, "session_start", st.config.policy.mode, peer, xff.as_deref());
    if st.config.policy.sessions == Sessions::Deny {
        let resp = wire::json_error(
            StatusCode::FORBIDDEN,
            "envgate refuses POST /api/sessions: a session starts its kernel with the gateway's whole \
             environment, outside the env policy. Start kernels with POST /api/kernels, or set sessions = \"allow\".",
        );
        rec.status = Some(403);
        rec.error = Some("sessions denied");
        return finish(st, rec, &id, resp).await;
    }
    rec.outcome = "forwarded";
    let resp = pass(req, peer, st).await;
    rec.status = Some(resp.status().as_u16());
    finish(st, rec, &id, resp).await
}

/// `GET {base}api/kernelspecs[/{name}]`: inject `client_envs`, with an ETag of the new body.
async fn kernelspecs(req: Request<Incoming>, route: Route, peer: SocketAddr, st: &State) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let if_none_match: Vec<HeaderValue> = parts.headers.get_all(header::IF_NONE_MATCH).iter().cloned().collect();
    to_upstream(&mut parts, peer, st);
    // The upstream's validators describe other bytes than the ones envgate sends.
    parts.headers.remove(header::IF_NONE_MATCH);
    parts.headers.remove(header::IF_MODIFIED_SINCE);
    parts.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let resp = match st.upstream.send(Request::from_parts(parts, ProxyBody::Stream(body))).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            return e.response();
        }
    };
    let encoded = resp.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity");
    if resp.status() != StatusCode::OK || encoded {
        if encoded {
            tracing::warn!("kernelspecs came back compressed; passed on without client_envs");
        }
        return from_upstream(resp);
    }
    let (mut parts, mut body) = resp.into_parts();
    wire::strip_hop_by_hop(&mut parts.headers);
    // Read up to the limit; past it, pass what was read and the rest on unchanged.
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading kernelspecs from the upstream failed");
                return wire::json_error(
                    StatusCode::BAD_GATEWAY,
                    "the upstream gateway failed while sending kernelspecs",
                );
            }
        }
        if buf.len() > MAX_KERNELSPECS_REWRITE {
            tracing::warn!("kernelspecs body too large to rewrite; passed on without client_envs");
            return Response::from_parts(parts, ProxyBody::Prefixed { prefix: Some(buf.freeze()), rest: body });
        }
    }
    let policy = &st.config.policy;
    let rewritten = match route {
        Route::KernelspecList => kernelspecs::rewrite_list(policy, &buf),
        _ => kernelspecs::rewrite_one(policy, &buf),
    };
    let new = match rewritten {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::warn!(error = %e, route = route.as_str(), "kernelspecs not rewritten; passed on unchanged");
            return Response::from_parts(parts, ProxyBody::full(buf.freeze()));
        }
    };
    let etag = wire::etag(&new);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::ETAG, etag.clone());
    let mut inm = HeaderMap::new();
    for v in if_none_match {
        inm.append(header::IF_NONE_MATCH, v);
    }
    if wire::if_none_match(&inm, &etag) {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_TYPE);
        return Response::from_parts(parts, ProxyBody::empty());
    }
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
    Response::from_parts(parts, ProxyBody::full(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_id_from_location() {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("/gw/api/kernels/3336c9d8-2546-41c2-82ce-dc5ea9745e9c"));
        assert_eq!(kernel_id_of(&h).as_deref(), Some("3336c9d8-2546-41c2-82ce-dc5ea9745e9c"));
        h.insert(header::LOCATION, HeaderValue::from_static("/api/kernels/"));
        assert_eq!(kernel_id_of(&h), None);
        h.insert(header::LOCATION, HeaderValue::from_static("/api/kernels/a\"b"));
        assert_eq!(kernel_id_of(&h), None);
        assert_eq!(kernel_id_of(&HeaderMap::new()), None);
    }
}
