//! The signature envelope of a request, and its verification.
//!
//! A request is signed over its method, path (with query), timestamp, nonce, audience
//! (the key of the hub or node addressed), the digest of its body, and the signer's key.
//! (One kind of request signs another digest in the body's place: a resumable upload's
//! piece may sign its statement, `tessera_core::registry::upload_piece_statement`, which
//! the hub accepts before the body arrives, the upload's digest proving the bytes.)
//! The envelope travels in one header:
//!
//! ```text
//! x-tessera-signature: v1;key=ed25519:…;ts=1763761200000;nonce=…;aud=ed25519:…;body=b3:…;sig=…
//! ```
//!
//! A server accepts it only within a time window (60 s by default, either side of its
//! clock), addressed to itself, with the body it signed, a valid signature, and a nonce it
//! has not seen within the window. Unlike a bare timestamp signature, a captured request
//! cannot be replayed, sent to another server, or given another body.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tessera_core::Digest;

use crate::keys::{KeyPair, KeyType, PublicKey, Signature};
use crate::{b64, random};

/// The header carrying the envelope.
pub const HEADER: &str = "x-tessera-signature";

/// Longest envelope accepted, in bytes.
pub const MAX_ENVELOPE: usize = 2048;

/// A request's signature envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Who signed.
    pub key: PublicKey,
    /// When, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// A value never used twice by this signer.
    pub nonce: String,
    /// The server addressed.
    pub audience: PublicKey,
    /// The digest of the body.
    pub body: Digest,
    /// The signature.
    pub sig: Signature,
}

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Over [`MAX_ENVELOPE`].
    #[error("the signature envelope is longer than {MAX_ENVELOPE} bytes")]
    TooLong,
    /// Not version 1.
    #[error("the signature envelope must start with \"v1;\"")]
    Version,
    /// A field is malformed.
    #[error("signature envelope field {field:?}: {why}")]
    Field {
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A field is missing.
    #[error("the signature envelope has no {0:?} field")]
    Missing(&'static str),
}

const FIELDS: [&str; 6] = ["key", "ts", "nonce", "aud", "body", "sig"];

fn field_err(field: &str, why: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Field { field: field.chars().take(32).collect(), why: why.into() }
}

fn check_nonce(n: &str) -> Result<(), EnvelopeError> {
    if !(16..=64).contains(&n.len()) || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(field_err("nonce", "16 to 64 characters of letters, digits, '-' and '_'"));
    }
    Ok(())
}

/// The bytes a signature covers.
pub fn signed_bytes(
    method: &str,
    path: &str,
    ts_ms: u64,
    nonce: &str,
    audience: &PublicKey,
    body: &Digest,
    key: &PublicKey,
) -> Vec<u8> {
    format!("tessera-request-v1\n{method}\n{path}\n{ts_ms}\n{nonce}\n{audience}\n{body}\n{key}").into_bytes()
}

impl Envelope {
    /// Signs a request.
    pub fn sign(key: &KeyPair, audience: &PublicKey, method: &str, path: &str, body: &[u8], ts_ms: u64) -> Envelope {
        Self::sign_digest(key, audience, method, path, Digest::of(body), ts_ms)
    }

    /// Signs a request whose body digest is already known.
    pub fn sign_digest(
        key: &KeyPair,
        audience: &PublicKey,
        method: &str,
        path: &str,
        body: Digest,
        ts_ms: u64,
    ) -> Envelope {
        let nonce = b64(&random::<18>());
        let sig = key.sign(&signed_bytes(method, path, ts_ms, &nonce, audience, &body, key.public()));
        Envelope { key: key.public().clone(), ts_ms, nonce, audience: audience.clone(), body, sig }
    }

    /// The header value.
    pub fn to_header(&self) -> String {
        format!(
            "v1;key={};ts={};nonce={};aud={};body={};sig={}",
            self.key,
            self.ts_ms,
            self.nonce,
            self.audience,
            self.body,
            self.sig.to_text()
        )
    }

    /// Reads a header value. Every field must appear exactly once; unknown fields are
    /// refused.
    pub fn parse(s: &str) -> Result<Envelope, EnvelopeError> {
        if s.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::TooLong);
        }
        let rest = s.strip_prefix("v1;").ok_or(EnvelopeError::Version)?;
        let mut found: [Option<&str>; 6] = [None; 6];
        for part in rest.split(';') {
            let (k, v) = part.split_once('=').ok_or_else(|| field_err(part, "expected name=value"))?;
            let i = FIELDS.iter().position(|f| *f == k).ok_or_else(|| field_err(k, "unknown field"))?;
            if found[i].replace(v).is_some() {
                return Err(field_err(k, "appears twice"));
            }
        }
        let get = |i: usize| found[i].ok_or(EnvelopeError::Missing(FIELDS[i]));
        let key: PublicKey = get(0)?.parse().map_err(|e: crate::KeyError| field_err("key", e.to_string()))?;
        let ts = get(1)?;
        if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(field_err("ts", "milliseconds since the Unix epoch"));
        }
        let ts_ms: u64 = ts.parse().map_err(|_| field_err("ts", "out of range"))?;
        let nonce = get(2)?;
        check_nonce(nonce)?;
        let audience: PublicKey = get(3)?.parse().map_err(|e: crate::KeyError| field_err("aud", e.to_string()))?;
        let body: Digest =
            get(4)?.parse().map_err(|e: tessera_core::digest::DigestError| field_err("body", e.to_string()))?;
        let sig = Signature::from_text(get(5)?).ok_or_else(|| field_err("sig", "base64url, at most 128 bytes"))?;
        Ok(Envelope { key, ts_ms, nonce: nonce.to_owned(), audience, body, sig })
    }
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The request carries no envelope and the policy asks for one.
    #[error("this request must be signed (header {HEADER})")]
    Missing,
    /// The envelope is malformed.
    #[error(transparent)]
    Malformed(#[from] EnvelopeError),
    /// The signer's key type is not accepted here.
    #[error("{0} keys are not accepted here")]
    KeyType(KeyType),
    /// The signer is not an account this server knows.
    #[error("unknown key {0}")]
    UnknownKey(String),
    /// Signed too long ago.
    #[error("the request was signed {age_ms} ms ago; the window is {window_ms} ms")]
    Stale {
        /// How long ago.
        age_ms: u64,
        /// The window.
        window_ms: u64,
    },
    /// Signed in the future.
    #[error("the request is dated {ahead_ms} ms in the future; the window is {window_ms} ms")]
    Future {
        /// How far ahead.
        ahead_ms: u64,
        /// The window.
        window_ms: u64,
    },
    /// Addressed to another server.
    #[error("the request is addressed to {got}, not to this server ({expected})")]
    WrongAudience {
        /// This server.
        expected: String,
        /// The audience signed.
        got: String,
    },
    /// The body is not the one signed.
    #[error("the body does not match the signed digest")]
    BodyMismatch,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The nonce was seen within the window.
    #[error("replayed request: this nonce was already used")]
    Replayed,
    /// The replay cache is full (a flood of valid signatures).
    #[error("too many signed requests in the window; try again")]
    Busy,
}

/// Most nonces the in-memory cache remembers at once.
const MAX_NONCES: usize = 1_000_000;

/// Where a [`Verifier`] remembers the nonces it accepted, until their timestamps leave the
/// window. The default, [`MemoryReplayCache`], serves one process; servers that share work
/// (several hub processes over one database) share one cache, so a request replayed to
/// another process is refused too.
pub trait ReplayCache: Send + Sync {
    /// True when `key` used `nonce` in a request still remembered at `now_ms` (Unix ms).
    ///
    /// # Errors
    /// [`VerifyError::Busy`] when the cache cannot answer (its storage failed): the request
    /// is refused rather than let through unchecked.
    fn seen(&self, key: &PublicKey, nonce: &str, now_ms: u64) -> Result<bool, VerifyError>;

    /// Remembers `nonce` of `key` until `expires_ms` (Unix ms), atomically with checking it
    /// is not remembered already at `now_ms`.
    ///
    /// # Errors
    /// [`VerifyError::Replayed`] when it is; [`VerifyError::Busy`] when the cache is full or
    /// its storage failed.
    fn remember(&self, key: &PublicKey, nonce: &str, expires_ms: u64, now_ms: u64) -> Result<(), VerifyError>;
}

/// A [`ReplayCache`] in this process's memory: at most 1,000,000 nonces (expired ones are
/// dropped when it is half full; past the bound, requests are refused with
/// [`VerifyError::Busy`]).
#[derive(Debug, Default)]
pub struct MemoryReplayCache {
    seen: Mutex<HashMap<(PublicKey, String), u64>>,
}

impl ReplayCache for MemoryReplayCache {
    fn seen(&self, key: &PublicKey, nonce: &str, now_ms: u64) -> Result<bool, VerifyError> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        Ok(seen.get(&(key.clone(), nonce.to_owned())).is_some_and(|expires| *expires >= now_ms))
    }

    fn remember(&self, key: &PublicKey, nonce: &str, expires_ms: u64, now_ms: u64) -> Result<(), VerifyError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_NONCES / 2 {
            seen.retain(|_, expires| *expires >= now_ms);
            if seen.len() >= MAX_NONCES {
                return Err(VerifyError::Busy);
            }
        }
        let slot = (key.clone(), nonce.to_owned());
        match seen.get(&slot) {
            Some(expires) if *expires >= now_ms => return Err(VerifyError::Replayed),
            _ => {}
        }
        seen.insert(slot, expires_ms);
        Ok(())
    }
}

/// Checks envelopes for one server.
pub struct Verifier {
    audience: PublicKey,
    window_ms: u64,
    replay_check: bool,
    key_types: Vec<KeyType>,
    known: Option<HashSet<PublicKey>>,
    seen: Arc<dyn ReplayCache>,
}

impl Verifier {
    /// A verifier for the server whose key is `audience`, with a 60 s window and both key
    /// types accepted.
    pub fn new(audience: PublicKey) -> Self {
        Verifier {
            audience,
            window_ms: 60_000,
            replay_check: true,
            key_types: vec![KeyType::Ed25519, KeyType::Secp256k1],
            known: None,
            seen: Arc::new(MemoryReplayCache::default()),
        }
    }

    /// Remembers nonces in `cache` instead of this process's memory.
    pub fn with_replay_cache(mut self, cache: Arc<dyn ReplayCache>) -> Self {
        self.seen = cache;
        self
    }

    /// Sets the window (either side of this server's clock).
    pub fn with_window_ms(mut self, window_ms: u64) -> Self {
        self.window_ms = window_ms;
        self
    }

    /// Turns the nonce check off, for messages whose redelivery is expected and harmless
    /// (tasks on an at-least-once bus, which nodes answer once by task id).
    pub fn without_replay_check(mut self) -> Self {
        self.replay_check = false;
        self
    }

    /// Accepts only these key types.
    pub fn with_key_types(mut self, types: &[KeyType]) -> Self {
        self.key_types = types.to_vec();
        self
    }

    /// Accepts only these accounts.
    pub fn with_known_keys(mut self, keys: impl IntoIterator<Item = PublicKey>) -> Self {
        self.known = Some(keys.into_iter().collect());
        self
    }

    /// The server's key.
    pub fn audience(&self) -> &PublicKey {
        &self.audience
    }

    /// Checks a request: returns the signer. `now_ms` is this server's clock.
    pub fn verify(
        &self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<PublicKey, VerifyError> {
        let env = Envelope::parse(header.ok_or(VerifyError::Missing)?)?;
        self.verify_envelope(&env, method, path, &Digest::of(body), now_ms)
    }

    /// Checks a parsed envelope against a body digest.
    pub fn verify_envelope(
        &self,
        env: &Envelope,
        method: &str,
        path: &str,
        body: &Digest,
        now_ms: u64,
    ) -> Result<PublicKey, VerifyError> {
        self.check_header(env, method, path, now_ms)?.finish(body, now_ms)
    }

    /// Checks everything an envelope says about a request but its body: key type, known
    /// accounts, window, audience and signature (over the body digest the envelope
    /// claims), and that its nonce was not used. A server calls this from the headers,
    /// before it reads a byte of the body, then [`Checked::finish`] with the digest of the
    /// body it received. Nothing is remembered until `finish` accepts the request, so a
    /// refused request never takes a place in the replay cache.
    ///
    /// Timestamps are compared with saturating arithmetic: no value of `ts` or `now_ms`
    /// can overflow.
    pub fn check_header<'v>(
        &'v self,
        env: &Envelope,
        method: &str,
        path: &str,
        now_ms: u64,
    ) -> Result<Checked<'v>, VerifyError> {
        if !self.key_types.contains(&env.key.key_type()) {
            return Err(VerifyError::KeyType(env.key.key_type()));
        }
        if let Some(known) = &self.known
            && !known.contains(&env.key)
        {
            return Err(VerifyError::UnknownKey(env.key.to_string()));
        }
        if env.ts_ms.saturating_add(self.window_ms) < now_ms {
            return Err(VerifyError::Stale { age_ms: now_ms.saturating_sub(env.ts_ms), window_ms: self.window_ms });
        }
        if env.ts_ms > now_ms.saturating_add(self.window_ms) {
            return Err(VerifyError::Future { ahead_ms: env.ts_ms.saturating_sub(now_ms), window_ms: self.window_ms });
        }
        if env.audience != self.audience {
            return Err(VerifyError::WrongAudience {
                expected: self.audience.to_string(),
                got: env.audience.to_string(),
            });
        }
        let bytes = signed_bytes(method, path, env.ts_ms, &env.nonce, &env.audience, &env.body, &env.key);
        env.key.verify(&bytes, &env.sig).map_err(|_| VerifyError::BadSignature)?;
        if self.replay_check && self.seen.seen(&env.key, &env.nonce, now_ms)? {
            return Err(VerifyError::Replayed);
        }
        Ok(Checked { verifier: self, key: env.key.clone(), nonce: env.nonce.clone(), ts_ms: env.ts_ms, body: env.body })
    }
}

/// A request whose envelope verified, waiting for its body (see [`Verifier::check_header`]).
#[derive(Debug)]
#[must_use = "a checked header is accepted only by `finish`"]
pub struct Checked<'v> {
    verifier: &'v Verifier,
    key: PublicKey,
    nonce: String,
    ts_ms: u64,
    body: Digest,
}

impl Checked<'_> {
    /// The signer (not yet accepted: the body is still to be checked).
    pub fn signer(&self) -> &PublicKey {
        &self.key
    }

    /// The body digest the signer signed.
    pub fn body(&self) -> &Digest {
        &self.body
    }

    /// Accepts the request when `body` is the digest the signer signed and its nonce is
    /// still unused (checked again, atomically with remembering it): returns the signer.
    pub fn finish(self, body: &Digest, now_ms: u64) -> Result<PublicKey, VerifyError> {
        if &self.body != body {
            return Err(VerifyError::BodyMismatch);
        }
        let v = self.verifier;
        if !v.replay_check {
            return Ok(self.key);
        }
        // Only a valid signature may take a place in the replay cache. A nonce is remembered
        // until its timestamp leaves the window.
        v.seen.remember(&self.key, &self.nonce, self.ts_ms.saturating_add(v.window_ms), now_ms)?;
        Ok(self.key)
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("audience", &self.audience).field("window_ms", &self.window_ms).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_763_761_200_000;

    fn setup() -> (KeyPair, KeyPair, Verifier) {
        let server = KeyPair::generate(KeyType::Ed25519);
        let client = KeyPair::generate(KeyType::Ed25519);
        let v = Verifier::new(server.public().clone());
        (server, client, v)
    }

    #[test]
    fn a_signed_request_passes_once() {
        let (server, client, v) = setup();
        let env = Envelope::sign(&client, server.public(), "POST", "/api/v1/packages", b"body", NOW);
        let h = env.to_header();
        assert_eq!(Envelope::parse(&h).unwrap(), env);
        assert_eq!(v.verify(Some(&h), "POST", "/api/v1/packages", b"body", NOW + 10).unwrap(), *client.public());
        assert_eq!(v.verify(Some(&h), "POST", "/api/v1/packages", b"body", NOW + 20), Err(VerifyError::Replayed));
    }

    #[test]
    fn every_refusal() {
        let (server, client, v) = setup();
        let sign = |method: &str, path: &str, body: &[u8], ts: u64| {
            Envelope::sign(&client, server.public(), method, path, body, ts).to_header()
        };
        let p = "/api/v1/packages";
        assert_eq!(v.verify(None, "POST", p, b"b", NOW), Err(VerifyError::Missing));
        assert!(matches!(
            v.verify(Some(&sign("POST", p, b"b", NOW - 61_000)), "POST", p, b"b", NOW),
            Err(VerifyError::Stale { .. })
        ));
        assert!(matches!(
            v.verify(Some(&sign("POST", p, b"b", NOW + 61_000)), "POST", p, b"b", NOW),
            Err(VerifyError::Future { .. })
        ));
        assert_eq!(
            v.verify(Some(&sign("POST", p, b"b", NOW)), "POST", p, b"altered", NOW),
            Err(VerifyError::BodyMismatch)
        );
        assert_eq!(v.verify(Some(&sign("POST", p, b"b", NOW)), "DELETE", p, b"b", NOW), Err(VerifyError::BadSignature));
        assert_eq!(
            v.verify(Some(&sign("POST", p, b"b", NOW)), "POST", "/api/v1/models", b"b", NOW),
            Err(VerifyError::BadSignature)
        );
        let elsewhere = KeyPair::generate(KeyType::Ed25519);
        let h = Envelope::sign(&client, elsewhere.public(), "POST", p, b"b", NOW).to_header();
        assert!(matches!(v.verify(Some(&h), "POST", p, b"b", NOW), Err(VerifyError::WrongAudience { .. })));
        // A signature by another key under this key's name.
        let mut env = Envelope::sign(&elsewhere, server.public(), "POST", p, b"b", NOW);
        env.key = client.public().clone();
        assert_eq!(v.verify(Some(&env.to_header()), "POST", p, b"b", NOW), Err(VerifyError::BadSignature));
        // Key types and known accounts.
        let k1 = KeyPair::generate(KeyType::Secp256k1);
        let only_ed = Verifier::new(server.public().clone()).with_key_types(&[KeyType::Ed25519]);
        let h = Envelope::sign(&k1, server.public(), "POST", p, b"b", NOW).to_header();
        assert_eq!(only_ed.verify(Some(&h), "POST", p, b"b", NOW), Err(VerifyError::KeyType(KeyType::Secp256k1)));
        assert_eq!(v.verify(Some(&h), "POST", p, b"b", NOW).unwrap(), *k1.public(), "secp256k1 signatures verify");
        let known = Verifier::new(server.public().clone()).with_known_keys([k1.public().clone()]);
        assert!(matches!(
            known.verify(Some(&sign("POST", p, b"b", NOW)), "POST", p, b"b", NOW),
            Err(VerifyError::UnknownKey(_))
        ));
        // A refused request does not burn its nonce.
        let h = sign("POST", p, b"b", NOW);
        assert_eq!(v.verify(Some(&h), "POST", p, b"x", NOW), Err(VerifyError::BodyMismatch));
        assert!(v.verify(Some(&h), "POST", p, b"b", NOW).is_ok());
    }

    #[test]
    fn extreme_timestamps_are_refused_without_overflow() {
        let (server, client, v) = setup();
        let p = "/api/v1/packages";
        for (ts, now) in [(u64::MAX, NOW), (0, NOW), (0, u64::MAX), (NOW, 0), (u64::MAX, 0)] {
            let h = Envelope::sign(&client, server.public(), "POST", p, b"b", ts).to_header();
            let r = v.verify(Some(&h), "POST", p, b"b", now);
            assert!(matches!(r, Err(VerifyError::Stale { .. } | VerifyError::Future { .. })), "{ts} at {now}: {r:?}");
        }
        // At the very end of time, a request of that instant is accepted and remembered.
        let h = Envelope::sign(&client, server.public(), "POST", p, b"b", u64::MAX).to_header();
        assert!(v.verify(Some(&h), "POST", p, b"b", u64::MAX).is_ok());
        assert_eq!(v.verify(Some(&h), "POST", p, b"b", u64::MAX), Err(VerifyError::Replayed));
    }

    #[test]
    fn headers_are_checked_before_the_body_and_the_nonce_is_kept_only_on_success() {
        let (server, client, v) = setup();
        let p = "/api/v1/models/a/1.0.0";
        let env = Envelope::sign(&client, server.public(), "PUT", p, b"the body", NOW);
        // A bad signature is refused from the headers alone.
        assert_eq!(v.check_header(&env, "POST", p, NOW).unwrap_err(), VerifyError::BadSignature);
        let checked = v.check_header(&env, "PUT", p, NOW).unwrap();
        assert_eq!(checked.signer(), client.public());
        assert_eq!(checked.finish(&Digest::of(b"other body"), NOW), Err(VerifyError::BodyMismatch));
        // The refused body did not burn the nonce; the right one is accepted once.
        let checked = v.check_header(&env, "PUT", p, NOW).unwrap();
        let again = v.check_header(&env, "PUT", p, NOW).unwrap();
        assert_eq!(checked.finish(&Digest::of(b"the body"), NOW).unwrap(), *client.public());
        // Two uploads racing with one nonce: the second to finish is a replay.
        assert_eq!(again.finish(&Digest::of(b"the body"), NOW), Err(VerifyError::Replayed));
        assert_eq!(v.check_header(&env, "PUT", p, NOW).unwrap_err(), VerifyError::Replayed);
    }

    #[test]
    fn refuses_malformed_envelopes() {
        let (server, client, _) = setup();
        let good = Envelope::sign(&client, server.public(), "GET", "/", b"", NOW).to_header();
        // The good header with one field's value replaced.
        let with = |field: &str, value: &str| {
            good.split(';')
                .map(|part| match part.split_once('=') {
                    Some((k, _)) if k == field => format!("{k}={value}"),
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(";")
        };
        assert!(Envelope::parse(&with("nonce", "abcdefghijklmnop")).is_ok(), "the helper keeps the rest valid");
        let cases = [
            with("nonce", "short"),
            with("nonce", "with space and more chars"),
            with("nonce", &"n".repeat(65)),
            with("ts", ""),
            with("ts", "12a"),
            String::new(),
            "v2;key=x".into(),
            good.replace("v1;", ""),
            format!("{good};ts=1"),
            format!("{good};extra=1"),
            good.replace(";ts=", ";ts=-"),
            good.replace(";ts=", ";ts=99999999999999999999999"),
            good.replace(";body=b3:", ";body=sha:"),
            good.replace(";key=ed25519:", ";key=rsa:"),
            good.replace(";sig=", ";sig=!!"),
            good.replace(";aud=", ";aud=ed25519:AA"),
            good.split(";sig=").next().unwrap().to_string(),
            format!("{good}{}", ";x".repeat(2000)),
            "v1;;;;".into(),
            "v1;key".into(),
        ];
        for c in &cases {
            assert!(Envelope::parse(c).is_err(), "{c:?}");
        }
    }
}
