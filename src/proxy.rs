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
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::audit::{AuditLog, Ids, Record, ViolationName};
use crate::body::{BodyError, ProxyBody, Streamed};
use crate::config::{Config, Mismatch};
use crate::decide::{self, Verdict, USERNAME};
use crate::metrics::{DecisionLabel, KindLabel, Metrics, ReasonLabel, RouteLabel, RouteStatus, RuleLabel};
use crate::policy::Sessions;
use crate::rewrite::{kernelspecs, start};
use crate::routes::{Route, Routes};
use crate::upstream::{SpecCache, SpecsError, Upstream, UpstreamError};
use crate::wire;

/// Everything that a reload (SIGHUP) replaces: built from one [`Config`].
pub struct Runtime {
    pub config: Config,
    pub routes: Routes,
    /// One pooled upstream client per worker thread, and one for the main thread (last): an
    /// upstream connection is only ever used on the thread whose runtime drives it, so a request
    /// never wakes another core.
    upstreams: Arc<[Upstream]>,
    pub specs: SpecCache,
    /// Kernelspec bodies already rewritten under this policy: (body, its ETag) by the upstream's bytes.
    pub rewrites: kernelspecs::Memo<(Bytes, HeaderValue)>,
    /// A short hash of the effective policy, for logs and the `envgate_policy_info` metric.
    pub policy_hash: String,
}

impl Runtime {
    /// Builds the runtime with `workers` worker threads; reuses `previous`'s connection pools
    /// when the upstream is unchanged.
    pub fn new(config: Config, previous: Option<&Runtime>, workers: usize) -> Result<Runtime, String> {
        let upstreams = match previous {
            Some(p) if p.upstreams.len() == workers + 1 && p.config.upstream == config.upstream => p.upstreams.clone(),
            _ => (0..=workers).map(|_| Upstream::new(&config)).collect::<Result<Vec<_>, _>>()?.into(),
        };
        Ok(Runtime {
            routes: Routes::new(&config.upstream.url.base),
            specs: SpecCache::new(config.kernelspec_cache_ttl),
            rewrites: kernelspecs::Memo::default(),
            policy_hash: policy_hash(&config),
            upstreams,
            config,
        })
    }

    /// The upstream client of the calling thread.
    pub fn upstream(&self) -> &Upstream {
        let i = crate::server::worker_index().unwrap_or(self.upstreams.len() - 1);
        &self.upstreams[i % self.upstreams.len()]
    }
}

fn policy_hash(config: &Config) -> String {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    config.policy.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Everything a request needs, shared by all connections.
pub struct State {
    /// The current runtime; requests take a snapshot, so a reload never changes a request midway.
    pub runtime: ArcSwap<Runtime>,
    pub audit: AuditLog,
    pub ids: Ids,
    pub metrics: Metrics,
    /// Spliced (upgraded) connections, tracked so that shutdown can wait for them, then end them.
    pub splices: TaskTracker,
    pub stop_splices: CancellationToken,
}

impl State {
    pub fn new(runtime: Runtime, audit: AuditLog) -> State {
        let metrics = Metrics::default();
        metrics.set_policy(&runtime.policy_hash);
        State {
            runtime: ArcSwap::from_pointee(runtime),
            audit,
            ids: Ids::default(),
            metrics,
            splices: TaskTracker::new(),
            stop_splices: CancellationToken::new(),
        }
    }
}

/// One request's view: the shared state, the runtime snapshot, and where the request came from.
struct Ctx<'a> {
    st: &'a State,
    rt: &'a Runtime,
    peer: SocketAddr,
    /// `peer`'s address as an `X-Forwarded-For` item.
    forwarded_for: &'a HeaderValue,
    /// `http` or `https`: how the client reached envgate.
    proto: &'static str,
}

/// Serves one request. `forwarded_for`: `peer`'s IP as a header value
/// ([`wire::forwarded_for`]), made once per connection.
pub async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    forwarded_for: HeaderValue,
    proto: &'static str,
    st: Arc<State>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let rt = st.runtime.load_full();
    let cx = Ctx { st: &st, rt: &rt, peer, forwarded_for: &forwarded_for, proto };
    let route = rt.routes.classify_target(req.method(), req.uri());
    let resp = if req.method() == Method::CONNECT {
        wire::json_error(StatusCode::METHOD_NOT_ALLOWED, "envgate is a reverse proxy; CONNECT is not supported")
    } else {
        // The policy routes' futures are boxed: kept inline, they made this future (which hyper
        // moves for every request) 6.8 KB instead of 3.3, for every route.
        match route {
            Route::KernelStart => Box::pin(kernel_start(req, &cx)).await,
            Route::SessionStart => Box::pin(session_start(req, &cx)).await,
            Route::KernelspecList | Route::KernelspecOne => kernelspecs(req, route, &cx).await,
            Route::AmbiguousKernelStart | Route::AmbiguousSessionStart => Box::pin(ambiguous(req, route, &cx)).await,
            Route::Other => pass(req, &cx).await,
        }
    };
    let m = &st.metrics;
    m.requests.get_or_create(&RouteStatus { route: route.as_str(), status: resp.status().as_u16() }).inc();
    m.latency.get_or_create(&RouteLabel { route: route.as_str() }).observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

/// An upstream failure: counted, logged, and answered with a JSON 502/504.
fn upstream_failed(cx: &Ctx<'_>, e: &UpstreamError) -> Response<ProxyBody> {
    cx.st.metrics.upstream_errors.get_or_create(&KindLabel { kind: e.kind() }).inc();
    tracing::warn!(error = %e, "upstream request failed");
    e.response()
}

/// Points a request at the upstream and cleans its headers for the next hop.
fn to_upstream(parts: &mut Parts, cx: &Ctx<'_>) {
    let pq = std::mem::take(&mut parts.uri).into_parts().path_and_query;
    parts.uri = Upstream::uri(pq);
    clean_for_upstream(&mut parts.headers, cx);
}

/// Header hygiene for any request envgate sends upstream on a client's behalf.
fn clean_for_upstream(headers: &mut HeaderMap, cx: &Ctx<'_>) {
    wire::strip_hop_by_hop(headers);
    wire::add_forwarded(headers, cx.forwarded_for, cx.proto);
    if let Some(auth) = &cx.rt.upstream().auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
}

/// A response from the upstream, cleaned for the client.
fn from_upstream(resp: Response<Streamed>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    wire::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::Stream(body))
}

/// Everything no rule claims: streamed both ways; upgrades (WebSockets) spliced.
async fn pass(mut req: Request<Incoming>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    // hyper can switch protocols on HTTP/1.1 connections only; an HTTP/1.0 "upgrade" is a
    // plain request.
    let upgrade = if req.version() == http::Version::HTTP_11 && wire::wants_upgrade(req.headers()) {
        let proto = req.headers().get(header::UPGRADE).cloned();
        Some((hyper::upgrade::on(&mut req), proto))
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    to_upstream(&mut parts, cx);
    if let Some((_, Some(proto))) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    let body = ProxyBody::stream(body, cx.rt.upstream().body_idle_timeout);
    let resp = match cx.rt.upstream().send(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return upstream_failed(cx, &e),
    };
    match upgrade {
        Some((client_upgrade, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            splice(cx.st, client_upgrade, resp)
        }
        _ => from_upstream(resp),
    }
}

/// Answers the client with the upstream's 101 and, once both sides have switched, copies bytes
/// both ways until either closes. No frame parsing, no idle timeout.
fn splice(st: &State, client: hyper::upgrade::OnUpgrade, mut resp: Response<Streamed>) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let gauge = st.metrics.websockets.clone();
    let stop = st.stop_splices.clone();
    st.splices.spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        gauge.inc();
        let mut c = TokioIo::new(c);
        let mut u = TokioIo::new(u);
        tokio::select! {
            r = crate::splice::both_ways(&mut c, &mut u) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "spliced connection ended with an error");
                }
            }
            // Shutdown's grace period is over: dropping both ends closes them.
            _ = stop.cancelled() => tracing::debug!("spliced connection closed at shutdown"),
        }
        gauge.dec();
    });
    let (parts, _) = resp.into_parts();
    // The 101 keeps Connection/Upgrade and every Sec-WebSocket-* header as the upstream sent them.
    Response::from_parts(parts, ProxyBody::empty())
}

/// The client's `X-Forwarded-For`, as received (every line, joined), for the audit record.
fn xff(headers: &HeaderMap) -> Option<String> {
    let lines: Vec<String> =
        headers.get_all("x-forwarded-for").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    (!lines.is_empty()).then(|| lines.join(", "))
}

/// The `token=...` pair of a query string, as sent (EG accepts `?token=` for authentication);
/// nothing else of the query.
fn token_pair(query: &str) -> Option<&str> {
    query.split('&').find(|p| p.starts_with("token="))
}

/// The user a trusted authenticating proxy named, when identity binding is on: `Ok(None)` when
/// it is off, `Err(message)` (for a 403) when it is on and the header is missing or unusable.
fn trusted_user<'h>(cx: &Ctx<'_>, headers: &'h HeaderMap) -> Result<Option<&'h str>, String> {
    let Some(identity) = &cx.rt.config.identity else { return Ok(None) };
    match headers.get(&identity.header).and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(u) if !u.is_empty() => Ok(Some(u)),
        _ => Err(format!("envgate requires the {} header from the authenticating proxy", identity.header)),
    }
}

/// `POST {base}api/kernels`: the env policy.
async fn kernel_start(req: Request<Incoming>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let (st, rt) = (cx.st, cx.rt);
    let id = st.ids.next();
    let policy = &rt.config.policy;
    let (mut parts, body) = req.into_parts();
    let xff = xff(&parts.headers);
    let mut rec = Record::new(&id, "kernel_start", policy.mode, cx.peer, xff.as_deref());

    let bound_user = match trusted_user(cx, &parts.headers) {
        Ok(u) => u.map(str::to_string),
        Err(msg) => {
            let resp = wire::json_error(StatusCode::FORBIDDEN, &msg);
            let (rec, resp) = refused(rec, resp, "missing trusted user header");
            return finish(cx, rec, &id, resp).await;
        }
    };
    // Read the body, bounded, refusing what cannot be read.
    let bytes = match read_body(
        &parts.headers,
        ProxyBody::stream(body, rt.upstream().body_idle_timeout),
        rt.config.max_body_bytes,
    )
    .await
    {
        Ok(b) => b,
        Err(resp) => {
            let why = resp.status().canonical_reason().unwrap_or("refused").to_string();
            let (rec, resp) = refused(rec, resp, &why);
            return finish(cx, rec, &id, resp).await;
        }
    };
    let mut parsed = match start::parse(&bytes) {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            let resp = wire::json_error(StatusCode::BAD_REQUEST, &msg);
            let (rec, resp) = refused(rec, resp, &msg);
            return finish(cx, rec, &id, resp).await;
        }
    };
    // Identity binding: the trusted user is the kernel's KERNEL_USERNAME, whatever the body says.
    if let (Some(user), Some(identity)) = (&bound_user, &rt.config.identity) {
        match parsed.env.iter_mut().find(|(k, _)| k == USERNAME) {
            Some((_, claimed)) if claimed == user => {}
            Some(_) if identity.on_mismatch == Mismatch::Refuse => {
                let resp = wire::json_error(
                    StatusCode::FORBIDDEN,
                    &format!("{USERNAME} in the request differs from the user named by {}", identity.header),
                );
                rec.user = bound_user.as_deref();
                rec.user_source = Some("trusted_header");
                let (rec, resp) = refused(rec, resp, "KERNEL_USERNAME differs from the trusted user");
                return finish(cx, rec, &id, resp).await;
            }
            Some((_, claimed)) => *claimed = user.clone().into(),
            None => parsed.env.push((USERNAME.into(), user.clone().into())),
        }
    }
    rec.user = parsed.env.iter().find(|(k, _)| k == USERNAME).map(|(_, v)| &**v);
    rec.user_source = match (&bound_user, rec.user) {
        (Some(_), _) => Some("trusted_header"),
        (None, Some(_)) => Some("body"),
        (None, None) => None,
    };

    // Learn the kernelspec's own facts (and the default kernelspec) from the upstream.
    let token = parts.uri.query().and_then(token_pair);
    let fetch_headers = || {
        let mut h = parts.headers.clone();
        clean_for_upstream(&mut h, cx);
        h
    };
    let index = match rt.specs.get(rt.upstream(), rt.routes.kernelspecs_path(), token, fetch_headers).await {
        Ok(i) => i,
        Err(e) => {
            if let SpecsError::Upstream(u) = &e {
                st.metrics.upstream_errors.get_or_create(&KindLabel { kind: u.kind() }).inc();
            }
            tracing::warn!(error = %e.describe(), "cannot learn the kernelspecs");
            let resp = e.response();
            let (rec, resp) = refused(rec, resp, "cannot learn the kernelspecs from the upstream");
            return finish(cx, rec, &id, resp).await;
        }
    };
    let (kernelspec, facts) = index.resolve(parsed.name.as_deref());
    let plan = decide::decide(policy, kernelspec.as_deref(), facts, &parsed, bound_user.is_some());
    rec.kernelspec = kernelspec.as_deref();
    let mut rec = rec.with_decision(&plan.decision);
    rec.violations = plan.violations.iter().map(|v| ViolationName { name: &v.name, rule: v.rule.as_str() }).collect();
    rec.path = plan.path;
    for v in &plan.violations {
        st.metrics.value_violations.get_or_create(&RuleLabel { rule: v.rule.as_str() }).inc();
    }
    if plan.path.is_some() {
        st.metrics.value_violations.get_or_create(&RuleLabel { rule: "path" }).inc();
    }
    let forwarded = match plan.verdict {
        Verdict::Forward(bytes) => bytes,
        Verdict::Refuse(r) => {
            let extra = r.extra.as_object().filter(|o| !o.is_empty()).cloned();
            let resp = wire::json_error_with(r.status, &r.message, extra);
            let (rec, resp) = refused(rec, resp, r.why);
            return finish(cx, rec, &id, resp).await;
        }
    };

    to_upstream(&mut parts, cx);
    for h in [header::CONTENT_ENCODING, header::EXPECT] {
        parts.headers.remove(h);
    }
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(forwarded.len()));
    rec.outcome = "forwarded";
    let resp = match rt.upstream().send(Request::from_parts(parts, ProxyBody::full(forwarded))).await {
        Ok(r) => r,
        Err(e) => {
            let resp = upstream_failed(cx, &e);
            rec.status = Some(resp.status().as_u16());
            let why = format!("upstream {}", e.kind());
            rec.error = Some(&why);
            return finish(cx, rec, &id, resp).await;
        }
    };
    rec.status = Some(resp.status().as_u16());
    let kernel_id = kernel_id_of(resp.headers());
    rec.kernel_id = kernel_id.as_deref();
    finish(cx, rec, &id, from_upstream(resp)).await
}

/// Marks a record as refused with `resp`'s status and the reason `why`.
fn refused<'a>(mut rec: Record<'a>, resp: Response<ProxyBody>, why: &'a str) -> (Record<'a>, Response<ProxyBody>) {
    rec.status = Some(resp.status().as_u16());
    rec.error = Some(why);
    (rec, resp)
}

/// Writes the audit record, counts the decision, and tags the response with the decision id.
async fn finish(cx: &Ctx<'_>, rec: Record<'_>, id: &str, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let m = &cx.st.metrics;
    m.decisions.get_or_create(&DecisionLabel { event: rec.event, outcome: rec.outcome, mode: rec.mode }).inc();
    // One counter update per reason, not per name: a request from an old client rejects dozens.
    let mut by_reason: Vec<(&str, u64)> = Vec::new();
    for r in &rec.rejected {
        match by_reason.iter_mut().find(|(reason, _)| *reason == r.reason) {
            Some((_, n)) => *n += 1,
            None => by_reason.push((r.reason, 1)),
        }
    }
    for (reason, n) in by_reason {
        m.rejected.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }
    cx.st.audit.log(&rec, crate::server::worker_index()).await;
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

/// Reads a policy route's body: identity encoding only, at most `max` bytes. Given a
/// [`ProxyBody::stream`], a body that stalls for `body_idle_timeout` is answered 408.
async fn read_body<B>(headers: &HeaderMap, body: B, max: usize) -> Result<Bytes, Response<ProxyBody>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
        Err(e) if matches!(e.downcast_ref::<BodyError>(), Some(BodyError::Idle(_))) => {
            Err(wire::json_error(StatusCode::REQUEST_TIMEOUT, &format!("the kernel start body stalled: {e}")))
        }
        Err(e) => {
            tracing::debug!(error = %e, "reading a kernel start body failed");
            Err(wire::json_error(StatusCode::BAD_REQUEST, "the kernel start body could not be read"))
        }
    }
}

/// A `POST` that is not exactly a kernel-starting route but could reach one after some
/// normalization: refused (400) and audited, never forwarded.
async fn ambiguous(req: Request<Incoming>, route: Route, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let msg = format!(
        "envgate refuses this request: its path is not exactly a route under {} but could reach a kernel start \
         after normalization; send POST {}api/kernels",
        cx.rt.routes.base(),
        cx.rt.routes.base()
    );
    tracing::warn!(path = %req.uri().path(), "refused an ambiguous kernel-start path");
    refuse_start(req, route, cx, &msg, "ambiguous path").await
}

/// Refuses (400) and audits a request on a kernel-starting route before reading its body.
async fn refuse_start(req: Request<Incoming>, route: Route, cx: &Ctx<'_>, msg: &str, why: &str) -> Response<ProxyBody> {
    let id = cx.st.ids.next();
    let xff = xff(req.headers());
    let event = match route {
        Route::SessionStart | Route::AmbiguousSessionStart => "session_start",
        _ => "kernel_start",
    };
    let rec = Record::new(&id, event, cx.rt.config.policy.mode, cx.peer, xff.as_deref());
    let (rec, resp) = refused(rec, wire::json_error(StatusCode::BAD_REQUEST, msg), why);
    finish(cx, rec, &id, resp).await
}

/// `POST {base}api/sessions`: refused by default, passed (and audited) when allowed.
async fn session_start(req: Request<Incoming>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let policy = &cx.rt.config.policy;
    let id = cx.st.ids.next();
    let xff = xff(req.headers());
    let mut rec = Record::new(&id, "session_start", policy.mode, cx.peer, xff.as_deref());
    if policy.sessions == Sessions::Deny {
        let resp = wire::json_error(
            StatusCode::FORBIDDEN,
            "envgate refuses POST /api/sessions: a session starts its kernel with the gateway's whole \
             environment, outside the env policy. Start kernels with POST /api/kernels, or set sessions = \"allow\".",
        );
        let (rec, resp) = refused(rec, resp, "sessions denied");
        return finish(cx, rec, &id, resp).await;
    }
    let user = match trusted_user(cx, req.headers()) {
        Ok(u) => u.map(str::to_string),
        Err(msg) => {
            let resp = wire::json_error(StatusCode::FORBIDDEN, &msg);
            let (rec, resp) = refused(rec, resp, "missing trusted user header");
            return finish(cx, rec, &id, resp).await;
        }
    };
    rec.user = user.as_deref();
    rec.user_source = user.as_ref().map(|_| "trusted_header");
    rec.outcome = "forwarded";
    let resp = pass(req, cx).await;
    rec.status = Some(resp.status().as_u16());
    // pass() answers 502/504 itself when the upstream fails; EG's own errors carry its JSON.
    if resp.status() == StatusCode::BAD_GATEWAY || resp.status() == StatusCode::GATEWAY_TIMEOUT {
        rec.error = Some("upstream failed");
    }
    finish(cx, rec, &id, resp).await
}

/// `GET {base}api/kernelspecs[/{name}]`: inject `client_envs`, with an ETag of the new body.
async fn kernelspecs(req: Request<Incoming>, route: Route, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let if_none_match: Vec<HeaderValue> = parts.headers.get_all(header::IF_NONE_MATCH).iter().cloned().collect();
    to_upstream(&mut parts, cx);
    wire::ask_for_kernelspecs(&mut parts.headers);
    let body = ProxyBody::stream(body, cx.rt.upstream().body_idle_timeout);
    let resp = match cx.rt.upstream().send(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return upstream_failed(cx, &e),
    };
    let passthrough = &cx.st.metrics.kernelspec_passthrough;
    let encoded = resp.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity");
    if resp.status() != StatusCode::OK || encoded {
        if encoded {
            passthrough.inc();
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
                let e = UpstreamError::Failed(e.to_string());
                return upstream_failed(cx, &e);
            }
        }
        if buf.len() > kernelspecs::MAX_BODY {
            passthrough.inc();
            tracing::warn!("kernelspecs body too large to rewrite; passed on without client_envs");
            return Response::from_parts(parts, ProxyBody::Prefixed { prefix: Some(buf.freeze()), rest: body });
        }
    }
    let list = route == Route::KernelspecList;
    let (new, etag) = match cx.rt.rewrites.get(list, &buf) {
        Some(hit) => hit,
        None => {
            let policy = &cx.rt.config.policy;
            let rewritten =
                if list { kernelspecs::rewrite_list(policy, &buf) } else { kernelspecs::rewrite_one(policy, &buf) };
            match rewritten {
                Ok(b) => {
                    let new = Bytes::from(b);
                    let etag = wire::etag(&new);
                    cx.rt.rewrites.put(list, buf.clone().freeze(), (new.clone(), etag.clone()));
                    (new, etag)
                }
                Err(e) => {
                    passthrough.inc();
                    tracing::warn!(error = %e, route = route.as_str(), "kernelspecs not rewritten; passed on unchanged");
                    return Response::from_parts(parts, ProxyBody::full(buf.freeze()));
                }
            }
        }
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::ETAG, etag.clone());
    if wire::if_none_match(&if_none_match, &etag) {
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

    #[tokio::test]
    async fn a_stalled_streamed_body_is_read_as_a_408() {
        let inner =
            crate::body::tests::response("HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{\"name\":", vec![]).await;
        let body = ProxyBody::stream(inner, std::time::Duration::from_millis(200));
        let resp = read_body(&HeaderMap::new(), body, 1000).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    }
}
