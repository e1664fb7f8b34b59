//! Component Repository entries as packages: a transformation, service or inferencer whose
//! object is a Tessera package runs as that package (`transformation/custom.scale` in a
//! swarm task or session), and placement judges nodes by the package's `needs` joined with
//! the entry's ([`super::ComponentNeeds::module_needs`],
//! [`tessera_core::manifest::Needs::joined`]).
//!
//! The package must be a module of the entry's own namespace (entry `custom.scale` may hold
//! `custom.anything`): an entry's owner cannot pass its code off as another namespace's
//! module, whose name grants, actor names and queues are keyed by.

use std::collections::BTreeMap;
use std::fs::File;

use tessera_core::registry::PackageRecord;
use tessera_core::version::ComponentCollection;
use tessera_core::{Digest, Manifest};
use tessera_package::inspect_reader;

use super::components::Collection;
use super::db::params;
use super::{HubError, HubStore, namespace_of};

/// The outcome of reading objects as packages, by digest: the manifest, or why not.
pub(crate) type Inspected = BTreeMap<Digest, Result<Manifest, String>>;

/// Most outcomes [`Inspected`] keeps (it is emptied when full).
const MAX_INSPECTED: usize = 1024;

/// Most entries holding one digest that a lookup by digest looks at.
const MAX_HOLDERS: i64 = 64;

impl From<ComponentCollection> for Collection {
    fn from(c: ComponentCollection) -> Collection {
        match c {
            ComponentCollection::Transformation => Collection::Transformation,
            ComponentCollection::Service => Collection::Service,
            ComponentCollection::Inferencer => Collection::Inferencer,
        }
    }
}

impl HubStore {
    /// The current object of entry `id` of `collection`, read as a package: its record has
    /// the package's manifest with the entry's `needs` joined to the manifest's, no
    /// signature (an entry's signer signs its upload, not the package), and `component`
    /// set to `collection/id`.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when the entry does not exist or has no object yet;
    /// [`HubError::BadRequest`] when its object is not a Tessera package, or is a module of
    /// another namespace than the entry's.
    pub fn component_package(&self, collection: ComponentCollection, id: &str) -> Result<PackageRecord, HubError> {
        let c = Collection::from(collection);
        let entry = self.component(c, id)?;
        let rev = entry.current().ok_or_else(|| HubError::NotFound(format!("{} {id} has no object yet", c.name())))?;
        let reference = format!("{}/{id}", c.name());
        let manifest = self
            .object_manifest(&rev.digest, rev.size, id)
            .map_err(|why| HubError::BadRequest(format!("the object of {reference} ({}) {why}", rev.digest)))?;
        let mut record = package_record(manifest, &rev.digest, rev.size, &rev.created_at);
        record.manifest.needs = record.manifest.needs.joined(&entry.needs().module_needs());
        record.component = Some(reference);
        Ok(record)
    }

    /// The package record of a blob that is no published package but the object (current
    /// or earlier) of a transformation, service or inferencer, a package of the entry's
    /// namespace (nodes fetch what they run by digest), with the package's own `needs`;
    /// `None` when no entry holds such a package under this digest.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn component_object_package(&self, digest: &Digest) -> Result<Option<PackageRecord>, HubError> {
        let holders: Vec<(String, i64, String)> = self
            .db()
            .prepare(
                "SELECT key, size, created_at FROM component_revisions
                 WHERE digest = ?1 AND collection <> 'model' ORDER BY collection, key, revision LIMIT ?2",
            )?
            .query_map(params![digest.to_string(), MAX_HOLDERS], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (key, size, created_at) in holders {
            let size = u64::try_from(size).unwrap_or(0);
            if let Ok(manifest) = self.object_manifest(digest, size, &key) {
                return Ok(Some(package_record(manifest, digest, size, &created_at)));
            }
        }
        Ok(None)
    }

    /// The manifest of the package an entry named `id` holds under `digest`, or why it is
    /// none: not a package, or a module of another namespace.
    fn object_manifest(&self, digest: &Digest, size: u64, id: &str) -> Result<Manifest, String> {
        let cached = self.object_manifests.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned();
        let read = match cached {
            Some(r) => r,
            None => {
                // A blob that cannot be read now may be readable later: only what its bytes
                // say is kept.
                let path = self.blob_path(digest).map_err(|e| format!("cannot be read: {e}"))?;
                let file = File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
                let read = inspect_reader(file, *digest, size, &self.limits)
                    .map(|info| info.manifest)
                    .map_err(|e| format!("is not a Tessera package: {e}"));
                let mut cache = self.object_manifests.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_INSPECTED {
                    cache.clear();
                }
                cache.insert(*digest, read.clone());
                read
            }
        };
        let manifest = read?;
        let (module, entry) = (namespace_of(manifest.name.as_str()), namespace_of(id));
        if module != entry {
            return Err(format!(
                "is the module {}, of namespace {module}; an entry of namespace {entry} may hold only its own modules",
                manifest.name
            ));
        }
        Ok(manifest)
    }
}

fn package_record(manifest: Manifest, digest: &Digest, size: u64, created_at: &str) -> PackageRecord {
    PackageRecord {
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        digest: *digest,
        size,
        kind: manifest.kind,
        runtime: manifest.runtime,
        description: manifest.description.clone(),
        tags: manifest.tags.clone(),
        published_at: created_at.to_owned(),
        manifest,
        signer: None,
        signature: None,
        private: false,
        downloads: 0,
        card: None,
        component: None,
    }
}
