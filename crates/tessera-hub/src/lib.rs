//! Tessera's hub: where packages and models are published, found and fetched.
//!
//! [`HubStore`] keeps metadata in SQLite (the default) or PostgreSQL ([`Database`]) and
//! bytes in a content-addressed directory;
//! [`app`] is its REST API as an axum `Router` (a function, so tests call it without a
//! socket), with an OpenAPI document at `/openapi.json` and an interactive docs page at
//! `/docs` that works offline. [`LocalHub`] serves packages to nodes in the same process.
//!
//! Versions are immutable: publishing other bytes under an existing version is refused
//! with 409 and changes nothing. Uploads are streamed to disk, hashed on the way, and
//! checked (digest, archive safety, manifest) before anything is recorded.
//!
//! This crate knows HTTP (axum), SQLite and PostgreSQL; it does not know nodes, sessions
//! or NATS. The `testing` feature starts a private PostgreSQL server for tests and edits
//! dumps (tampered ones, for restore tests).

mod api;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

pub use api::{
    ApiError, AppState, BeginUpload, ComponentDocument, ComponentInfo, CreateModel, DEFAULT_MAX_MODEL_BYTES,
    DIGEST_HEADER, HubPolicy, MANIFEST_HEADER, ModelMeta, OFFSET_HEADER, PACKAGE_HEADER, SIGNATURE_SCHEME,
    UPLOAD_PARAM, answer_panic, app, openapi,
};
pub use store::{
    Collection, ComponentNeeds, ComponentRecord, Database, Download, DumpSummary, Filters, GrantRecord, HubError,
    HubStore, ListQuery, ModelUpload, ObjectUpload, OpenChecks, PublishCheck, Published, Revision, ShareBlob,
    SharedDownload, SharedRestore, UploadRecord, UsageRecord,
};

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::registry::PackageRecord;
use tessera_core::{Digest, PackageRef};
use tessera_ports::{PackageSource, SourceError};

/// The hub as a package source for nodes in the same process.
#[derive(Clone)]
pub struct LocalHub(pub Arc<HubStore>);

fn source_err(e: HubError) -> SourceError {
    match e {
        HubError::NotFound(m) => SourceError::NotFound(m),
        other => SourceError::Backend(other.to_string()),
    }
}

#[async_trait]
impl PackageSource for LocalHub {
    async fn resolve(&self, reference: &PackageRef) -> Result<PackageRecord, SourceError> {
        let store = self.0.clone();
        let reference = reference.clone();
        tokio::task::spawn_blocking(move || match &reference {
            PackageRef::Named { name, selector } => store.resolve(name.as_str(), selector),
            PackageRef::Digest(d) => store.by_digest(d),
            PackageRef::Component { collection, id } => store.component_package(*collection, id),
        })
        .await
        .map_err(|e| SourceError::Backend(e.to_string()))?
        .map_err(source_err)
    }

    async fn fetch(&self, digest: &Digest) -> Result<Bytes, SourceError> {
        let store = self.0.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || store.blob_bytes(&digest))
            .await
            .map_err(|e| SourceError::Backend(e.to_string()))?
            .map(Bytes::from)
            .map_err(source_err)
    }
}
