//! A user's keys on disk: one JSON file per key in a directory only the user can read
//! (0700, files 0600), the secret in the clear or encrypted with a passphrase
//! (Argon2id, then ChaCha20-Poly1305).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use serde::{Deserialize, Serialize};
use tessera_core::name::check_ident;
use zeroize::Zeroizing;

use crate::keys::{KeyPair, KeyType, PublicKey};
use crate::{b64, random, unb64};

/// Why a keystore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// File-system failure.
    #[error("keystore {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No key of that name.
    #[error("no key named {0:?} (tessera key list shows the keys; tessera key new makes one)")]
    NotFound(String),
    /// A key of that name exists.
    #[error("a key named {0:?} exists already")]
    Exists(String),
    /// The name is not an identifier.
    #[error("invalid key name: {0}")]
    Name(String),
    /// The file is readable by others.
    #[error("{0} is readable by other users; run chmod 600 on it")]
    Permissions(PathBuf),
    /// The key is encrypted and no (or a wrong) passphrase was given.
    #[error("key {0:?} is encrypted: a wrong or missing passphrase (set TESSERA_PASSPHRASE or answer the prompt)")]
    Passphrase(String),
    /// The file is not a key file.
    #[error("{path} is not a valid key file: {why}")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    name: String,
    #[serde(rename = "type")]
    ty: KeyType,
    public: PublicKey,
    secret: Secret,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Secret {
    Plain { key: String },
    Encrypted { kdf: String, m: u32, t: u32, p: u32, salt: String, nonce: String, ciphertext: String },
}

/// What the keystore says about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its name.
    pub name: String,
    /// Its public key.
    pub public: PublicKey,
    /// True when the secret is encrypted with a passphrase.
    pub encrypted: bool,
}

/// Keys in a directory.
pub struct Keystore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeystoreError + '_ {
    move |source| KeystoreError::Io { path: path.to_owned(), source }
}

fn derive(passphrase: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>, String> {
    // Bounds, so a hostile key file cannot ask for absurd work.
    if m > (1 << 20) || t > 64 || p > 16 {
        return Err("key derivation parameters out of range".into());
    }
    let params = argon2::Params::new(m, t, p, Some(32)).map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase.as_bytes(), salt, &mut out[..]).map_err(|e| e.to_string())?;
    Ok(out)
}

impl Keystore {
    /// Opens (creating, private to the user) a keystore directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeystoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        }
        Ok(Keystore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, KeystoreError> {
        check_ident("key name", name).map_err(|e| KeystoreError::Name(e.to_string()))?;
        Ok(self.dir.join(format!("{name}.json")))
    }

    /// Makes a new key.
    pub fn create(&self, name: &str, ty: KeyType, passphrase: Option<&str>) -> Result<KeyInfo, KeystoreError> {
        let pair = KeyPair::generate(ty);
        self.store(name, &pair, passphrase)
    }

    /// Stores an existing key pair under `name`.
    pub fn store(&self, name: &str, pair: &KeyPair, passphrase: Option<&str>) -> Result<KeyInfo, KeystoreError> {
        let path = self.path(name)?;
        let secret = match passphrase {
            None => Secret::Plain { key: b64(pair.secret_bytes()) },
            Some(pw) => {
                let salt: [u8; 16] = random();
                let nonce: [u8; 12] = random();
                let (m, t, p) =
                    (argon2::Params::DEFAULT_M_COST, argon2::Params::DEFAULT_T_COST, argon2::Params::DEFAULT_P_COST);
                let k = derive(pw, &salt, m, t, p).map_err(|why| KeystoreError::Corrupt { path: path.clone(), why })?;
                let aad = pair.public().to_string();
                let ct = ChaCha20Poly1305::new_from_slice(&k[..])
                    .expect("32-byte key")
                    .encrypt(&nonce.into(), Payload { msg: &pair.secret_bytes()[..], aad: aad.as_bytes() })
                    .map_err(|_| KeystoreError::Corrupt { path: path.clone(), why: "encryption failed".into() })?;
                Secret::Encrypted {
                    kdf: "argon2id".into(),
                    m,
                    t,
                    p,
                    salt: b64(&salt),
                    nonce: b64(&nonce),
                    ciphertext: b64(&ct),
                }
            }
        };
        let encrypted = matches!(secret, Secret::Encrypted { .. });
        let file =
            KeyFile { version: 1, name: name.to_owned(), ty: pair.key_type(), public: pair.public().clone(), secret };
        let json = serde_json::to_vec_pretty(&file).expect("serialisable");
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = match opts.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeystoreError::Exists(name.to_owned()));
            }
            Err(e) => return Err(KeystoreError::Io { path, source: e }),
        };
        f.write_all(&json).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        Ok(KeyInfo { name: name.to_owned(), public: pair.public().clone(), encrypted })
    }

    fn read(&self, name: &str) -> Result<(PathBuf, KeyFile), KeystoreError> {
        let path = self.path(name)?;
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeystoreError::NotFound(name.to_owned())),
            Err(e) => return Err(KeystoreError::Io { path, source: e }),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(KeystoreError::Permissions(path));
            }
        }
        if meta.len() > 64 * 1024 {
            return Err(KeystoreError::Corrupt { path, why: "larger than 64 KiB".into() });
        }
        let bytes = fs::read(&path).map_err(io(&path))?;
        let file: KeyFile = serde_json::from_slice(&bytes)
            .map_err(|e| KeystoreError::Corrupt { path: path.clone(), why: e.to_string() })?;
        Ok((path, file))
    }

    /// A key's public information.
    pub fn info(&self, name: &str) -> Result<KeyInfo, KeystoreError> {
        let (_, f) = self.read(name)?;
        Ok(KeyInfo { name: f.name, public: f.public, encrypted: matches!(f.secret, Secret::Encrypted { .. }) })
    }

    /// Every key, by name.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeystoreError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                out.push(self.info(stem)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Loads a key pair (the passphrase is needed when the key is encrypted).
    pub fn load(&self, name: &str, passphrase: Option<&str>) -> Result<KeyPair, KeystoreError> {
        let (path, f) = self.read(name)?;
        let corrupt = |why: &str| KeystoreError::Corrupt { path: path.clone(), why: why.into() };
        let secret = match &f.secret {
            Secret::Plain { key } => Zeroizing::new(unb64(key).ok_or_else(|| corrupt("secret is not base64url"))?),
            Secret::Encrypted { kdf, m, t, p, salt, nonce, ciphertext } => {
                if kdf != "argon2id" {
                    return Err(corrupt("unknown key derivation"));
                }
                let pw = passphrase.ok_or_else(|| KeystoreError::Passphrase(name.to_owned()))?;
                let salt = unb64(salt).ok_or_else(|| corrupt("salt"))?;
                let nonce: [u8; 12] = unb64(nonce).and_then(|n| n.try_into().ok()).ok_or_else(|| corrupt("nonce"))?;
                let ct = unb64(ciphertext).ok_or_else(|| corrupt("ciphertext"))?;
                let k =
                    derive(pw, &salt, *m, *t, *p).map_err(|why| KeystoreError::Corrupt { path: path.clone(), why })?;
                let aad = f.public.to_string();
                Zeroizing::new(
                    ChaCha20Poly1305::new_from_slice(&k[..])
                        .expect("32-byte key")
                        .decrypt(&nonce.into(), Payload { msg: &ct, aad: aad.as_bytes() })
                        .map_err(|_| KeystoreError::Passphrase(name.to_owned()))?,
                )
            }
        };
        let pair = KeyPair::from_secret(f.ty, &secret).map_err(|e| corrupt(&e.to_string()))?;
        if pair.public() != &f.public {
            return Err(corrupt("the secret does not match the public key"));
        }
        Ok(pair)
    }

    /// Whether a key is encrypted.
    pub fn is_encrypted(&self, name: &str) -> Result<bool, KeystoreError> {
        Ok(self.info(name)?.encrypted)
    }
}

/// A secret key as text for moving between machines: `tessera-secret:<type>:<base64url>`.
pub fn export_secret(pair: &KeyPair) -> Zeroizing<String> {
    Zeroizing::new(format!("tessera-secret:{}:{}", pair.key_type(), b64(pair.secret_bytes())))
}

/// Reads a secret exported by [`export_secret`].
pub fn import_secret(text: &str) -> Result<KeyPair, String> {
    let rest = text.trim().strip_prefix("tessera-secret:").ok_or("expected tessera-secret:<type>:<base64url>")?;
    let (ty, b) = rest.split_once(':').ok_or("expected tessera-secret:<type>:<base64url>")?;
    let ty: KeyType = ty.parse().map_err(|e: crate::KeyError| e.to_string())?;
    let bytes = Zeroizing::new(unb64(b).ok_or("the secret is not base64url")?);
    KeyPair::from_secret(ty, &bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_list() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("keys")).unwrap();
        let a = ks.create("alice", KeyType::Ed25519, None).unwrap();
        let b = ks.create("bob", KeyType::Secp256k1, Some("correct horse")).unwrap();
        assert!(!a.encrypted && b.encrypted);
        assert_eq!(ks.load("alice", None).unwrap().public(), &a.public);
        assert_eq!(ks.load("bob", Some("correct horse")).unwrap().public(), &b.public);
        assert!(matches!(ks.load("bob", None), Err(KeystoreError::Passphrase(_))));
        assert!(matches!(ks.load("bob", Some("wrong")), Err(KeystoreError::Passphrase(_))));
        assert!(matches!(ks.create("alice", KeyType::Ed25519, None), Err(KeystoreError::Exists(_))));
        assert!(matches!(ks.load("carol", None), Err(KeystoreError::NotFound(_))));
        assert!(matches!(ks.create("../x", KeyType::Ed25519, None), Err(KeystoreError::Name(_))));
        let names: Vec<String> = ks.list().unwrap().into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["alice", "bob"]);
        // The encrypted file holds no secret in the clear.
        let text = std::fs::read_to_string(ks.dir().join("bob.json")).unwrap();
        let secret = b64(ks.load("bob", Some("correct horse")).unwrap().secret_bytes());
        assert!(!text.contains(&secret));
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("keys")).unwrap();
        ks.create("alice", KeyType::Ed25519, None).unwrap();
        let f = ks.dir().join("alice.json");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(ks.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(ks.load("alice", None), Err(KeystoreError::Permissions(_))));
    }

    #[test]
    fn export_import_and_hostile_files() {
        let k = KeyPair::generate(KeyType::Secp256k1);
        let text = export_secret(&k);
        assert_eq!(import_secret(&text).unwrap().public(), k.public());
        for bad in [
            "",
            "tessera-secret:",
            "tessera-secret:rsa:AAAA",
            "tessera-secret:ed25519:!!",
            "tessera-secret:ed25519:AAAA",
        ] {
            assert!(import_secret(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("keys")).unwrap();
        ks.create("x", KeyType::Ed25519, Some("pw")).unwrap();
        let path = ks.dir().join("x.json");
        let text = std::fs::read_to_string(&path).unwrap();
        // Absurd key-derivation cost, and a secret swapped for another key's.
        let hostile = text.replace("\"m\": 19456", "\"m\": 4000000000");
        std::fs::write(&path, hostile).unwrap();
        assert!(matches!(ks.load("x", Some("pw")), Err(KeystoreError::Corrupt { .. })));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(ks.load("x", Some("pw")), Err(KeystoreError::Corrupt { .. })));
    }
}
