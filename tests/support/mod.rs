//! Shared helpers for integration tests (`mod support;` in each test crate).

pub mod api;
pub mod eg;
pub mod envgate;
pub mod fake_upstream;
pub mod gateway;
pub mod http;
pub mod jupyter;
pub mod jwt;
pub mod kernel;
pub mod kg;
