//! The node's package cache: packages fetched by digest, verified, unpacked once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tessera_core::Digest;
use tessera_core::manifest::MANIFEST_FILE;
use tessera_identity::KeyPair;
use tessera_package::{Limits, UnpackError, unpack, verify};
use tessera_ports::{ModuleImage, PackageSource, SourceError};

/// Why a package could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The source did not have it.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The bytes were refused (digest mismatch, hostile archive, bad manifest).
    #[error(transparent)]
    Package(#[from] UnpackError),
    /// A private package could not be opened.
    #[error("private package: {0}")]
    Sealed(String),
    /// The cache directory failed.
    #[error("package cache at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Packages by digest under `<dir>/<hex>/`. A package enters the cache only after its bytes
/// matched the digest asked for and unpacked cleanly; it is immutable afterwards.
pub struct PackageCache {
    dir: PathBuf,
    limits: Limits,
    locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Images already read, so a task does not read and parse the manifest again (the
    /// packages are immutable once cached).
    images: Mutex<HashMap<Digest, ModuleImage>>,
}

/// Most images kept in memory; past it the memory starts afresh.
const MAX_IMAGES: usize = 1024;

impl PackageCache {
    /// A cache rooted at `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>, limits: Limits) -> Result<Self, CacheError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io { path: dir.clone(), source })?;
        Ok(PackageCache { dir, limits, locks: Mutex::new(HashMap::new()), images: Mutex::new(HashMap::new()) })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_for(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(*digest).or_default().clone()
    }

    /// Returns the unpacked package, fetching and verifying it first if needed. A sealed
    /// (private) package is opened with `key`, which must be one of its recipients.
    pub async fn get(
        &self,
        digest: &Digest,
        source: &dyn PackageSource,
        key: Option<&KeyPair>,
    ) -> Result<ModuleImage, CacheError> {
        if let Some(image) = self.images.lock().unwrap_or_else(|p| p.into_inner()).get(digest) {
            return Ok(image.clone());
        }
        let image = self.load(digest, source, key).await?;
        let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        if images.len() >= MAX_IMAGES {
            images.clear();
        }
        images.insert(*digest, image.clone());
        Ok(image)
    }

    async fn load(
        &self,
        digest: &Digest,
        source: &dyn PackageSource,
        key: Option<&KeyPair>,
    ) -> Result<ModuleImage, CacheError> {
        let lock = self.lock_for(digest);
        let _guard = lock.lock().await;
        let root = self.dir.join(digest.hex());
        if let Some(image) = Self::cached(digest, &root).await? {
            return Ok(image);
        }
        let bytes = source.fetch(digest).await?;
        verify(&bytes, digest)?;
        let bytes = if tessera_identity::seal::is_sealed(&bytes) {
            let key =
                key.ok_or_else(|| CacheError::Sealed("the package is private and this node has no key".into()))?;
            bytes::Bytes::from(
                tessera_identity::seal::unseal(&bytes, key).map_err(|e| CacheError::Sealed(e.to_string()))?,
            )
        } else {
            bytes
        };
        let limits = self.limits.clone();
        let dest = root.clone();
        let unpacked = tokio::task::spawn_blocking(move || unpack(&bytes, &dest, &limits))
            .await
            .map_err(|e| CacheError::Io { path: root.clone(), source: std::io::Error::other(e.to_string()) })?;
        match unpacked {
            Ok(info) => {
                tracing::info!(digest = %digest, module = %info.manifest.name, version = %info.manifest.version, "package cached");
                Ok(ModuleImage { digest: *digest, manifest: info.manifest, root })
            }
            // Another process sharing this cache unpacked the same package meanwhile.
            Err(UnpackError::Io { .. }) if root.join(MANIFEST_FILE).exists() => {
                Self::cached(digest, &root).await?.ok_or_else(|| CacheError::Io {
                    path: root.clone(),
                    source: std::io::Error::other("the package vanished from the cache"),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn cached(digest: &Digest, root: &Path) -> Result<Option<ModuleImage>, CacheError> {
        let path = root.join(MANIFEST_FILE);
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        let manifest = tessera_core::Manifest::parse(&text).map_err(UnpackError::from)?;
        Ok(Some(ModuleImage { digest: *digest, manifest, root: root.to_owned() }))
    }
}
