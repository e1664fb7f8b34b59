//! Sealed (private) packages: readable only by their recipients.
//!
//! A random payload key encrypts the package with ChaCha20-Poly1305; for each recipient
//! the payload key is wrapped with a key derived (HKDF-SHA256) from an X25519 exchange
//! between a fresh ephemeral key and the recipient's key (an Ed25519 key's X25519 form).
//! The header (recipients and wrapped keys) is authenticated with the payload, so it
//! cannot be altered. Format: `TSEAL1\n`, a 4-byte big-endian header length, the JSON
//! header, the ciphertext.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyPair, PublicKey};
use crate::{b64, random, unb64};

const MAGIC: &[u8] = b"TSEAL1\n";
const MAX_HEADER: usize = 1 << 20;
const MAX_RECIPIENTS: usize = 1000;

/// Why sealing or unsealing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed package.
    #[error("not a sealed package: {0}")]
    Malformed(String),
    /// A recipient key cannot receive sealed packages.
    #[error("{0} cannot receive sealed packages (only ed25519 keys can)")]
    Recipient(String),
    /// This key is not among the recipients.
    #[error("this key ({0}) is not a recipient of the package")]
    NotARecipient(String),
    /// Decryption failed: altered or wrong key.
    #[error("the sealed package does not decrypt: it was altered, or the key is wrong")]
    Decrypt,
}

#[derive(Serialize, Deserialize)]
struct Header {
    recipients: Vec<Wrapped>,
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Wrapped {
    key: PublicKey,
    epk: String,
    wrapped: String,
}

/// True when the bytes start like a sealed package.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn wrap_key(shared: &[u8; 32], epk: &[u8; 32], rpk: &[u8; 32]) -> [u8; 32] {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(epk);
    salt[32..].copy_from_slice(rpk);
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), shared);
    let mut out = [0u8; 32];
    hk.expand(b"tessera-seal-v1", &mut out).expect("32 bytes is a valid HKDF length");
    out
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new_from_slice(key).expect("32-byte key")
}

/// Seals `plaintext` for `recipients`.
pub fn seal(plaintext: &[u8], recipients: &[PublicKey]) -> Result<Vec<u8>, SealError> {
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return Err(SealError::Malformed(format!("between 1 and {MAX_RECIPIENTS} recipients")));
    }
    let payload_key: [u8; 32] = random();
    let mut wrapped = Vec::new();
    for r in recipients {
        let rpk = r.x25519().ok_or_else(|| SealError::Recipient(r.to_string()))?;
        let eph = x25519_dalek::StaticSecret::from(random::<32>());
        let epk = x25519_dalek::PublicKey::from(&eph);
        let shared = eph.diffie_hellman(&rpk);
        let wk = wrap_key(shared.as_bytes(), epk.as_bytes(), rpk.as_bytes());
        let ct = cipher(&wk).encrypt(&[0u8; 12].into(), &payload_key[..]).map_err(|_| SealError::Decrypt)?;
        wrapped.push(Wrapped { key: r.clone(), epk: b64(epk.as_bytes()), wrapped: b64(&ct) });
    }
    let nonce: [u8; 12] = random();
    let header = serde_json::to_vec(&Header { recipients: wrapped, nonce: b64(&nonce) }).expect("serialisable");
    let ct = cipher(&payload_key)
        .encrypt(&nonce.into(), Payload { msg: plaintext, aad: &header })
        .map_err(|_| SealError::Decrypt)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + ct.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn split(sealed: &[u8]) -> Result<(Header, &[u8], &[u8]), SealError> {
    let bad = |m: &str| SealError::Malformed(m.into());
    let rest = sealed.strip_prefix(MAGIC).ok_or_else(|| bad("missing magic"))?;
    let len_bytes: [u8; 4] = rest.get(..4).ok_or_else(|| bad("truncated"))?.try_into().map_err(|_| bad("truncated"))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_HEADER {
        return Err(bad("header too large"));
    }
    let header_bytes = rest.get(4..4 + len).ok_or_else(|| bad("truncated header"))?;
    let header: Header = serde_json::from_slice(header_bytes).map_err(|e| SealError::Malformed(e.to_string()))?;
    if header.recipients.is_empty() || header.recipients.len() > MAX_RECIPIENTS {
        return Err(bad("bad recipient count"));
    }
    Ok((header, header_bytes, &rest[4 + len..]))
}

/// The recipients of a sealed package.
pub fn recipients(sealed: &[u8]) -> Result<Vec<PublicKey>, SealError> {
    Ok(split(sealed)?.0.recipients.into_iter().map(|w| w.key).collect())
}

/// Opens a sealed package with one of its recipients' keys.
pub fn unseal(sealed: &[u8], key: &KeyPair) -> Result<Vec<u8>, SealError> {
    let (header, header_bytes, ct) = split(sealed)?;
    let me = header
        .recipients
        .iter()
        .find(|w| &w.key == key.public())
        .ok_or_else(|| SealError::NotARecipient(key.public().to_string()))?;
    let secret = key.x25519_secret().ok_or_else(|| SealError::Recipient(key.public().to_string()))?;
    let epk: [u8; 32] =
        unb64(&me.epk).and_then(|b| b.try_into().ok()).ok_or_else(|| SealError::Malformed("epk".into()))?;
    let epk = x25519_dalek::PublicKey::from(epk);
    let rpk = x25519_dalek::PublicKey::from(&secret);
    let shared = secret.diffie_hellman(&epk);
    let wk = wrap_key(shared.as_bytes(), epk.as_bytes(), rpk.as_bytes());
    let wrapped = unb64(&me.wrapped).ok_or_else(|| SealError::Malformed("wrapped key".into()))?;
    let payload_key = cipher(&wk).decrypt(&[0u8; 12].into(), &wrapped[..]).map_err(|_| SealError::Decrypt)?;
    let payload_key: [u8; 32] = payload_key.try_into().map_err(|_| SealError::Decrypt)?;
    let nonce: [u8; 12] =
        unb64(&header.nonce).and_then(|b| b.try_into().ok()).ok_or_else(|| SealError::Malformed("nonce".into()))?;
    cipher(&payload_key).decrypt(&nonce.into(), Payload { msg: ct, aad: header_bytes }).map_err(|_| SealError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyType;

    #[test]
    fn only_recipients_open_it() {
        let a = KeyPair::generate(KeyType::Ed25519);
        let b = KeyPair::generate(KeyType::Ed25519);
        let c = KeyPair::generate(KeyType::Ed25519);
        let sealed = seal(b"secret module", &[a.public().clone(), b.public().clone()]).unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(13).any(|w| w == b"secret module"), "ciphertext only");
        assert_eq!(unseal(&sealed, &a).unwrap(), b"secret module");
        assert_eq!(unseal(&sealed, &b).unwrap(), b"secret module");
        assert!(matches!(unseal(&sealed, &c), Err(SealError::NotARecipient(_))));
        assert_eq!(recipients(&sealed).unwrap(), vec![a.public().clone(), b.public().clone()]);
    }

    #[test]
    fn tampering_is_detected() {
        let a = KeyPair::generate(KeyType::Ed25519);
        let c = KeyPair::generate(KeyType::Ed25519);
        let sealed = seal(b"secret module", &[a.public().clone()]).unwrap();
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(unseal(&flipped, &a), Err(SealError::Decrypt));
        // Adding oneself to the recipient list breaks the header's authentication.
        let text = String::from_utf8_lossy(&sealed).replace(&a.public().to_string(), &c.public().to_string());
        assert!(unseal(text.as_bytes(), &c).is_err());
        for bad in [&b""[..], b"TSEAL1\n", b"TSEAL1\n\xff\xff\xff\xff", b"PK\x03\x04"] {
            assert!(matches!(unseal(bad, &a), Err(SealError::Malformed(_))), "{bad:?}");
        }
        let secp = KeyPair::generate(KeyType::Secp256k1);
        assert!(matches!(seal(b"x", &[secp.public().clone()]), Err(SealError::Recipient(_))));
        assert!(seal(b"x", &[]).is_err());
    }
}
