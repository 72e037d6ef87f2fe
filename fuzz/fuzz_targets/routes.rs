//! Bytes as a request path, classified for several methods under the bases `/` and `/gw/`.
//! Checks (in `tests/oracle/`): no panic; exact routes are claimed exactly; a POST whose path
//! reaches `api/kernels` or `api/sessions` after dropping `;params`, case folding, removing dot
//! segments and collapsing slashes (on the raw path or after each of up to three rounds of
//! percent-decoding) is ambiguous, never `Other`; only POST starts kernels.

#![no_main]

#[path = "../../tests/oracle/mod.rs"]
mod oracle;

use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    for base in ["/", "/gw/"] {
        for m in [Method::POST, Method::GET, Method::PUT] {
            oracle::check_route(base, &m, &path, 3);
        }
    }
});
