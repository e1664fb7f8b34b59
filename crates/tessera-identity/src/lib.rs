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
pub mod messages;
pub mod seal;
pub mod secagg;
pub mod shamir;

pub use envelope::{Envelope, EnvelopeError, MemoryReplayCache, ReplayCache, Verifier, VerifyError};
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

/// A publisher's signature over a package digest, as the hub records it and nodes check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageSignature {
    /// The publisher.
    pub key: PublicKey,
    /// Its signature over [`package_message`].
    pub sig: Signature,
}

/// The header carrying a package signature on publish: `<key>;<signature>`.
pub const PACKAGE_SIGNATURE_HEADER: &str = "x-tessera-package-signature";

/// The bytes a package signature covers.
pub fn package_message(digest: &tessera_core::Digest) -> Vec<u8> {
    format!("tessera-package-v1\n{digest}").into_bytes()
}

impl PackageSignature {
    /// Signs a package digest.
    pub fn sign(key: &KeyPair, digest: &tessera_core::Digest) -> Self {
        PackageSignature { key: key.public().clone(), sig: key.sign(&package_message(digest)) }
    }

    /// Checks the signature over `digest`.
    pub fn verify(&self, digest: &tessera_core::Digest) -> Result<(), KeyError> {
        self.key.verify(&package_message(digest), &self.sig)
    }

    /// `<key>;<signature>`.
    pub fn to_header(&self) -> String {
        format!("{};{}", self.key, self.sig.to_text())
    }

    /// Reads `<key>;<signature>`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        if s.len() > 512 {
            return Err(KeyError::Malformed(s.chars().take(40).collect()));
        }
        let (k, sig) = s.split_once(';').ok_or_else(|| KeyError::Malformed(s.chars().take(40).collect()))?;
        let key: PublicKey = k.parse()?;
        let sig = Signature::from_text(sig).ok_or(KeyError::BadSignature(key.key_type()))?;
        Ok(PackageSignature { key, sig })
    }
}

/// Milliseconds since the Unix epoch, from the system clock (for callers that sign or
/// verify now).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_signatures() {
        let k = KeyPair::generate(KeyType::Ed25519);
        let d = tessera_core::Digest::of(b"package");
        let s = PackageSignature::sign(&k, &d);
        s.verify(&d).unwrap();
        assert!(s.verify(&tessera_core::Digest::of(b"other")).is_err());
        assert_eq!(PackageSignature::parse(&s.to_header()).unwrap(), s);
        for bad in ["", ";", "ed25519:AAAA;sig", &format!("{};!!", k.public()), &"x".repeat(600)] {
            assert!(PackageSignature::parse(bad).is_err(), "{bad:?}");
        }
    }
}
