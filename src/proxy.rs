//! The hyper service: one function per route class, in the spirit of Pingora's phases
//! (classify the request, filter it, send it upstream, filter the response).
//!
//! - pass-through: headers cleaned, bodies streamed both ways, upgrades spliced;
//! - kernel start: body read (bounded), parsed strictly, decided by [`crate::decide`],
//!   re-serialized by [`crate::rewrite::start`], audited;
//! - session start: refused unless allowed, audited;
//! - kernelspecs: response rewritten by [`crate::rewrite::kernelspecs`], with its own ETag.
//!
//! The policy routes (kernel start, session start, ambiguous paths) have one exit: their steps
//! return a [`Forwarded`] or a [`Refusal`], and [`finish`] alone turns that into the response,
//! the metrics and the audit record, so no step can answer without being audited.
//!
//! The service is handed what it runs on ([`State`], the request's [`Worker`]) by the shell; it
//! knows nothing of threads or listeners.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::audit::{Event, Outcome, Record};
use crate::body::{ProxyBody, StreamError, Streamed};
use crate::config::IdentityFrom;
use crate::decide::{self, Binding, UserSource};
use crate::identity::{self, IdentitySource, Who};
use crate::jwt;
use crate::metrics::{DecisionLabel, KindLabel, ReasonLabel, RouteLabel, RouteStatus, RuleLabel};
use crate::policy::{Sessions, View};
use crate::rawhead::Watch;
use crate::rewrite::kernelspecs;
use crate::rewrite::start::{self, StartBody};
use crate::routes::Route;
use crate::runtime::{Runtime, State, Worker};
use crate::upstream::{SpecsError, Upstream, UpstreamError};
use crate::wire;

/// One request's view: the shared state, the runtime snapshot, and where the request came from.
struct Ctx<'a> {
    st: &'a State,
    rt: &'a Runtime,
    /// The upstream client of the worker serving the request, from `rt`.
    upstream: &'a Upstream,
    /// The worker serving the request, whose audit batch its record joins.
    worker: Worker,
    peer: SocketAddr,
    /// `peer`'s address as an `X-Forwarded-For` item.
    forwarded_for: &'a HeaderValue,
    /// `http` or `https`: how the client reached envgate.
    proto: &'static str,
    /// The client connection's watch, told when the connection switches protocols.
    watch: &'a Watch,
    /// When the request arrived, for the audit record's `duration_ms`.
    started: Instant,
}

/// Serves one request, on `worker`. `raw`: what its head held that hyper's parse dropped, from
/// the connection's `watch` ([`crate::rawhead`]). `forwarded_for`: `peer`'s IP as a header value
/// ([`wire::forwarded_for`]), made once per connection.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    req: Request<Incoming>,
    raw: wire::RawHead,
    watch: Arc<Watch>,
    peer: SocketAddr,
    forwarded_for: HeaderValue,
    proto: &'static str,
    worker: Worker,
    st: Arc<State>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let rt = st.runtime.load_full();
    let cx = Ctx {
        st: &st,
        rt: &rt,
        upstream: rt.upstream(worker),
        worker,
        peer,
        forwarded_for: &forwarded_for,
        proto,
        watch: &watch,
        started,
    };
    let route = rt.routes.classify_target(req.method(), req.uri());
    let resp = if let Err(bad) = wire::framing(req.headers(), raw) {
        // On every route: a request a front proxy frames differently hides another one.
        st.metrics.framing_refused.get_or_create(&KindLabel { kind: bad.kind() }).inc();
        tracing::warn!(kind = bad.kind(), %peer, route = route.as_str(), "refused a request's framing");
        match route {
            _ if route.starts_kernel() => Box::pin(refuse(req.headers(), route, Refusal::Framing(bad), &cx)).await,
            _ => bad.response(),
        }
    } else if req.method() == Method::CONNECT {
        wire::json_error(StatusCode::METHOD_NOT_ALLOWED, "envgate is a reverse proxy; CONNECT is not supported")
    } else {
        match identity_for(route, &req, &cx) {
            // The policy routes' futures are boxed: kept inline, they made this future (which
            // hyper moves for every request) 6.8 KB instead of 3.3, for every route.
            Ok(who) => match route {
                Route::KernelStart => Box::pin(kernel_start(req, who, &cx)).await,
                Route::SessionStart => Box::pin(session_start(req, who, &cx)).await,
                Route::KernelspecList | Route::KernelspecOne => kernelspecs(req, route, who, &cx).await,
                Route::AmbiguousKernelStart | Route::AmbiguousSessionStart => {
                    Box::pin(ambiguous(req, route, &cx)).await
                }
                Route::Other => pass(req, &cx).await,
            },
            Err(refusal) if route.starts_kernel() => Box::pin(refuse(req.headers(), route, *refusal, &cx)).await,
            Err(refusal) => refusal.into_response(),
        }
    };
    let m = &st.metrics;
    m.requests.get_or_create(&RouteStatus { route: route.as_str(), status: resp.status().as_u16() }).inc();
    m.latency.get_or_create(&RouteLabel { route: route.as_str() }).observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

/// The request's identity, where the route needs one: every route with a token (envgate then
/// trusts no request without one), the kernel start, session start and kernelspec routes with
/// a trusted proxy's headers.
fn identity_for(route: Route, req: &Request<Incoming>, cx: &Ctx<'_>) -> Result<Option<Who>, Box<Refusal>> {
    let needed = match cx.rt.config.identity.as_ref().map(|i| &i.from) {
        None => false,
        Some(IdentityFrom::Jwt(_)) => true,
        Some(IdentityFrom::Headers { .. }) => {
            matches!(route, Route::KernelStart | Route::SessionStart | Route::KernelspecList | Route::KernelspecOne)
        }
    };
    if needed {
        identify(cx, req.headers())
    } else {
        Ok(None)
    }
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
    // The user's token is envgate's to check, not EG's to see: it may open other services too.
    if let Some(IdentityFrom::Jwt(j)) = cx.rt.config.identity.as_ref().map(|i| &i.from) {
        headers.remove(&j.header);
    }
    if let Some(auth) = &cx.upstream.auth {
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
    let body = ProxyBody::stream(body, cx.upstream.body_idle_timeout);
    let resp = match cx.upstream.send(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return upstream_failed(cx, &e),
    };
    match upgrade {
        Some((client_upgrade, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            // Before hyper reads on: what the client sends next is the new protocol's.
            cx.watch.upgraded();
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

// ---------------------------------------------------------------------------------------------
// The policy routes: steps that end in a `Forwarded` or a `Refusal`, and their one exit.

/// A policy route's request, sent upstream.
#[derive(Debug)]
struct Forwarded {
    /// The upstream's answer, or envgate's 502/504 when it gave none.
    response: Response<ProxyBody>,
    /// Why the upstream gave no answer of its own, for the audit record.
    failure: Option<Cow<'static, str>>,
    /// The new kernel's id (kernel starts only).
    kernel_id: Option<String>,
}

/// Why envgate answered a policy route's request itself, never sending it upstream.
#[derive(Debug)]
enum Refusal {
    /// The pure decision refused: identity binding or the policy.
    Decided(decide::Refusal),
    /// The body could not be read.
    Body(BodyRefusal),
    /// The body did not pass the strict parse.
    Parse(start::ParseError),
    /// The kernelspecs the policy needs could not be learnt from the upstream.
    Specs(SpecsError),
    /// A `POST` whose path could reach a kernel start after normalization: the message, and the
    /// path for the audit record.
    Ambiguous { message: String, path: String },
    /// A session start under `sessions = "deny"`.
    SessionsDenied,
    /// Body framing a front proxy could read differently; the connection closes after it.
    Framing(wire::BadFraming),
    /// No valid token (401). `bearer`: the token goes in `Authorization`, so the answer
    /// carries a `WWW-Authenticate: Bearer` challenge.
    Token { error: jwt::JwtError, bearer: bool },
}

impl From<decide::Refusal> for Refusal {
    fn from(r: decide::Refusal) -> Refusal {
        Refusal::Decided(r)
    }
}

impl From<BodyRefusal> for Refusal {
    fn from(r: BodyRefusal) -> Refusal {
        Refusal::Body(r)
    }
}

impl From<start::ParseError> for Refusal {
    fn from(e: start::ParseError) -> Refusal {
        Refusal::Parse(e)
    }
}

impl Refusal {
    /// The audit record's `error`: a short reason, never a value.
    fn why(&self) -> Cow<'static, str> {
        match self {
            Refusal::Decided(r) => r.why.into(),
            Refusal::Body(b) => b.status().canonical_reason().unwrap_or("refused").into(),
            Refusal::Parse(e) => e.to_string().into(),
            Refusal::Specs(_) => "cannot learn the kernelspecs from the upstream".into(),
            Refusal::Ambiguous { .. } => "ambiguous path".into(),
            Refusal::SessionsDenied => "sessions denied".into(),
            Refusal::Framing(f) => f.why().into(),
            Refusal::Token { error, .. } => format!("token {}", error.as_str()).into(),
        }
    }

    /// The answer to the client.
    fn into_response(self) -> Response<ProxyBody> {
        match self {
            Refusal::Decided(r) => {
                let extra = r.extra.as_object().filter(|o| !o.is_empty()).cloned();
                wire::json_error_with(r.status, &r.message, extra)
            }
            Refusal::Body(b) => wire::json_error(b.status(), &b.message()),
            Refusal::Parse(e) => wire::json_error(StatusCode::BAD_REQUEST, &e.to_string()),
            Refusal::Specs(e) => e.response(),
            Refusal::Ambiguous { message, .. } => wire::json_error(StatusCode::BAD_REQUEST, &message),
            Refusal::SessionsDenied => wire::json_error(
                StatusCode::FORBIDDEN,
                "envgate refuses POST /api/sessions: a session starts its kernel with the gateway's whole \
                 environment, outside the env policy. Start kernels with POST /api/kernels, or set sessions = \"allow\".",
            ),
            Refusal::Framing(f) => f.response(),
            Refusal::Token { error, bearer } => {
                let mut resp = wire::json_error(StatusCode::UNAUTHORIZED, &error.message());
                if bearer {
                    let challenge = match error {
                        jwt::JwtError::Missing => "Bearer",
                        _ => "Bearer error=\"invalid_token\"",
                    };
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
                }
                resp
            }
        }
    }
}

/// How a policy route ended, as its audit record says.
#[derive(Debug, PartialEq)]
struct Ending {
    outcome: Outcome,
    status: u16,
    error: Option<Cow<'static, str>>,
    kernel_id: Option<String>,
    /// An ambiguous path's path, bounded.
    request_path: Option<String>,
}

impl Ending {
    /// The route's result as its response and its ending.
    fn of(result: Result<Forwarded, Refusal>) -> (Ending, Response<ProxyBody>) {
        match result {
            Ok(f) => {
                let status = f.response.status().as_u16();
                let ending = Ending {
                    outcome: Outcome::Forwarded,
                    status,
                    error: f.failure,
                    kernel_id: f.kernel_id,
                    request_path: None,
                };
                (ending, f.response)
            }
            Err(r) => {
                let error = Some(r.why());
                let request_path = match &r {
                    Refusal::Ambiguous { path, .. } => Some(crate::audit::bounded_path(path).to_string()),
                    _ => None,
                };
                let resp = r.into_response();
                let status = resp.status().as_u16();
                (Ending { outcome: Outcome::Refused, status, error, kernel_id: None, request_path }, resp)
            }
        }
    }

    fn write_to<'a>(&'a self, rec: &mut Record<'a>) {
        rec.outcome = self.outcome;
        rec.status = Some(self.status);
        rec.error = self.error.as_deref();
        rec.kernel_id = self.kernel_id.as_deref();
        rec.request_path = self.request_path.as_deref();
    }
}

/// The one exit of the policy routes: ends the record as `result` says, counts the decision,
/// writes the record (before the response goes out), and tags the response with the decision id
/// and the request id.
async fn finish(cx: &Ctx<'_>, rec: Record<'_>, id: &str, result: Result<Forwarded, Refusal>) -> Response<ProxyBody> {
    let (ending, mut resp) = Ending::of(result);
    let mut rec = rec;
    ending.write_to(&mut rec);
    rec.set_duration(cx.started.elapsed());
    let m = &cx.st.metrics;
    let label = DecisionLabel { event: rec.event.as_str(), outcome: rec.outcome.as_str(), mode: rec.mode.as_str() };
    m.decisions.get_or_create(&label).inc();
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
    cx.st.audit.log(&rec, cx.worker.index()).await;
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-envgate-decision", v);
    }
    if let Ok(v) = HeaderValue::from_str(&rec.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A policy route's audit record, with the request's identity filled in: its request id from
/// `headers`, the policy's hash.
fn record<'a>(cx: &Ctx<'a>, id: &'a str, event: Event, xff: Option<&'a str>, headers: &HeaderMap) -> Record<'a> {
    let mut rec = Record::new(id, event, cx.rt.config.policy.mode, cx.peer, xff);
    rec.policy_hash = &cx.rt.policy_hash;
    let given = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
    if let Some(r) = crate::audit::request_id(given("x-request-id"), given("traceparent")) {
        rec.request_id = Cow::Owned(r.to_string());
    }
    rec
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

/// Who is asking, when identity is configured: the trusted proxy's headers (refused, 403,
/// without the user header) or a verified token (refused, 401, without a valid one).
/// `Ok(None)` when identity is off.
fn identify(cx: &Ctx<'_>, headers: &HeaderMap) -> Result<Option<Who>, Box<Refusal>> {
    let Some(identity) = &cx.rt.config.identity else { return Ok(None) };
    match &identity.from {
        IdentityFrom::Headers { user, groups } => {
            let value = headers.get(user).and_then(|v| v.to_str().ok());
            let user = decide::trusted_user(user.as_str(), value).map_err(|r| Box::new(r.into()))?.to_string();
            let groups = match groups {
                Some(h) => identity::groups_from_header(headers.get_all(h).iter().filter_map(|v| v.to_str().ok())),
                None => Vec::new(),
            };
            Ok(Some(Who { user, groups, source: IdentitySource::Header }))
        }
        IdentityFrom::Jwt(j) => {
            let verified = headers
                .get(&j.header)
                .ok_or(jwt::JwtError::Missing)
                .and_then(|v| jwt::token_in(&j.header, v))
                .and_then(|t| cx.rt.tokens.verify(&j.verifier, t, std::time::SystemTime::now()));
            match verified {
                Ok(c) => Ok(Some(Who { user: c.user.clone(), groups: c.groups.clone(), source: IdentitySource::Jwt })),
                Err(e) => {
                    cx.st.metrics.token_refused.get_or_create(&ReasonLabel { reason: e.as_str() }).inc();
                    Err(Box::new(Refusal::Token { error: e, bearer: j.header == header::AUTHORIZATION }))
                }
            }
        }
    }
}

/// Fills in the record's identity: the user the kernel runs as, its groups, and their source.
fn record_identity<'a>(rec: &mut Record<'a>, who: &'a Who) {
    rec.user = Some(&who.user);
    rec.user_source = Some(match who.source {
        IdentitySource::Header => UserSource::TrustedHeader,
        IdentitySource::Jwt => UserSource::Jwt,
    });
    rec.groups = who.audit_groups().collect();
    rec.identity_source = Some(who.source);
}

/// What a kernel start's audit record borrows: owned by [`kernel_start`], so that the record
/// outlives the steps that fill it in.
#[derive(Default)]
struct Held<'a> {
    /// The request's identity, when identity is configured.
    who: Option<Who>,
    bytes: Bytes,
    body: Option<StartBody<'a>>,
    /// What the decision's steps decided.
    steps: decide::Steps<'a>,
}

/// `POST {base}api/kernels`: the env policy.
async fn kernel_start(req: Request<Incoming>, who: Option<Who>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let id = cx.st.ids.next();
    let (parts, body) = req.into_parts();
    let xff = xff(&parts.headers);
    let mut rec = record(cx, &id, Event::KernelStart, xff.as_deref(), &parts.headers);
    let mut held = Held { who, ..Held::default() };
    let result = kernel_start_steps(parts, body, cx, &mut held, &mut rec).await;
    finish(cx, rec, &id, result).await
}

/// A kernel start, up to the upstream's answer, filling in `rec` on the way.
async fn kernel_start_steps<'a>(
    mut parts: Parts,
    body: Incoming,
    cx: &'a Ctx<'a>,
    held: &'a mut Held<'a>,
    rec: &mut Record<'a>,
) -> Result<Forwarded, Refusal> {
    let Held { who, bytes, body: parsed, steps } = held;
    let rt: &'a Runtime = cx.rt;
    let who: &'a Option<Who> = who;
    if let Some(w) = who {
        record_identity(rec, w);
    }
    *bytes =
        read_body(&parts.headers, ProxyBody::stream(body, cx.upstream.body_idle_timeout), rt.config.max_body_bytes)
            .await?;
    let bytes: &'a Bytes = bytes;
    let asker = who.as_ref().map(|w| decide::Asker {
        who: w,
        binding: rt.config.identity.as_ref().map(|i| Binding { header: i.named_by(), on_mismatch: i.on_mismatch }),
    });
    // Learn the kernelspec's own facts (and the default kernelspec) from the upstream.
    let token = parts.uri.query().and_then(token_pair);
    let fetch_headers = || {
        let mut h = parts.headers.clone();
        clean_for_upstream(&mut h, cx);
        h
    };
    let specs = || async {
        rt.specs
            .get(cx.upstream, rt.routes.kernelspecs_path(), token, fetch_headers)
            .await
            .map_err(|e| specs_failed(cx, e))
    };
    let result =
        decide::kernel_start(&rt.config.policy, rt.config.set_envs_mismatch, asker, bytes, parsed, specs, &mut *steps)
            .await;
    let steps: &'a decide::Steps<'a> = steps;
    steps.write_to(rec, who.is_some());
    let metrics = &cx.st.metrics;
    for v in &steps.violations {
        metrics.value_violations.get_or_create(&RuleLabel { rule: v.rule.as_str() }).inc();
    }
    if steps.path.is_some() {
        metrics.value_violations.get_or_create(&RuleLabel { rule: "path" }).inc();
    }
    let forwarded = result?;

    to_upstream(&mut parts, cx);
    for h in [header::CONTENT_ENCODING, header::EXPECT] {
        parts.headers.remove(h);
    }
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(forwarded.len()));
    match cx.upstream.send(Request::from_parts(parts, ProxyBody::full(forwarded))).await {
        Ok(resp) => {
            Ok(Forwarded { kernel_id: kernel_id_of(resp.headers()), response: from_upstream(resp), failure: None })
        }
        Err(e) => Ok(Forwarded {
            response: upstream_failed(cx, &e),
            failure: Some(format!("upstream {}", e.kind()).into()),
            kernel_id: None,
        }),
    }
}

/// A kernel start whose kernelspecs cannot be learnt: counted, logged, refused.
fn specs_failed(cx: &Ctx<'_>, e: SpecsError) -> Refusal {
    if let SpecsError::Upstream(u) = &e {
        cx.st.metrics.upstream_errors.get_or_create(&KindLabel { kind: u.kind() }).inc();
    }
    tracing::warn!(error = %e.describe(), "cannot learn the kernelspecs");
    Refusal::Specs(e)
}

/// The new kernel's id, from EG's `Location: {base}api/kernels/<id>`.
fn kernel_id_of(headers: &HeaderMap) -> Option<String> {
    let loc = headers.get(header::LOCATION)?.to_str().ok()?;
    let id = loc.rsplit('/').next()?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| id.to_string())
}

/// Why a policy route's body was not read. Never holds any of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRefusal {
    /// A `Content-Encoding` other than identity (415).
    Encoded,
    /// Larger than `max_body_bytes` (413).
    TooLarge { max: usize },
    /// The client sent nothing for this long (408).
    Stalled(Duration),
    /// The client's connection broke mid-body (400).
    Broken,
}

impl BodyRefusal {
    fn status(self) -> StatusCode {
        match self {
            BodyRefusal::Encoded => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyRefusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyRefusal::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            BodyRefusal::Broken => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> String {
        match self {
            BodyRefusal::Encoded => {
                "envgate cannot read a kernel start body with a Content-Encoding; send it uncompressed".into()
            }
            BodyRefusal::TooLarge { max } => format!("the kernel start body is larger than the limit of {max} bytes"),
            BodyRefusal::Stalled(d) => format!("the kernel start body stalled: {}", StreamError::Idle(d)),
            BodyRefusal::Broken => "the kernel start body could not be read".into(),
        }
    }
}

/// Reads a policy route's body: identity encoding only, at most `max` bytes. Given a
/// [`ProxyBody::stream`], a body that stalls for `body_idle_timeout` is refused as stalled.
async fn read_body<B>(headers: &HeaderMap, body: B, max: usize) -> Result<Bytes, BodyRefusal>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    for v in headers.get_all(header::CONTENT_ENCODING) {
        if !v.to_str().is_ok_and(|v| v.split(',').all(|e| e.trim().eq_ignore_ascii_case("identity"))) {
            return Err(BodyRefusal::Encoded);
        }
    }
    if body.size_hint().lower() > max as u64 {
        return Err(BodyRefusal::TooLarge { max });
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyRefusal::TooLarge { max }),
        Err(e) => match e.downcast_ref::<StreamError>() {
            Some(StreamError::Idle(d)) => Err(BodyRefusal::Stalled(*d)),
            _ => {
                tracing::debug!(error = %e, "reading a kernel start body failed");
                Err(BodyRefusal::Broken)
            }
        },
    }
}

/// A `POST` that is not exactly a kernel-starting route but could reach one after some
/// normalization: refused (400) and audited before its body is read, never forwarded.
async fn ambiguous(req: Request<Incoming>, route: Route, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let base = cx.rt.routes.base();
    let msg = format!(
        "envgate refuses this request: its path is not exactly a route under {base} but could reach a kernel start \
         after normalization; send POST {base}api/kernels"
    );
    let path = req.uri().path().to_string();
    tracing::warn!(%path, "refused an ambiguous kernel-start path");
    refuse(req.headers(), route, Refusal::Ambiguous { message: msg, path }, cx).await
}

/// A policy route's request refused before its body is read: audited as its route's event.
async fn refuse(headers: &HeaderMap, route: Route, refusal: Refusal, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let id = cx.st.ids.next();
    let xff = xff(headers);
    let event = match route {
        Route::SessionStart | Route::AmbiguousSessionStart => Event::SessionStart,
        _ => Event::KernelStart,
    };
    let rec = record(cx, &id, event, xff.as_deref(), headers);
    finish(cx, rec, &id, Err(refusal)).await
}

/// `POST {base}api/sessions`: refused by default, passed (and audited) when allowed.
async fn session_start(req: Request<Incoming>, who: Option<Who>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let id = cx.st.ids.next();
    let xff = xff(req.headers());
    let mut rec = record(cx, &id, Event::SessionStart, xff.as_deref(), req.headers());
    if let Some(w) = &who {
        record_identity(&mut rec, w);
    }
    let result = session_start_steps(req, cx).await;
    finish(cx, rec, &id, result).await
}

/// A session start, up to the upstream's answer.
async fn session_start_steps(req: Request<Incoming>, cx: &Ctx<'_>) -> Result<Forwarded, Refusal> {
    if cx.rt.config.policy.sessions == Sessions::Deny {
        return Err(Refusal::SessionsDenied);
    }
    let response = pass(req, cx).await;
    // pass() answers 502/504 itself when the upstream fails; EG's own errors carry its JSON.
    let failed = response.status() == StatusCode::BAD_GATEWAY || response.status() == StatusCode::GATEWAY_TIMEOUT;
    Ok(Forwarded { failure: failed.then_some("upstream failed".into()), kernel_id: None, response })
}

/// `GET {base}api/kernelspecs[/{name}]`: inject `client_envs` (the identity's own, without the
/// kernelspecs it may not start), with an ETag of the new body.
async fn kernelspecs(req: Request<Incoming>, route: Route, who: Option<Who>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let policy = &cx.rt.config.policy;
    let view = match &who {
        Some(w) => policy.view(Some(&w.user), &w.groups),
        None => policy.anonymous(),
    };
    let mut resp = kernelspecs_for(req, route, &view, cx).await;
    if let Some(identity) = &cx.rt.config.identity {
        // The answer depends on who asks: a shared cache must key it by the identity headers.
        for h in identity.headers() {
            if let Ok(v) = HeaderValue::from_str(h.as_str()) {
                resp.headers_mut().append(header::VARY, v);
            }
        }
    }
    resp
}

/// A kernelspecs document that cannot be rewritten: passed on unchanged, unless the view hides
/// kernelspecs (then unchanged would show them): refused with a 502.
fn not_rewritten(view: &View<'_>, parts: http::response::Parts, body: ProxyBody, cx: &Ctx<'_>) -> Response<ProxyBody> {
    if view.blocks.iter().any(|b| b.kernelspecs.is_some()) {
        tracing::warn!("kernelspecs could not be rewritten for an identity that may start only some; refused");
        return wire::json_error(
            StatusCode::BAD_GATEWAY,
            "envgate cannot filter the gateway's kernelspecs for you; try again later",
        );
    }
    cx.st.metrics.kernelspec_passthrough.inc();
    Response::from_parts(parts, body)
}

async fn kernelspecs_for(req: Request<Incoming>, route: Route, view: &View<'_>, cx: &Ctx<'_>) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let if_none_match: Vec<HeaderValue> = parts.headers.get_all(header::IF_NONE_MATCH).iter().cloned().collect();
    to_upstream(&mut parts, cx);
    wire::ask_for_kernelspecs(&mut parts.headers);
    let body = ProxyBody::stream(body, cx.upstream.body_idle_timeout);
    let resp = match cx.upstream.send(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return upstream_failed(cx, &e),
    };
    let encoded = resp.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity");
    if resp.status() != StatusCode::OK {
        return from_upstream(resp);
    }
    if encoded {
        tracing::warn!("kernelspecs came back compressed; passed on without client_envs");
        let (parts, body) = from_upstream(resp).into_parts();
        return not_rewritten(view, parts, body, cx);
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
                return upstream_failed(cx, &UpstreamError::Failed(e.into()));
            }
        }
        if buf.len() > kernelspecs::MAX_BODY {
            tracing::warn!("kernelspecs body too large to rewrite; passed on without client_envs");
            return not_rewritten(view, parts, ProxyBody::Prefixed { prefix: Some(buf.freeze()), rest: body }, cx);
        }
    }
    let list = route == Route::KernelspecList;
    let key = view.key();
    let rewritten = match cx.rt.rewrites.get(list, &key, &buf) {
        Some(hit) => hit,
        None => {
            let rewritten = if list {
                kernelspecs::rewrite_list_for(view, &buf).map(Some)
            } else {
                kernelspecs::rewrite_one_for(view, &buf)
            };
            match rewritten {
                Ok(b) => {
                    let out = b.map(|b| {
                        let new = Bytes::from(b);
                        let etag = wire::etag(&new);
                        (new, etag)
                    });
                    let held = out.as_ref().map_or(0, |(b, _)| b.len());
                    cx.rt.rewrites.put(list, &key, buf.clone().freeze(), out.clone(), held);
                    out
                }
                Err(e) => {
                    tracing::warn!(error = %e, route = route.as_str(), "kernelspecs not rewritten; passed on unchanged");
                    return not_rewritten(view, parts, ProxyBody::full(buf.freeze()), cx);
                }
            }
        }
    };
    let Some((new, etag)) = rewritten else {
        // As EG answers for a kernelspec it does not have.
        return wire::json_error(StatusCode::NOT_FOUND, "Kernel spec not found");
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

    /// The record a route's result ends, as the audit log would have it.
    fn ended(result: Result<Forwarded, Refusal>) -> (serde_json::Value, Response<ProxyBody>) {
        let (ending, resp) = Ending::of(result);
        let mut rec =
            Record::new("id", Event::KernelStart, crate::policy::Mode::Drop, "127.0.0.1:1".parse().unwrap(), None);
        ending.write_to(&mut rec);
        let mut line = Vec::new();
        rec.write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let end = serde_json::json!({
            "outcome": v["outcome"], "status": v["status"], "kernel_id": v["kernel_id"], "error": v["error"]
        });
        (end, resp)
    }

    #[test]
    fn a_refusal_is_answered_and_audited_with_its_status_and_reason() {
        use serde_json::json;
        let policy = decide::Refusal {
            status: StatusCode::FORBIDDEN,
            message: "not allowed: BAR".into(),
            extra: json!({"rejected": [{"name": "BAR", "reason": "not_allowed"}]}),
            why: "policy",
        };
        let parse_error = start::parse(b"[]").unwrap_err();
        let cases = [
            (Refusal::Decided(policy), 403, json!("policy")),
            (Refusal::Body(BodyRefusal::Encoded), 415, json!("Unsupported Media Type")),
            (Refusal::Body(BodyRefusal::TooLarge { max: 10 }), 413, json!("Payload Too Large")),
            (Refusal::Body(BodyRefusal::Stalled(Duration::from_secs(1))), 408, json!("Request Timeout")),
            (Refusal::Body(BodyRefusal::Broken), 400, json!("Bad Request")),
            (Refusal::Parse(parse_error.clone()), 400, json!(parse_error.to_string())),
            (
                Refusal::Specs(SpecsError::Upstream(UpstreamError::Timeout)),
                504,
                json!("cannot learn the kernelspecs from the upstream"),
            ),
            (
                Refusal::Ambiguous { message: "use POST /api/kernels".into(), path: "/api//kernels".into() },
                400,
                json!("ambiguous path"),
            ),
            (Refusal::SessionsDenied, 403, json!("sessions denied")),
            (
                Refusal::Framing(wire::BadFraming::LengthAndChunks),
                400,
                json!("both content-length and transfer-encoding"),
            ),
            (Refusal::Framing(wire::BadFraming::Coding), 501, json!("transfer-encoding other than chunked")),
        ];
        for (refusal, status, why) in cases {
            let (end, resp) = ended(Err(refusal));
            assert_eq!(end, json!({"outcome": "refused", "status": status, "kernel_id": null, "error": why}));
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
        for bad in [wire::BadFraming::LengthAndChunks, wire::BadFraming::Coding] {
            let (_, resp) = ended(Err(Refusal::Framing(bad)));
            assert_eq!(resp.headers()[header::CONNECTION], "close", "{bad:?}: the connection closes after it");
        }
        // An ambiguous path is recorded, bounded; no other ending has one.
        let path = format!("/api//kernels{}", "x".repeat(1000));
        let (ending, _) = Ending::of(Err(Refusal::Ambiguous { message: "m".into(), path: path.clone() }));
        assert_eq!(ending.request_path.as_deref(), Some(&path[..crate::audit::MAX_REQUEST_PATH]));
        assert_eq!(Ending::of(Err(Refusal::SessionsDenied)).0.request_path, None);
        let (_, resp) = ended(Err(Refusal::Body(BodyRefusal::TooLarge { max: 10 })));
        let ProxyBody::Full(body) = resp.into_body() else { panic!("a buffered body") };
        let body: serde_json::Value = serde_json::from_slice(body.as_ref().unwrap()).unwrap();
        assert_eq!(body["message"], "the kernel start body is larger than the limit of 10 bytes");
    }

    #[test]
    fn a_forwarded_request_is_audited_with_the_upstreams_status() {
        use serde_json::json;
        let answer = |status: u16| {
            let mut r = Response::new(ProxyBody::empty());
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r
        };
        let f = Forwarded { response: answer(201), failure: None, kernel_id: Some("k1".into()) };
        let (end, resp) = ended(Ok(f));
        assert_eq!(end, json!({"outcome": "forwarded", "status": 201, "kernel_id": "k1", "error": null}));
        assert_eq!(resp.status(), StatusCode::CREATED);
        let f = Forwarded { response: answer(502), failure: Some("upstream connect".into()), kernel_id: None };
        let (end, _) = ended(Ok(f));
        assert_eq!(end, json!({"outcome": "forwarded", "status": 502, "kernel_id": null, "error": "upstream connect"}));
    }

    #[tokio::test]
    async fn a_stalled_streamed_body_is_read_as_a_408() {
        let inner =
            crate::body::tests::response("HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{\"name\":", vec![]).await;
        let body = ProxyBody::stream(inner, std::time::Duration::from_millis(200));
        let refusal = read_body(&HeaderMap::new(), body, 1000).await.unwrap_err();
        assert_eq!(refusal, BodyRefusal::Stalled(std::time::Duration::from_millis(200)));
        assert_eq!(refusal.status(), StatusCode::REQUEST_TIMEOUT);
    }
}
