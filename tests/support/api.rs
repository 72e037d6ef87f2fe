//! The Jupyter REST and channels calls the end-to-end tests make of a gateway, or of envgate in
//! front of it: one [`Api`] per credential (none, or a gateway token), the same calls for every
//! gateway so that the tests of each read alike.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::Value;

use super::http::{request, Response};
use super::kernel::{run_code, Protocol};

/// Python that prints the kernel's whole environment as one JSON object.
pub const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";

/// The calls, with `Authorization: <auth>` on each when `auth` is set.
#[derive(Clone, Copy)]
pub struct Api {
    pub auth: Option<&'static str>,
}

impl Api {
    fn headers(&self) -> Vec<(&'static str, &'static str)> {
        self.auth.map(|a| ("Authorization", a)).into_iter().collect()
    }

    pub async fn post(&self, addr: &str, path: &str, body: &Value) -> Response {
        let body = serde_json::to_vec(body).unwrap();
        let mut h = vec![("Content-Type", "application/json")];
        h.extend(self.headers());
        request(addr, "POST", path, &h, &body).await.unwrap()
    }

    pub async fn get(&self, addr: &str, path: &str) -> Response {
        request(addr, "GET", path, &self.headers(), b"").await.unwrap()
    }

    /// Starts a kernel with `body`; panics unless the answer is 201. Returns its id.
    pub async fn start_kernel(&self, addr: &str, body: &Value) -> String {
        let r = self.post(addr, "/api/kernels", body).await;
        assert_eq!(r.status, 201, "kernel start: {}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// The kernel's environment, read over the channels WebSocket at `addr`.
    pub async fn kernel_env(&self, addr: &str, id: &str, protocol: Protocol) -> BTreeMap<String, String> {
        let url = format!("ws://{addr}/api/kernels/{id}/channels");
        let out = run_code(&url, &self.headers(), protocol, PRINT_ENV).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed no JSON ({e}): {out}"))
    }

    pub async fn delete_kernel(&self, addr: &str, id: &str) {
        let r = request(addr, "DELETE", &format!("/api/kernels/{id}"), &self.headers(), b"").await.unwrap();
        assert_eq!(r.status, 204, "delete: {}", r.text());
    }

    /// How many kernels the gateway at `addr` runs.
    pub async fn kernel_count(&self, addr: &str) -> usize {
        let r = self.get(addr, "/api/kernels").await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().unwrap().len()
    }
}
