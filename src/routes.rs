//! Which route a raw request is.
//!
//! Tornado matches the raw, undecoded path (query string ignored) against anchored regexes, so
//! envgate does the same: a route is claimed only when the path is byte for byte the route under
//! the upstream's base URL. Everything else passes through untouched.

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
            Route::Other => "other",
        }
    }

    /// Whether the route starts a kernel (and so must never be passed through unfiltered).
    pub fn starts_kernel(self) -> bool {
        matches!(self, Route::KernelStart | Route::SessionStart)
    }
}

/// The route table under one base path, built once at start-up.
#[derive(Debug, Clone)]
pub struct Routes {
    /// `{base}api/`, e.g. `/api/` or `/gw/api/`.
    api: String,
}

impl Routes {
    /// `base` is the upstream URL's path (EG's `base_url`), with or without a trailing slash.
    pub fn new(base: &str) -> Routes {
        let base = base.trim_end_matches('/');
        Routes { api: format!("{base}/api/") }
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
    pub fn kernelspecs_path(&self) -> String {
        format!("{}kernelspecs", self.api)
    }

    /// Classifies a request by method and raw path (the query, if any, is ignored).
    pub fn classify(&self, method: &Method, path_and_query: &str) -> Route {
        let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
        let Some(rest) = path.strip_prefix(self.api.as_str()) else {
            return Route::Other;
        };
        if *method == Method::POST {
            return match rest {
                "kernels" => Route::KernelStart,
                "sessions" => Route::SessionStart,
                _ => Route::Other,
            };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(r.classify(&Method::POST, "/api/kernels"), Route::Other);
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
