//! Placeholder for token verification (being written); same API as the real module.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    pub keys_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
    pub user_claim: String,
    pub groups_claim: String,
}

#[derive(Debug)]
pub struct Verifier;

impl Verifier {
    pub fn load(_settings: &JwtSettings) -> Result<Verifier, String> {
        Err("not yet".into())
    }
    pub fn verify(&self, _token: &str, _now: SystemTime) -> Result<Claims, JwtError> {
        Err(JwtError::Malformed)
    }
    pub fn describe(&self) -> String {
        String::new()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub groups: Vec<String>,
    pub expires: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    Missing,
    Malformed,
}

impl JwtError {
    pub fn as_str(&self) -> &'static str {
        "malformed"
    }
    pub fn message(&self) -> String {
        String::new()
    }
}

pub fn token_in<'v>(_header: &http::HeaderName, _value: &'v http::HeaderValue) -> Result<&'v str, JwtError> {
    Err(JwtError::Malformed)
}

#[derive(Debug)]
pub struct TokenCache;

impl TokenCache {
    pub fn new(_capacity: usize) -> Self {
        TokenCache
    }
    pub fn verify(&self, v: &Verifier, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        v.verify(token, now)
    }
}
