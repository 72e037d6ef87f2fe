//! Token verification through the library's own verifier, with keys generated here: every
//! check the README names, each failure by its name, and the cache's bounds.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use envgate::jwt::{token_in, JwtError, JwtSettings, TokenCache, Verifier};
use jsonwebtoken::Header;
use serde_json::json;
use support::jwt::{alg_none, claims, hmac, now, swap_payload, Keys, Kind};

const ISS: &str = "https://idp.test/realms/jupyter";
const AUD: &str = "enterprise-gateway";

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys::generate("a"))
}

fn other_keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys::generate("b"))
}

fn verifier_from(text: &str, tweak: impl FnOnce(&mut JwtSettings)) -> Result<Verifier, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, text).unwrap();
    let mut s = JwtSettings {
        keys_file: path,
        issuer: ISS.into(),
        audience: AUD.into(),
        leeway: Duration::from_secs(30),
        user_claim: "sub".into(),
        groups_claim: "groups".into(),
    };
    tweak(&mut s);
    Verifier::load(&s)
}

fn verifier() -> Verifier {
    verifier_from(&keys().jwks(), |_| ()).unwrap()
}

#[test]
fn a_good_token_of_each_algorithm_verifies_from_a_jwks_and_from_pem() {
    let jwks = verifier();
    let pem = verifier_from(&keys().pem(), |_| ()).unwrap();
    for kind in Kind::ALL {
        let t = keys().sign(kind, &claims(ISS, AUD, "alice", &["data-eng", "gpu", "data-eng"]));
        for v in [&jwks, &pem] {
            let c = v.verify(&t).unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
            assert_eq!(c.user, "alice");
            assert_eq!(c.groups, ["data-eng", "gpu"], "repeats dropped, order kept");
        }
        // Without a kid, every key of the algorithm's family is tried.
        let t = keys().sign_with(kind, Header::new(kind.alg()), &claims(ISS, AUD, "bob", &[]));
        assert_eq!(jwks.verify(&t).unwrap().user, "bob");
    }
    assert!(jwks.describe().starts_with("3 keys: RSA kid \"a-rsa\", EC P-256 kid \"a-ec\", Ed25519 kid \"a-ed\""));
    assert!(jwks.describe().contains("skipped: kid \"a-enc\": an encryption key"), "{}", jwks.describe());
    assert_eq!(pem.describe(), "3 keys: RSA (no kid), EC (no kid), Ed25519 (no kid)");
}

#[test]
fn each_failed_check_has_its_own_name() {
    let v = verifier();
    let k = keys();
    let good = claims(ISS, AUD, "alice", &[]);
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (key, val) in patch.as_object().unwrap() {
            if val.is_null() {
                c.as_object_mut().unwrap().remove(key);
            } else {
                c[key] = val.clone();
            }
        }
        c
    };
    let t = now();
    let cases: Vec<(&str, String, JwtError)> = vec![
        ("expired", k.sign(Kind::Ec, &with(json!({"exp": t - 120}))), JwtError::Expired),
        ("not yet valid", k.sign(Kind::Ed, &with(json!({"nbf": t + 120}))), JwtError::NotYetValid),
        ("wrong iss", k.sign(Kind::Rsa, &with(json!({"iss": "https://evil.test"}))), JwtError::WrongIssuer),
        ("no iss", k.sign(Kind::Rsa, &with(json!({"iss": null}))), JwtError::WrongIssuer),
        ("wrong aud", k.sign(Kind::Ec, &with(json!({"aud": "other"}))), JwtError::WrongAudience),
        ("no aud", k.sign(Kind::Ec, &with(json!({"aud": null}))), JwtError::WrongAudience),
        ("no exp", k.sign(Kind::Ed, &with(json!({"exp": null}))), JwtError::Malformed),
        ("no user", k.sign(Kind::Ed, &with(json!({"sub": null}))), JwtError::NoUser),
        ("empty user", k.sign(Kind::Ed, &with(json!({"sub": ""}))), JwtError::NoUser),
        ("user with a newline", k.sign(Kind::Ed, &with(json!({"sub": "a\nb"}))), JwtError::NoUser),
        ("user not a string", k.sign(Kind::Ed, &with(json!({"sub": 7}))), JwtError::NoUser),
        ("groups not strings", k.sign(Kind::Ed, &with(json!({"groups": [1]}))), JwtError::BadGroups),
        ("groups an object", k.sign(Kind::Ed, &with(json!({"groups": {}}))), JwtError::BadGroups),
        ("alg none", alg_none(&good), JwtError::UnsupportedAlgorithm),
        (
            "HMAC with the public key as secret",
            hmac(k.rsa_public_pem().as_bytes(), Some(k.kid(Kind::Rsa)), &good),
            JwtError::UnsupportedAlgorithm,
        ),
        ("HMAC without kid", hmac(k.rsa_public_pem().as_bytes(), None, &good), JwtError::UnsupportedAlgorithm),
        (
            "signed by another key with our kid",
            {
                let mut h = Header::new(jsonwebtoken::Algorithm::EdDSA);
                h.kid = Some(k.kid(Kind::Ed));
                other_keys().sign_with(Kind::Ed, h, &good)
            },
            JwtError::BadSignature,
        ),
        (
            "signed by another key, no kid",
            other_keys().sign_with(Kind::Rsa, Header::new(jsonwebtoken::Algorithm::RS256), &good),
            JwtError::BadSignature,
        ),
        ("unknown kid", other_keys().sign(Kind::Ec, &good), JwtError::UnknownKey),
        (
            "payload changed after signing",
            swap_payload(&k.sign(Kind::Rsa, &good), &with(json!({"sub": "root"}))),
            JwtError::BadSignature,
        ),
        (
            "expired and badly signed: the signature is checked first",
            swap_payload(&k.sign(Kind::Ec, &good), &with(json!({"exp": t - 999}))),
            JwtError::BadSignature,
        ),
        ("not a JWT", "abc".into(), JwtError::Malformed),
        ("four parts", format!("{}.x", k.sign(Kind::Ed, &good)), JwtError::Malformed),
        ("header not JSON", "bm90anNvbg.e30.sig".into(), JwtError::Malformed),
        ("huge", "a".repeat(20_000), JwtError::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(v.verify(&token).map(|c| c.user), Err(want), "{what}");
        let msg = want.message();
        assert!(msg.contains(want.as_str()) && !msg.contains(&token), "{what}: {msg}");
    }
    // A header with `crit` (extensions envgate does not know) is refused.
    let mut h = Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some(k.kid(Kind::Ed));
    let t = k.sign_with(Kind::Ed, h, &good);
    let crit = format!(
        "{}.{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            json!({"alg": "EdDSA", "kid": k.kid(Kind::Ed), "crit": ["exp"]}).to_string()
        ),
        t.split_once('.').unwrap().1
    );
    assert_eq!(v.verify(&crit).map(|c| c.user), Err(JwtError::UnsupportedAlgorithm));
}

#[test]
fn the_leeway_and_the_audience_list() {
    let k = keys();
    let t = now();
    let mut c = claims(ISS, AUD, "alice", &[]);
    c["exp"] = json!(t - 10);
    c["nbf"] = json!(t + 10);
    let token = k.sign(Kind::Ed, &c);
    assert!(verifier().verify(&token).is_ok(), "10 s off is within the default 30 s");
    let strict = verifier_from(&k.jwks(), |s| s.leeway = Duration::ZERO).unwrap();
    assert_eq!(strict.verify(&token).map(|c| c.user), Err(JwtError::Expired));
    c["aud"] = json!(["account", AUD]);
    c["exp"] = json!(t + 60);
    c["nbf"] = json!(t - 10);
    assert!(strict.verify(&k.sign(Kind::Ed, &c)).is_ok(), "an aud list holding ours");
    c["aud"] = json!(["account"]);
    assert_eq!(strict.verify(&k.sign(Kind::Ed, &c)).map(|c| c.user), Err(JwtError::WrongAudience));
}

#[test]
fn user_and_groups_claims_reach_nested_and_namespaced_claims() {
    let k = keys();
    let mut c = claims(ISS, AUD, "1234-uuid", &[]);
    c["preferred_username"] = json!("alice");
    c["realm_access"] = json!({"roles": ["data-eng", "offline_access"]});
    c["https://example.org/groups"] = json!("gpu");
    let token = k.sign(Kind::Rsa, &c);
    let v = verifier_from(&k.jwks(), |s| {
        s.user_claim = "preferred_username".into();
        s.groups_claim = "realm_access.roles".into();
    })
    .unwrap();
    let got = v.verify(&token).unwrap();
    assert_eq!((got.user.as_str(), got.groups.clone()), ("alice", vec!["data-eng".into(), "offline_access".into()]));
    let v = verifier_from(&k.jwks(), |s| s.groups_claim = "https://example.org/groups".into()).unwrap();
    let got = v.verify(&token).unwrap();
    assert_eq!((got.user.as_str(), got.groups.clone()), ("1234-uuid", vec!["gpu".into()]));
    let v = verifier_from(&k.jwks(), |s| s.groups_claim = "nothing.here".into()).unwrap();
    assert!(v.verify(&token).unwrap().groups.is_empty(), "no groups claim: no groups");
}

#[test]
fn key_files_envgate_cannot_use_are_refused_at_load() {
    let cases = [
        ("", "neither a JWKS"),
        ("{\"keys\": []}", "holds no public key"),
        ("{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"kid\": \"s\"}]}", "kid \"s\": a symmetric key"),
        ("{\"keys\": 3}", "`keys` is not a list"),
        ("{not json", "not a JWKS"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "is a private key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "is not an RSA, EC or Ed25519 public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n", "has no end line"),
    ];
    for (text, want) in cases {
        let err = verifier_from(text, |_| ()).unwrap_err();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    // A symmetric key beside usable ones is skipped, and never used: HS256 stays refused.
    let mut list = keys().jwk_list();
    list.push(json!({"kty": "oct", "k": "c2VjcmV0", "kid": "s"}));
    let v = verifier_from(&json!({ "keys": list }).to_string(), |_| ()).unwrap();
    assert!(v.describe().contains("kid \"s\": a symmetric key"));
    let forged = hmac(b"secret", Some("s".into()), &claims(ISS, AUD, "alice", &[]));
    assert_eq!(v.verify(&forged).map(|c| c.user), Err(JwtError::UnsupportedAlgorithm));
    // A single JWK is a key file too.
    let one = keys().jwk_list().remove(2).to_string();
    assert!(verifier_from(&one, |_| ()).unwrap().verify(&keys().sign(Kind::Ed, &claims(ISS, AUD, "a", &[]))).is_ok());
}

#[test]
fn the_token_is_found_in_its_header() {
    let auth = http::header::AUTHORIZATION;
    let other = http::HeaderName::from_static("x-forwarded-access-token");
    let hv = |s: &str| http::HeaderValue::from_str(s).unwrap();
    assert_eq!(token_in(&auth, &hv("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
    assert_eq!(token_in(&auth, &hv("bearer  abc")), Ok("abc"));
    assert_eq!(token_in(&auth, &hv("token abc")), Err(JwtError::Malformed), "EG's own scheme is no JWT");
    assert_eq!(token_in(&auth, &hv("abc")), Err(JwtError::Malformed));
    assert_eq!(token_in(&auth, &hv("")), Err(JwtError::Missing));
    assert_eq!(token_in(&other, &hv("abc.def.ghi")), Ok("abc.def.ghi"));
    assert_eq!(token_in(&other, &hv("Bearer abc")), Ok("abc"));
}

#[test]
fn the_cache_remembers_verified_tokens_until_they_expire_and_stays_bounded() {
    let v = verifier();
    let k = keys();
    let cache = TokenCache::new(4);
    let tokens: Vec<String> = (0..10).map(|i| k.sign(Kind::Ed, &claims(ISS, AUD, &format!("u{i}"), &[]))).collect();
    let at = SystemTime::now();
    for t in &tokens {
        assert!(cache.verify(&v, t, at).is_ok());
        assert!(cache.len() <= 4);
    }
    assert_eq!(cache.verify(&v, &tokens[9], at).unwrap().user, "u9");
    // A failure is not remembered, and a bad token never reads a good one's entry.
    assert_eq!(cache.verify(&v, "x.y.z", at).map(|c| c.user.clone()), Err(JwtError::Malformed));
    assert_eq!(cache.len(), 4);
    // Past exp (plus leeway), the entry is not used: verification runs again and fails.
    let mut c = claims(ISS, AUD, "short", &[]);
    c["exp"] = json!(now() + 5);
    let short = k.sign(Kind::Ec, &c);
    assert!(cache.verify(&v, &short, at).is_ok());
    let later = at + Duration::from_secs(3600);
    assert!(cache.verify(&v, &short, later).is_ok(), "re-verified against the real clock, still valid");
    // A cached token whose clock time passed exp plus leeway is verified again.
    c["exp"] = json!(now() - 40);
    let gone = k.sign(Kind::Ec, &c);
    assert_eq!(cache.verify(&v, &gone, at).map(|c| c.user.clone()), Err(JwtError::Expired));
}
