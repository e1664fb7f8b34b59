//! Identities for Tessera: who publishes, who calls, who runs what.
//!
//! - [`keys`]: key pairs (Ed25519 by default, secp256k1 with its Ethereum-style address),
//!   public keys written with their type (`ed25519:…`, `secp256k1:…`), signatures.
//! - [`envelope`]: the signature envelope a request carries (key, timestamp, nonce,
//!   audience, body digest, signature over method and path too) and the [`Verifier`]
//!   that checks it: window, replay cache, audience, body, signature.
//! - [`seal`]: private packages: a per-package key wrapped for each recipient
//!   (X25519 + HKDF-SHA256 + ChaCha20-Poly1305), so only recipients can read them.
//! - [`keystore`]: a user's keys on disk, private to the user (0600), optionally encrypted
//!   with a passphrase (Argon2id + ChaCha20-Poly1305).
//!
//! Apart from the keystore, nothing here does I/O; time comes in as an argument.

pub mod envelope;
pub mod keys;
pub mod keystore;
pub mod seal;

pub use envelope::{Envelope, EnvelopeError, Verifier, VerifyError};
pub use keys::{KeyError, KeyPair, KeyType, PublicKey, Signature};

/// Random bytes from the operating system.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source works");
    b
}

/// Base64url without padding, the encoding of keys and signatures.
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding.
pub(crate) fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()
}
