//! Keys and tokens made in the tests: an RSA, an EC P-256 and an Ed25519 key pair, generated
//! afresh, their public halves as a JWKS or PEM, and tokens signed with them (or forged in the
//! ways an attacker would: `alg: none`, HMAC with the public key as secret, a changed payload).

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair as _;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

/// Which key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rsa,
    Ec,
    Ed,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Rsa, Kind::Ec, Kind::Ed];

    pub fn alg(self) -> Algorithm {
        match self {
            Kind::Rsa => Algorithm::RS256,
            Kind::Ec => Algorithm::ES256,
            Kind::Ed => Algorithm::EdDSA,
        }
    }
}

/// One signer: three key pairs with their key ids.
pub struct Keys {
    /// Prefix of the key ids, so that two `Keys` (before and after a rotation) never share one.
    pub tag: String,
    rsa_private_pem: String,
    rsa_public_pem: String,
    rsa_n: Vec<u8>,
    rsa_e: Vec<u8>,
    ec_pkcs8: Vec<u8>,
    ec_public: Vec<u8>,
    ed_pkcs8: Vec<u8>,
    ed_public: Vec<u8>,
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

impl Keys {
    pub fn generate(tag: &str) -> Keys {
        let mut rng = rand_core::OsRng;
        let rsa = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key");
        let rsa_private_pem = rsa.to_pkcs1_pem(Default::default()).unwrap().to_string();
        let rsa_public_pem = rsa.to_public_key().to_public_key_pem(Default::default()).unwrap();
        let sys = ring::rand::SystemRandom::new();
        let ec_alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let ec_pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(ec_alg, &sys).unwrap().as_ref().to_vec();
        let ec_public =
            ring::signature::EcdsaKeyPair::from_pkcs8(ec_alg, &ec_pkcs8, &sys).unwrap().public_key().as_ref().to_vec();
        let ed_pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&sys).unwrap().as_ref().to_vec();
        let ed_public = ring::signature::Ed25519KeyPair::from_pkcs8(&ed_pkcs8).unwrap().public_key().as_ref().to_vec();
        Keys {
            tag: tag.to_string(),
            rsa_private_pem,
            rsa_public_pem,
            rsa_n: rsa.n().to_bytes_be(),
            rsa_e: rsa.e().to_bytes_be(),
            ec_pkcs8,
            ec_public,
            ed_pkcs8,
            ed_public,
        }
    }

    pub fn kid(&self, kind: Kind) -> String {
        format!("{}-{kind:?}", self.tag).to_lowercase()
    }

    /// The public keys as a JWKS, each with its `kid` (and, as IdPs publish, an encryption key
    /// envgate must skip).
    pub fn jwks(&self) -> String {
        let mut keys = self.jwk_list();
        keys.push(json!({"kty": "RSA", "use": "enc", "kid": format!("{}-enc", self.tag),
            "n": B64.encode(&self.rsa_n), "e": B64.encode(&self.rsa_e)}));
        json!({ "keys": keys }).to_string()
    }

    pub fn jwk_list(&self) -> Vec<Value> {
        vec![
            json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid(Kind::Rsa),
                "n": B64.encode(&self.rsa_n), "e": B64.encode(&self.rsa_e)}),
            json!({"kty": "EC", "crv": "P-256", "kid": self.kid(Kind::Ec),
                "x": B64.encode(&self.ec_public[1..33]), "y": B64.encode(&self.ec_public[33..65])}),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid(Kind::Ed), "x": B64.encode(&self.ed_public)}),
        ]
    }

    /// The public keys as PEM (`PUBLIC KEY` blocks, SPKI), one after the other.
    pub fn pem(&self) -> String {
        format!(
            "{}{}{}",
            self.rsa_public_pem,
            spki_pem(&EC_SPKI_PREFIX, &self.ec_public),
            spki_pem(&ED_SPKI_PREFIX, &self.ed_public)
        )
    }

    /// The RSA public key PEM: the "secret" of an HMAC forgery.
    pub fn rsa_public_pem(&self) -> &str {
        &self.rsa_public_pem
    }

    /// A token signed with `kind`'s key, `kid` in its header.
    pub fn sign(&self, kind: Kind, claims: &Value) -> String {
        let mut header = Header::new(kind.alg());
        header.kid = Some(self.kid(kind));
        self.sign_with(kind, header, claims)
    }

    pub fn sign_with(&self, kind: Kind, header: Header, claims: &Value) -> String {
        let key = match kind {
            Kind::Rsa => EncodingKey::from_rsa_pem(self.rsa_private_pem.as_bytes()).unwrap(),
            Kind::Ec => EncodingKey::from_ec_der(&self.ec_pkcs8),
            Kind::Ed => EncodingKey::from_ed_der(&self.ed_pkcs8),
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

/// Claims for `user` in `groups`, valid from a minute ago for an hour, for `iss`/`aud`.
pub fn claims(iss: &str, aud: &str, user: &str, groups: &[&str]) -> Value {
    let now = now();
    json!({"iss": iss, "aud": aud, "sub": user, "groups": groups, "iat": now - 60, "nbf": now - 60, "exp": now + 3600})
}

/// An unsigned token (`alg: none`, empty signature).
pub fn alg_none(claims: &Value) -> String {
    format!("{}.{}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#), B64.encode(claims.to_string()))
}

/// An HS256 token whose secret is `secret` (for the key-confusion forgery: the public key PEM).
pub fn hmac(secret: &[u8], kid: Option<String>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid;
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// `token` with its payload swapped for `claims`, the signature kept.
pub fn swap_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2])
}

const EC_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const ED_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

fn spki_pem(prefix: &[u8], public: &[u8]) -> String {
    let der = [prefix, public].concat();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}
