//! Key pairs, public keys and signatures.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::Signer as _;
use k256::ecdsa::signature::Verifier as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::Digest as _;
use zeroize::Zeroizing;

use crate::{b64, random, unb64};

/// The kinds of keys Tessera knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// Ed25519 (the default).
    Ed25519,
    /// ECDSA on secp256k1 (Ethereum-style accounts).
    Secp256k1,
}

impl KeyType {
    /// The name used in key strings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Ed25519 => "ed25519",
            KeyType::Secp256k1 => "secp256k1",
        }
    }
}

impl FromStr for KeyType {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "ed25519" => Ok(KeyType::Ed25519),
            "secp256k1" => Ok(KeyType::Secp256k1),
            other => Err(KeyError::UnknownType(other.chars().take(32).collect())),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key type is not one Tessera knows.
    #[error("unknown key type {0:?}; expected ed25519 or secp256k1")]
    UnknownType(String),
    /// The text is not `<type>:<base64url>`.
    #[error("malformed key {0:?}: expected <type>:<base64url>, e.g. ed25519:…")]
    Malformed(String),
    /// The bytes are not a valid key of the stated type.
    #[error("{0:?} is not a valid {1} key")]
    Invalid(String, KeyType),
    /// The signature is malformed for the key type.
    #[error("malformed {0} signature")]
    BadSignature(KeyType),
    /// The signature does not verify.
    #[error("the signature does not match the key and message")]
    Mismatch,
}

/// A public key, with its type.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey {
    ty: KeyType,
    bytes: Vec<u8>,
}

impl PublicKey {
    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.ty
    }

    /// The raw key bytes (32 for Ed25519, 33 compressed SEC1 for secp256k1).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Builds a key from its type and raw bytes, checking they are a valid key.
    pub fn from_parts(ty: KeyType, bytes: &[u8]) -> Result<Self, KeyError> {
        let invalid = || KeyError::Invalid(b64(bytes), ty);
        match ty {
            KeyType::Ed25519 => {
                let arr: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
                ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|_| invalid())?;
            }
            KeyType::Secp256k1 => {
                let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(bytes).map_err(|_| invalid())?;
                // Keep the compressed form so one key has one spelling.
                let compressed = vk.to_sec1_point(true);
                return Ok(PublicKey { ty, bytes: compressed.as_bytes().to_vec() });
            }
        }
        Ok(PublicKey { ty, bytes: bytes.to_vec() })
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        match self.ty {
            KeyType::Ed25519 => {
                let arr: [u8; 32] =
                    self.bytes[..].try_into().map_err(|_| KeyError::Invalid(b64(&self.bytes), self.ty))?;
                let vk = ed25519_dalek::VerifyingKey::from_bytes(&arr)
                    .map_err(|_| KeyError::Invalid(b64(&self.bytes), self.ty))?;
                let sig: [u8; 64] = signature.0[..].try_into().map_err(|_| KeyError::BadSignature(self.ty))?;
                vk.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig)).map_err(|_| KeyError::Mismatch)
            }
            KeyType::Secp256k1 => {
                let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(&self.bytes)
                    .map_err(|_| KeyError::Invalid(b64(&self.bytes), self.ty))?;
                let sig =
                    k256::ecdsa::Signature::from_slice(&signature.0).map_err(|_| KeyError::BadSignature(self.ty))?;
                vk.verify(message, &sig).map_err(|_| KeyError::Mismatch)
            }
        }
    }

    /// The Ethereum-style address of a secp256k1 key (`0x` and 20 bytes of hex): the last
    /// 20 bytes of the Keccak-256 of the uncompressed public key.
    pub fn eth_address(&self) -> Option<String> {
        if self.ty != KeyType::Secp256k1 {
            return None;
        }
        let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(&self.bytes).ok()?;
        let point = vk.to_sec1_point(false);
        let hash = sha3::Keccak256::digest(&point.as_bytes()[1..]);
        Some(format!("0x{}", hex(&hash[12..])))
    }

    /// A short form for people (`ed25519:AbCd…1234`), never for lookups.
    pub fn short(&self) -> String {
        let s = b64(&self.bytes);
        format!("{}:{}…{}", self.ty, &s[..6], &s[s.len() - 4..])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ty, b64(&self.bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        if s.len() > 128 {
            return Err(KeyError::Malformed(s.chars().take(40).collect()));
        }
        let (ty, rest) = s.split_once(':').ok_or_else(|| KeyError::Malformed(s.chars().take(40).collect()))?;
        let ty: KeyType = ty.parse()?;
        let bytes = unb64(rest).ok_or_else(|| KeyError::Malformed(s.chars().take(40).collect()))?;
        PublicKey::from_parts(ty, &bytes)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A signature (64 bytes for both key types: Ed25519, or secp256k1 r‖s with low s).
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub Vec<u8>);

impl Signature {
    /// Base64url text.
    pub fn to_text(&self) -> String {
        b64(&self.0)
    }
    /// From base64url text (at most 128 bytes).
    pub fn from_text(s: &str) -> Option<Self> {
        if s.len() > 200 {
            return None;
        }
        unb64(s).filter(|b| b.len() <= 128).map(Signature)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_text())
    }
}

/// A key pair. The secret is wiped from memory when dropped.
pub struct KeyPair {
    ty: KeyType,
    secret: Zeroizing<[u8; 32]>,
    public: PublicKey,
    signing: SigningKey,
}

/// The expanded signing key, kept so each signature does not redo the expansion.
enum SigningKey {
    Ed25519(Box<ed25519_dalek::SigningKey>),
    Secp256k1(Box<k256::ecdsa::SigningKey>),
}

impl KeyPair {
    /// A new random key pair.
    pub fn generate(ty: KeyType) -> Self {
        loop {
            let secret: [u8; 32] = random();
            // A secp256k1 secret must be below the group order; retry in the (rare) case not.
            if let Ok(k) = KeyPair::from_secret(ty, &secret) {
                return k;
            }
        }
    }

    /// A key pair from its 32 secret bytes.
    pub fn from_secret(ty: KeyType, secret: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = secret.try_into().map_err(|_| KeyError::Invalid("(secret)".into(), ty))?;
        let (public, signing) = match ty {
            KeyType::Ed25519 => {
                let sk = ed25519_dalek::SigningKey::from_bytes(&arr);
                (PublicKey { ty, bytes: sk.verifying_key().to_bytes().to_vec() }, SigningKey::Ed25519(Box::new(sk)))
            }
            KeyType::Secp256k1 => {
                let sk =
                    k256::ecdsa::SigningKey::from_slice(&arr).map_err(|_| KeyError::Invalid("(secret)".into(), ty))?;
                let public = PublicKey { ty, bytes: sk.verifying_key().to_sec1_point(true).as_bytes().to_vec() };
                (public, SigningKey::Secp256k1(Box::new(sk)))
            }
        };
        Ok(KeyPair { ty, secret: Zeroizing::new(arr), public, signing })
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.ty
    }

    /// The public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The 32 secret bytes (for the keystore).
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.secret
    }

    /// Signs a message.
    pub fn sign(&self, message: &[u8]) -> Signature {
        match &self.signing {
            SigningKey::Ed25519(sk) => Signature(sk.sign(message).to_bytes().to_vec()),
            SigningKey::Secp256k1(sk) => {
                let sig: k256::ecdsa::Signature = k256::ecdsa::signature::Signer::sign(sk.as_ref(), message);
                Signature(sig.to_bytes().to_vec())
            }
        }
    }

    /// The X25519 secret matching this key's public key (Ed25519 only), for unsealing.
    pub(crate) fn x25519_secret(&self) -> Option<x25519_dalek::StaticSecret> {
        match self.ty {
            KeyType::Ed25519 => {
                let sk = ed25519_dalek::SigningKey::from_bytes(&self.secret);
                Some(x25519_dalek::StaticSecret::from(sk.to_scalar_bytes()))
            }
            KeyType::Secp256k1 => None,
        }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({})", self.public)
    }
}

impl PublicKey {
    /// The X25519 public key matching this key (Ed25519 only), for sealing.
    pub(crate) fn x25519(&self) -> Option<x25519_dalek::PublicKey> {
        match self.ty {
            KeyType::Ed25519 => {
                let arr: [u8; 32] = self.bytes[..].try_into().ok()?;
                let vk = ed25519_dalek::VerifyingKey::from_bytes(&arr).ok()?;
                Some(x25519_dalek::PublicKey::from(vk.to_montgomery().to_bytes()))
            }
            KeyType::Secp256k1 => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_both_types() {
        for ty in [KeyType::Ed25519, KeyType::Secp256k1] {
            let k = KeyPair::generate(ty);
            let sig = k.sign(b"hello");
            k.public().verify(b"hello", &sig).unwrap();
            assert_eq!(k.public().verify(b"hellp", &sig), Err(KeyError::Mismatch));
            let other = KeyPair::generate(ty);
            assert_eq!(other.public().verify(b"hello", &sig), Err(KeyError::Mismatch));
            // Text round trip.
            let text = k.public().to_string();
            assert!(text.starts_with(&format!("{ty}:")));
            assert_eq!(text.parse::<PublicKey>().unwrap(), *k.public());
            // Same secret, same key.
            let again = KeyPair::from_secret(ty, k.secret_bytes()).unwrap();
            assert_eq!(again.public(), k.public());
        }
    }

    #[test]
    fn ethereum_address_matches_a_known_vector() {
        // Private key 1: its address is well known.
        let mut secret = [0u8; 32];
        secret[31] = 1;
        let k = KeyPair::from_secret(KeyType::Secp256k1, &secret).unwrap();
        assert_eq!(k.public().eth_address().unwrap(), "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
        assert!(KeyPair::generate(KeyType::Ed25519).public().eth_address().is_none());
    }

    #[test]
    fn refuses_malformed_keys_and_signatures() {
        for bad in [
            "",
            "ed25519",
            "rsa:AAAA",
            "ed25519:!!!",
            "ed25519:AAAA",
            "secp256k1:AAAA",
            &format!("ed25519:{}", "A".repeat(200)),
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
        assert!(matches!("rsa:AAAA".parse::<PublicKey>(), Err(KeyError::UnknownType(_))));
        // An Ed25519 key's bytes claimed as secp256k1: not a valid key of that type.
        let ed = KeyPair::generate(KeyType::Ed25519);
        let claimed = format!("secp256k1:{}", b64(ed.public().as_bytes()));
        assert!(matches!(claimed.parse::<PublicKey>(), Err(KeyError::Invalid(_, KeyType::Secp256k1))));
        // A secp256k1 signature against an Ed25519 key, and the other way round.
        let sk = KeyPair::generate(KeyType::Secp256k1);
        assert!(ed.public().verify(b"m", &sk.sign(b"m")).is_err());
        assert!(sk.public().verify(b"m", &ed.sign(b"m")).is_err());
        assert!(ed.public().verify(b"m", &Signature(vec![1, 2, 3])).is_err());
        assert!(Signature::from_text(&"A".repeat(500)).is_none());
    }
}
