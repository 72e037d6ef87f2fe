//! Signed-token identity (`jwt_keys`): the keys, the checks a token must pass, and a bounded
//! cache of the tokens that passed.
//!
//! The signature and claim checks are `jsonwebtoken`'s; this module only decides which keys
//! and algorithms are on offer, and what each failure is called. Only public-key algorithms
//! are accepted (RSA, ECDSA, EdDSA): a token whose header says `none` or an HMAC algorithm is
//! refused before any key is touched, so a public key can never be used as an HMAC secret.
//! `exp`, `iss` and `aud` are required, `nbf` is checked when present, both times with
//! `jwt_leeway` of slack.
//!
//! Errors name the check that failed and never hold the token or a claim's value.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// What token verification is configured with; compared on reload to tell what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// `jwt_keys`: a JWKS file or PEM public keys.
    pub keys_file: PathBuf,
    /// `jwt_issuer`: the `iss` every token must have.
    pub issuer: String,
    /// `jwt_audience`: the `aud` every token must have or hold.
    pub audience: String,
    /// `jwt_leeway`: how far `exp` and `nbf` may be off the clock.
    pub leeway: Duration,
    /// `user_claim`: where the user name is (a dotted path reaches nested claims).
    pub user_claim: String,
    /// `groups_claim`: where the groups are (a list of strings, or one string).
    pub groups_claim: String,
}

/// The longest token envgate reads; longer ones are `malformed` before any decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The longest user name a token may carry.
const MAX_USER_BYTES: usize = 256;

/// The algorithms a key can verify. None of them is an HMAC.
const RSA_ALGS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];
const EC_ALGS: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const ED_ALGS: &[Algorithm] = &[Algorithm::EdDSA];

/// One verification key, with the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
    /// For `envgate check`: `RSA`, `EC P-256`, `Ed25519`, ...
    kind: &'static str,
}

/// The keys from `jwt_keys` and the checks every token must pass; built once per load.
pub struct Verifier {
    keys: Vec<Key>,
    /// Keys in the file envgate cannot use (encryption keys, symmetric keys, unknown types).
    skipped: Vec<String>,
    validation: Validation,
    user_claim: String,
    groups_claim: String,
    leeway: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.describe()).finish_non_exhaustive()
    }
}

/// What a verified token says about who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub groups: Vec<String>,
    /// `exp`: the cache forgets the token then (plus the leeway).
    pub expires: SystemTime,
}

/// The check a token failed; `as_str` is the reason in metrics, audit records and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// No token header, or an empty one.
    Missing,
    /// Not a JWT (three base64url parts of JSON), too long, or without `exp`.
    Malformed,
    /// `alg` is `none`, an HMAC, or one envgate does not verify; or the header has `crit`.
    UnsupportedAlgorithm,
    /// No key in `jwt_keys` has the token's `kid`, or none fits its algorithm.
    UnknownKey,
    /// No key's signature check passed.
    BadSignature,
    /// `exp` is past, beyond the leeway.
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    NotYetValid,
    /// `iss` missing or not `jwt_issuer`.
    WrongIssuer,
    /// `aud` missing or not (holding) `jwt_audience`.
    WrongAudience,
    /// `user_claim` missing, not a string, empty, too long or with control characters.
    NoUser,
    /// `groups_claim` present but neither a string nor a list of strings.
    BadGroups,
}

impl JwtError {
    pub fn as_str(&self) -> &'static str {
        match self {
            JwtError::Missing => "missing",
            JwtError::Malformed => "malformed",
            JwtError::UnsupportedAlgorithm => "unsupported_algorithm",
            JwtError::UnknownKey => "unknown_key",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::WrongAudience => "wrong_audience",
            JwtError::NoUser => "no_user",
            JwtError::BadGroups => "bad_groups",
        }
    }

    /// The 401's message: which check failed, never the token.
    pub fn message(&self) -> String {
        let why = match self {
            JwtError::Missing => "the request has no token",
            JwtError::Malformed => "the token is not a signed JWT with an exp claim",
            JwtError::UnsupportedAlgorithm => {
                "the token's algorithm is not accepted (only RS*, PS*, ES256, ES384 and EdDSA; never none or HMAC)"
            }
            JwtError::UnknownKey => "no configured key matches the token's kid and algorithm",
            JwtError::BadSignature => "the token's signature does not verify",
            JwtError::Expired => "the token has expired",
            JwtError::NotYetValid => "the token is not valid yet (nbf)",
            JwtError::WrongIssuer => "the token's iss is not the configured issuer",
            JwtError::WrongAudience => "the token's aud does not name the configured audience",
            JwtError::NoUser => "the token has no usable user name in its user claim",
            JwtError::BadGroups => "the token's groups claim is not a list of strings",
        };
        format!("envgate refused the request: {why} (token {})", self.as_str())
    }
}

/// The token in a `jwt_header` value: `Bearer <token>` in `Authorization` (the scheme in any
/// case), the bare value (or `Bearer <token>`) in any other header.
pub fn token_in<'v>(header: &http::HeaderName, value: &'v http::HeaderValue) -> Result<&'v str, JwtError> {
    let v = value.to_str().map_err(|_| JwtError::Malformed)?.trim();
    if v.is_empty() {
        return Err(JwtError::Missing);
    }
    let bearer =
        v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim_start());
    let token = match bearer {
        Some(t) => t,
        None if header == http::header::AUTHORIZATION => return Err(JwtError::Malformed),
        None => v,
    };
    if token.is_empty() {
        return Err(JwtError::Missing);
    }
    Ok(token)
}

impl Verifier {
    /// Reads `settings.keys_file`: a JWKS (`{"keys": [...]}`), a single JWK, or one or more PEM
    /// public keys (`PUBLIC KEY` of RSA, EC or Ed25519, or `RSA PUBLIC KEY`). The error says what
    /// is wrong with the file, never a key's bytes.
    pub fn load(settings: &JwtSettings) -> Result<Verifier, String> {
        let text = std::fs::read_to_string(&settings.keys_file)
            .map_err(|e| format!("cannot read {}: {e}", settings.keys_file.display()))?;
        let (keys, skipped) = if text.trim_start().starts_with('{') { from_jwks(&text)? } else { from_pem(&text)? };
        if keys.is_empty() {
            return Err(format!(
                "{} holds no public key envgate can verify with{}",
                settings.keys_file.display(),
                if skipped.is_empty() { String::new() } else { format!(" (skipped: {})", skipped.join(", ")) }
            ));
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Whole seconds, rounded up, as `exp` and `nbf` are.
        validation.leeway = settings.leeway.as_secs() + u64::from(settings.leeway.subsec_nanos() > 0);
        Ok(Verifier {
            keys,
            skipped,
            validation,
            user_claim: settings.user_claim.clone(),
            groups_claim: settings.groups_claim.clone(),
            leeway: settings.leeway,
        })
    }

    /// Verifies `token` (signature, then `exp`, `nbf`, `iss`, `aud` against the system clock)
    /// and reads its user and groups.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
            return Err(JwtError::Malformed);
        }
        let head = peek_header(token)?;
        let alg = accepted_alg(&head.alg)?;
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.algs.contains(&alg))
            // A key with a `kid` only for tokens with that `kid` or none; a key without one (PEM) for any.
            .filter(|k| k.kid.is_none() || head.kid.is_none() || k.kid == head.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let mut last = JwtError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.claims(&data.claims),
                Err(e) => {
                    last = classify(e.kind());
                    // Any failure after the signature passed is the token's answer.
                    if last != JwtError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn claims(&self, claims: &Map<String, Value>) -> Result<Claims, JwtError> {
        let user = match claim(claims, &self.user_claim) {
            Some(Value::String(u))
                if !u.is_empty() && u.len() <= MAX_USER_BYTES && !u.chars().any(char::is_control) =>
            {
                u.clone()
            }
            _ => return Err(JwtError::NoUser),
        };
        let mut groups: Vec<String> = Vec::new();
        let mut add = |g: &str| {
            if !g.is_empty() && !groups.iter().any(|have| have == g) {
                groups.push(g.to_string());
            }
        };
        match claim(claims, &self.groups_claim) {
            None | Some(Value::Null) => {}
            Some(Value::String(g)) => add(g),
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(g) => add(g),
                        _ => return Err(JwtError::BadGroups),
                    }
                }
            }
            Some(_) => return Err(JwtError::BadGroups),
        }
        // `exp` is there and a number: the validation required it.
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0).max(0.0);
        let expires = UNIX_EPOCH + Duration::from_secs_f64(exp.min(1e12));
        Ok(Claims { user, groups, expires })
    }

    /// For `envgate check`: how many keys, their kinds and ids, what was skipped.
    pub fn describe(&self) -> String {
        let mut out = format!("{} key{}:", self.keys.len(), if self.keys.len() == 1 { "" } else { "s" });
        for (i, k) in self.keys.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            match &k.kid {
                Some(kid) => {
                    let _ = write!(out, "{sep}{} kid {kid:?}", k.kind);
                }
                None => {
                    let _ = write!(out, "{sep}{} (no kid)", k.kind);
                }
            }
        }
        if !self.skipped.is_empty() {
            let _ = write!(out, "; skipped: {}", self.skipped.join(", "));
        }
        out
    }
}

/// The claim at `path`: the top-level claim of that exact name when there is one (namespaced
/// claims such as `https://example.org/groups` hold dots), else the dotted path through nested
/// objects (`realm_access.roles`).
fn claim<'c>(claims: &'c Map<String, Value>, path: &str) -> Option<&'c Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut at = claims.get(parts.next()?)?;
    for part in parts {
        at = at.as_object()?.get(part)?;
    }
    Some(at)
}

/// The two header fields envgate decides on before any key is touched.
#[derive(serde::Deserialize)]
struct Peek {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

fn peek_header(token: &str) -> Result<Peek, JwtError> {
    let head = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).map_err(|_| JwtError::Malformed)?;
    let peek: Peek = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    // Extensions envgate does not know must not be ignored (RFC 7515, 4.1.11).
    if peek.crit.is_some() {
        return Err(JwtError::UnsupportedAlgorithm);
    }
    Ok(peek)
}

/// The public-key algorithm `alg` names, or `UnsupportedAlgorithm` (`none`, `HS*`, anything else).
fn accepted_alg(alg: &str) -> Result<Algorithm, JwtError> {
    let a = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(JwtError::UnsupportedAlgorithm),
    };
    Ok(a)
}

fn classify(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::Crypto(_) => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            JwtError::UnsupportedAlgorithm
        }
        _ => JwtError::Malformed,
    }
}

fn from_jwks(text: &str) -> Result<(Vec<Key>, Vec<String>), String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let list = match doc.get("keys") {
        Some(Value::Array(keys)) => keys.clone(),
        Some(_) => return Err("not a JWKS: `keys` is not a list".into()),
        None if doc.get("kty").is_some() => vec![doc.clone()],
        None => return Err("not a JWKS: no `keys` list".into()),
    };
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in list.into_iter().enumerate() {
        let label = match raw.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("kid {kid:?}"),
            None => format!("key {}", i + 1),
        };
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(j) => j,
            Err(_) => {
                skipped.push(format!("{label}: a key type envgate does not use"));
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            skipped.push(format!("{label}: an encryption key"));
            continue;
        }
        let (kind, algs): (&'static str, &[Algorithm]) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => ("RSA", RSA_ALGS),
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => ("EC P-256", &[Algorithm::ES256]),
                EllipticCurve::P384 => ("EC P-384", &[Algorithm::ES384]),
                _ => {
                    skipped.push(format!("{label}: an EC curve envgate does not verify"));
                    continue;
                }
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => ("Ed25519", ED_ALGS),
            AlgorithmParameters::OctetKeyPair(_) => {
                skipped.push(format!("{label}: an OKP curve envgate does not verify"));
                continue;
            }
            AlgorithmParameters::OctetKey(_) => {
                skipped.push(format!("{label}: a symmetric key"));
                continue;
            }
        };
        let algs: Vec<Algorithm> = match jwk.common.key_algorithm {
            None => algs.to_vec(),
            Some(ka) => match key_alg(ka).filter(|a| algs.contains(a)) {
                Some(a) => vec![a],
                None => {
                    skipped.push(format!("{label}: its alg does not fit the key or is not accepted"));
                    continue;
                }
            },
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{label}: not a valid key: {e}"))?;
        keys.push(Key { kid: jwk.common.key_id.clone(), algs, key, kind });
    }
    Ok((keys, skipped))
}

fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn from_pem(text: &str) -> Result<(Vec<Key>, Vec<String>), String> {
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    let mut rest = text;
    let mut n = 0;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start..];
        let Some(label_end) = after[11..].find("-----") else { break };
        let label = &after[11..11 + label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else {
            return Err(format!("PEM block {label:?} has no end line"));
        };
        let block = &after[..end + end_marker.len()];
        rest = &after[end + end_marker.len()..];
        n += 1;
        let bytes = block.as_bytes();
        let (kind, algs, key) = match label {
            "RSA PUBLIC KEY" => ("RSA", RSA_ALGS, DecodingKey::from_rsa_pem(bytes)),
            "PUBLIC KEY" => {
                if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
                    ("RSA", RSA_ALGS, Ok(k))
                } else if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
                    ("EC", EC_ALGS, Ok(k))
                } else {
                    ("Ed25519", ED_ALGS, DecodingKey::from_ed_pem(bytes))
                }
            }
            "CERTIFICATE" => {
                skipped.push(format!("PEM block {n}: a certificate (give its public key)"));
                continue;
            }
            other if other.contains("PRIVATE") => {
                return Err(format!("PEM block {n} is a private key: give envgate only public keys"));
            }
            other => {
                skipped.push(format!("PEM block {n}: {other:?}"));
                continue;
            }
        };
        let key = key.map_err(|_| format!("PEM block {n} ({label}) is not an RSA, EC or Ed25519 public key"))?;
        keys.push(Key { kid: None, algs: algs.to_vec(), key, kind });
    }
    if n == 0 {
        return Err("neither a JWKS (JSON) nor PEM public keys".into());
    }
    Ok((keys, skipped))
}

/// Verified tokens, remembered until they expire so that a kernelspec GET or a WebSocket upgrade
/// does not pay a signature check each time. Bounded: at most `capacity` tokens, keyed by their
/// SHA-256 (the tokens themselves are not kept). Failures are not remembered.
pub struct TokenCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], Arc<Claims>>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache { capacity: capacity.max(1), entries: Mutex::new(HashMap::new()) }
    }

    /// `v.verify(token)`, from the cache while `now` is before the token's `exp` plus the leeway.
    pub fn verify(&self, v: &Verifier, token: &str, now: SystemTime) -> Result<Arc<Claims>, JwtError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = entries.get(&id) {
                if now <= c.expires + v.leeway {
                    return Ok(c.clone());
                }
                entries.remove(&id);
            }
        }
        let claims = Arc::new(v.verify(token)?);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, c| now <= c.expires + v.leeway);
            // Still full of live tokens: make room by forgetting one; it is verified again if it comes back.
            if entries.len() >= self.capacity {
                if let Some(k) = entries.keys().next().copied() {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(id, claims.clone());
        Ok(claims)
    }

    /// How many tokens are remembered now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
