//! Where packages come from: the hub, in the same process or over HTTP.

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::registry::PackageRecord;
use tessera_core::{Digest, PackageRef};

/// Why a package could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// No such package, version, alias or digest.
    #[error("not found: {0}")]
    NotFound(String),
    /// The source failed (network, storage).
    #[error("package source: {0}")]
    Backend(String),
}

/// A source of packages.
#[async_trait]
pub trait PackageSource: Send + Sync + 'static {
    /// Resolves a reference to a published package.
    async fn resolve(&self, reference: &PackageRef) -> Result<PackageRecord, SourceError>;
    /// The package bytes by digest (the caller verifies them).
    async fn fetch(&self, digest: &Digest) -> Result<Bytes, SourceError>;
}
