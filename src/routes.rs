//! Which route a raw request is.
//!
//! Tornado matches the raw, undecoded path (query string ignored) against anchored regexes, so
//! envgate does the same: a route is claimed only when the path is byte for byte the route under
//! the upstream's base URL. Everything else passes through untouched, except one thing: a `POST`
//! whose path is not exactly a kernel-starting route but could become one after any
//! normalization some server or proxy in the chain might do (percent-decoding, case, dot
//! segments, repeated or trailing slashes, `;` parameters, NUL, a base path that differs from
//! the one envgate was told) is refused, never forwarded unfiltered.

use http::Method;

/// The routes envgate acts on; everything else is [`Route::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST {base}api/kernels`: the env policy.
    KernelStart,
    /// `POST {base}api/sessions`: starts a kernel with EG's whole environment.
    SessionStart,
    /// `GET {base}api/kernelspecs`: inject `client_envs` into every kernelspec.
    KernelspecList,
    /// `GET {base}api/kernelspecs/{name}`: inject `client_envs` into one kernelspec.
    KernelspecOne,
    /// A `POST` that could reach `api/kernels` after normalization: refused.
    AmbiguousKernelStart,
    /// A `POST` that could reach `api/sessions` after normalization: refused.
    AmbiguousSessionStart,
    /// Anything else: pass through (WebSocket upgrades included).
    Other,
}

impl Route {
    /// A short, bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::KernelStart => "kernel_start",
            Route::SessionStart => "session_start",
            Route::KernelspecList => "kernelspec_list",
            Route::KernelspecOne => "kernelspec_one",
            Route::AmbiguousKernelStart | Route::AmbiguousSessionStart => "ambiguous",
            Route::Other => "other",
        }
    }

    /// Whether the route starts a kernel, or could (and so must never be passed through unfiltered).
    pub fn starts_kernel(self) -> bool {
        matches!(
            self,
            Route::KernelStart | Route::SessionStart | Route::AmbiguousKernelStart | Route::AmbiguousSessionStart
        )
    }
}

/// The route table under one base path, built once at start-up.
#[derive(Debug, Clone)]
pub struct Routes {
    /// `{base}api/`, e.g. `/api/` or `/gw/api/`.
    api: String,
    /// `{base}api/kernelspecs`, which envgate fetches itself.
    kernelspecs: String,
}

impl Routes {
    /// `base` is the upstream URL's path (EG's `base_url`), with or without a trailing slash;
    /// repeated slashes are collapsed, as EG's `url_path_join` does.
    pub fn new(base: &str) -> Routes {
        let segments: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
        let base = if segments.is_empty() { String::new() } else { format!("/{}", segments.join("/")) };
        let api = format!("{base}/api/");
        Routes { kernelspecs: format!("{api}kernelspecs"), api }
    }

    /// The base path with a trailing slash (`/` or `/gw/`).
    pub fn base(&self) -> &str {
        &self.api[..self.api.len() - "api/".len()]
    }

    /// `{base}api`, which EG answers without a token: the readiness probe.
    pub fn api_path(&self) -> String {
        self.api.trim_end_matches('/').to_string()
    }

    /// The path of the kernelspecs list, which envgate fetches itself.
    pub fn kernelspecs_path(&self) -> &str {
        &self.kernelspecs
    }

    /// Classifies a request by method and request target. An absolute-form target
    /// (`POST http://host/api/kernels`) is not what tornado routes (EG answers it 404), but a
    /// proxy before EG might turn it into the origin form: on a kernel-starting route it is
    /// ambiguous, and refused.
    pub fn classify_target(&self, method: &Method, target: &http::Uri) -> Route {
        let route = self.classify(method, target.path_and_query().map_or("/", |p| p.as_str()));
        match route {
            Route::KernelStart if target.authority().is_some() => Route::AmbiguousKernelStart,
            Route::SessionStart if target.authority().is_some() => Route::AmbiguousSessionStart,
            r => r,
        }
    }

    /// Classifies a request by method and raw path (the query, if any, is ignored).
    pub fn classify(&self, method: &Method, path_and_query: &str) -> Route {
        let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
        if *method == Method::POST {
            return match path.strip_prefix(self.api.as_str()) {
                Some("kernels") => Route::KernelStart,
                Some("sessions") => Route::SessionStart,
                _ => match normalized_tail(path) {
                    Some(Tail::Kernels) => Route::AmbiguousKernelStart,
                    Some(Tail::Sessions) => Route::AmbiguousSessionStart,
                    None => Route::Other,
                },
            };
        }
        let Some(rest) = path.strip_prefix(self.api.as_str()) else {
            return Route::Other;
        };
        if *method == Method::GET {
            if rest == "kernelspecs" {
                return Route::KernelspecList;
            }
            // EG's pattern is `[\w.\-%]+`; a wider match only costs a rewrite attempt that
            // fails harmlessly on a body that is not a kernelspec.
            if let Some(name) = rest.strip_prefix("kernelspecs/") {
                if !name.is_empty() && !name.contains('/') {
                    return Route::KernelspecOne;
                }
            }
        }
        Route::Other
    }
}

enum Tail {
    Kernels,
    Sessions,
}

/// Whether `path` ends in `api/kernels` or `api/sessions` after the most generous normalization
/// anything in a proxy chain might apply: percent-decoding (repeated), `\\` as `/`, case, `;`
/// parameters, NUL truncation, whitespace, empty and dot segments. The other normalizations are
/// tried on the raw path and after each round of decoding, not only on the fully decoded one: a
/// hop may drop `;` parameters or dot segments before it decodes (`/api/kernels;x%2f..`,
/// `/api/%2e%2e/../kernels`), or decode only once (`/api/kernels/%252e%252e/%2e%2e`).
fn normalized_tail(path: &str) -> Option<Tail> {
    let mut bytes = path.as_bytes().to_vec();
    for round in 0..=3 {
        if round > 0 {
            let decoded = percent_decode(&bytes);
            if decoded == bytes {
                break;
            }
            bytes = decoded;
        }
        if let Some(tail) = tail_of(&bytes) {
            return Some(tail);
        }
    }
    None
}

/// [`normalized_tail`] for one stage of decoding, under each way a hop might treat `\\` (a
/// separator, or a plain byte), NUL (it ends the whole path as in C strings, ends only its
/// segment, or is a plain byte) and white space (trimmed or not).
fn tail_of(bytes: &[u8]) -> Option<Tail> {
    let raw = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    let slashed = raw.replace('\\', "/");
    let tail = [raw.as_str(), slashed.as_str()].into_iter().find_map(|text| {
        let whole = text.split('\0').next().unwrap_or("");
        tail_with(whole, |s| s.split(';').next().unwrap_or("").trim())
            .or_else(|| tail_with(text, |s| s.split(['\0', ';']).next().unwrap_or("").trim()))
            .or_else(|| tail_with(text, |s| s.split(';').next().unwrap_or("")))
    });
    tail
}

/// The route `text` reaches once each segment is cleaned by `clean` and dot segments are applied.
fn tail_with(text: &str, clean: impl Fn(&str) -> &str) -> Option<Tail> {
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match clean(seg) {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    match segments.as_slice() {
        [.., "api", "kernels"] => Some(Tail::Kernels),
        [.., "api", "sessions"] => Some(Tail::Sessions),
        _ => None,
    }
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_that_could_reach_a_kernel_start_after_normalization_are_ambiguous() {
        for base in ["/", "/gw"] {
            let r = Routes::new(base);
            let b = r.base().trim_end_matches('/').to_string();
            for p in [
                "/api/kernels/".to_string(),
                "/api//kernels".into(),
                "//api/kernels".into(),
                "/api/%6Bernels".into(),
                "/api/%256Bernels".into(),
                "/API/kernels".into(),
                "/api/Kernels".into(),
                "/api/./kernels".into(),
                "/api/x/../kernels".into(),
                "/api/kernels;x".into(),
                "/api;a=b/kernels".into(),
                "/api%2Fkernels".into(),
                "/api/kernels%00".into(),
                "/api/kernels%00.json".into(),
                "\\api\\kernels".into(),
                "/api/kernels%20".into(),
                "/other/api/kernels".into(),
                format!("{b}/api/kernels/"),
                format!("{b}//api/kernels"),
                format!("{b}/API/kernels?x"),
            ] {
                if p == format!("{b}/api/kernels") {
                    continue;
                }
                assert_eq!(r.classify(&Method::POST, &p), Route::AmbiguousKernelStart, "{base} {p}");
                assert!(r.classify(&Method::POST, &p).starts_kernel());
            }
            assert_eq!(r.classify(&Method::POST, &format!("{b}/api/%73essions")), Route::AmbiguousSessionStart);
            assert_eq!(r.classify(&Method::POST, &format!("{b}/api/sessions/")), Route::AmbiguousSessionStart);
            // Other POSTs are not affected.
            for p in ["/api/kernels/abc/restart", "/api/kernelsx", "/api/kernels/x", "/x"] {
                assert_eq!(r.classify(&Method::POST, &format!("{b}{p}")), Route::Other, "{p}");
            }
            // Only POST starts kernels.
            assert_eq!(r.classify(&Method::GET, &format!("{b}/api/kernels/")), Route::Other);
        }
        // A base path envgate was not told about.
        assert_eq!(Routes::new("/").classify(&Method::POST, "/gw/api/kernels"), Route::AmbiguousKernelStart);
        assert_eq!(Routes::new("/gw").classify(&Method::POST, "/api/kernels"), Route::AmbiguousKernelStart);
        assert_eq!(Routes::new("/g.w").classify(&Method::POST, "/gXw/api/kernels"), Route::AmbiguousKernelStart);
        assert_eq!(Routes::new("/g.w").classify(&Method::POST, "/g.w/api/kernels"), Route::KernelStart);
        assert_eq!(Routes::new("//gw//").classify(&Method::POST, "/gw/api/kernels"), Route::KernelStart);
    }

    #[test]
    fn nul_is_read_every_way_a_hop_might() {
        let r = Routes::new("/");
        for p in [
            // NUL kept as a byte: `..` pops the NUL segment (found by the fuzzer)
            "/API/kernels/\0\0x/..",
            // NUL ends the segment
            "/api/kernels\0.json",
            // NUL ends the whole path
            "/api/kernels\0/../x",
            // a trimmed segment
            "/api/kernels%20",
            // a backslash kept as a byte inside a `;` parameter (found by the fuzzer)
            "/api/kernels;x%\\f..",
        ] {
            assert_eq!(r.classify(&Method::POST, p), Route::AmbiguousKernelStart, "{p:?}");
        }
    }

    #[test]
    fn absolute_form_kernel_starts_are_ambiguous() {
        let r = Routes::new("/gw/");
        let t = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(r.classify_target(&Method::POST, &t("http://eg:8888/gw/api/kernels")), Route::AmbiguousKernelStart);
        assert_eq!(r.classify_target(&Method::POST, &t("http://eg/gw/api/sessions?x")), Route::AmbiguousSessionStart);
        assert_eq!(r.classify_target(&Method::POST, &t("http://eg/gw/api/kernels/")), Route::AmbiguousKernelStart);
        assert_eq!(r.classify_target(&Method::POST, &t("/gw/api/kernels")), Route::KernelStart);
        assert_eq!(r.classify_target(&Method::GET, &t("http://eg/gw/api/kernelspecs")), Route::KernelspecList);
        assert_eq!(r.classify_target(&Method::POST, &t("http://eg/gw/api/kernels/x/restart")), Route::Other);
    }

    #[test]
    fn exact_routes_at_root() {
        let r = Routes::new("/");
        assert_eq!(r.classify(&Method::POST, "/api/kernels"), Route::KernelStart);
        assert_eq!(r.classify(&Method::POST, "/api/kernels?x=1"), Route::KernelStart);
        assert_eq!(r.classify(&Method::POST, "/api/sessions"), Route::SessionStart);
        assert_eq!(r.classify(&Method::GET, "/api/kernelspecs"), Route::KernelspecList);
        assert_eq!(r.classify(&Method::GET, "/api/kernelspecs?user=alice/python3"), Route::KernelspecList);
        assert_eq!(r.classify(&Method::GET, "/api/kernelspecs/python3"), Route::KernelspecOne);
        assert_eq!(r.classify(&Method::GET, "/api/kernelspecs/py%33"), Route::KernelspecOne);
        assert_eq!(r.base(), "/");
        assert_eq!(r.kernelspecs_path(), "/api/kernelspecs");
    }

    #[test]
    fn everything_else_is_other() {
        let r = Routes::new("");
        for (m, p) in [
            (Method::GET, "/api/kernels"),
            (Method::DELETE, "/api/kernels"),
            (Method::POST, "/api/kernels/1234/restart"),
            (Method::GET, "/api/kernels/1234/channels"),
            (Method::POST, "/api/kernelspecs"),
            (Method::HEAD, "/api/kernelspecs"),
            (Method::GET, "/api/kernelspecs/"),
            (Method::GET, "/api/kernelspecs/a/b"),
            (Method::GET, "/kernelspecs/python3/logo-64x64.png"),
            (Method::PATCH, "/api/sessions"),
            (Method::GET, "/api/sessions"),
            (Method::POST, "/api"),
            (Method::POST, "/"),
        ] {
            assert_eq!(r.classify(&m, p), Route::Other, "{m} {p}");
        }
    }

    #[test]
    fn routes_live_under_the_base_url() {
        for base in ["/gw", "/gw/"] {
            let r = Routes::new(base);
            assert_eq!(r.base(), "/gw/");
            assert_eq!(r.classify(&Method::POST, "/gw/api/kernels"), Route::KernelStart);
            assert_eq!(r.classify(&Method::GET, "/gw/api/kernelspecs"), Route::KernelspecList);
            assert_eq!(r.classify(&Method::POST, "/api/kernels"), Route::AmbiguousKernelStart);
            assert_eq!(r.kernelspecs_path(), "/gw/api/kernelspecs");
        }
    }

    #[test]
    fn kernel_starting_routes_are_flagged() {
        assert!(Route::KernelStart.starts_kernel());
        assert!(Route::SessionStart.starts_kernel());
        assert!(!Route::KernelspecList.starts_kernel());
        assert!(!Route::Other.starts_kernel());
    }
}
