//! Component collections: the Component Repository's models, data transformations,
//! services and inferencers, kept as documents (the JSON its clients send) whose objects are
//! content-addressed blobs.
//!
//! One mechanism serves the four collections; a [`Collection`] only says which fields name
//! an entry (`model_name` and `model_version` for models, `id` for the others). Unlike the
//! Component Repository, an object is never overwritten: uploading to an entry that has one
//! adds a revision and moves the entry to it, and the earlier bytes stay reachable by
//! digest (`GET /api/v1/blobs/{digest}`) until the entry is deleted. Writes follow the
//! namespace rule of every hub write, the namespace being the first dotted segment of the
//! entry's name (`custom` for `custom.preprocess`).

use std::path::Path;

use super::db::{Conn, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tessera_core::manifest::Needs;
use tessera_core::size::ByteSize;
use tessera_core::{Digest, requirement::Requirement};
use tessera_identity::PublicKey;

use super::{HubError, HubStore, parse_digest, remove_leftover};
use crate::time::now_rfc3339;

/// Largest component document, as JSON text, in bytes (64 KiB; a page of a listing holds
/// at most [`crate::api`]'s 1,000 of them).
pub const MAX_DOCUMENT_BYTES: usize = 64 << 10;

/// Bytes in the gigabyte the Component Repository counts `storage` and `RAM` in (10^9).
pub const GIGABYTE: f64 = 1e9;

/// Largest `storage` or `RAM` need accepted, in gigabytes (1 PB).
const MAX_NEED_GB: f64 = 1e6;

/// A Component Repository collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Collection {
    /// Trained models (`model_name`, `model_version`, `meta`).
    Model,
    /// Pre- and post-processing steps (`id`, `description`, `parameter_types`,
    /// `default_values`, `outputs`, `needs`).
    Transformation,
    /// gRPC services (`id`, `description`, `needs`).
    Service,
    /// Inferencers for custom models (`id`, `description`, `library`, `use_cuda`, `needs`).
    Inferencer,
}

impl Collection {
    /// All of them.
    pub const ALL: [Collection; 4] =
        [Collection::Model, Collection::Transformation, Collection::Service, Collection::Inferencer];

    /// Its name in routes (`model`, `transformation`, `service`, `inferencer`).
    pub fn name(self) -> &'static str {
        match self {
            Collection::Model => "model",
            Collection::Transformation => "transformation",
            Collection::Service => "service",
            Collection::Inferencer => "inferencer",
        }
    }

    /// The collection a route names.
    ///
    /// # Errors
    /// [`HubError::NotFound`] for any other word.
    pub fn parse(s: &str) -> Result<Collection, HubError> {
        Collection::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            HubError::NotFound(format!(
                "no collection {:?} (there are model, transformation, service and inferencer)",
                truncate(s)
            ))
        })
    }

    /// The document fields that name an entry, in path order.
    pub fn key_fields(self) -> &'static [&'static str] {
        match self {
            Collection::Model => &["model_name", "model_version"],
            _ => &["id"],
        }
    }

    /// The entry key of a path's segments (`["base", "base2"]` for a model, `["custom.x"]`
    /// otherwise), checked.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when the collection names entries by another number of
    /// segments; [`HubError::BadRequest`] for a segment that is not a valid name part.
    pub fn key_of_path(self, segments: &[&str]) -> Result<String, HubError> {
        let fields = self.key_fields();
        if segments.len() != fields.len() {
            let shape: Vec<String> = fields.iter().map(|f| format!("{{{f}}}")).collect();
            return Err(HubError::NotFound(format!(
                "the {} collection names its entries as /{}/{}",
                self.name(),
                self.name(),
                shape.join("/")
            )));
        }
        for (field, s) in fields.iter().zip(segments) {
            check_key_part(field, s)?;
        }
        Ok(segments.join("/"))
    }

    /// The name whose namespace owns an entry: its first key part.
    fn owner_name(key: &str) -> &str {
        key.split('/').next().unwrap_or_default()
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks one part of an entry's name ([`tessera_core::name::check_entry_part`]: 1 to
/// [`tessera_core::name::MAX_ENTRY_PART`] characters from `[A-Za-z0-9_.+-]`, not starting or ending with `.`, no
/// `..`, and not `meta`), the rule `collection/id` references follow too.
///
/// # Errors
/// [`HubError::BadRequest`] naming the field and why.
pub fn check_key_part(field: &str, s: &str) -> Result<(), HubError> {
    tessera_core::name::check_entry_part(s)
        .map_err(|why| HubError::BadRequest(format!("invalid {field} {:?}: {why}", truncate(s))))
}

/// The `needs` of a transformation, service or inferencer, as the Component Repository
/// writes them. Sizes are in gigabytes (10^9 bytes), as its data model documents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ComponentNeeds {
    /// Disk space needed, in gigabytes.
    #[serde(default)]
    pub storage: Option<f64>,
    /// Memory needed, in gigabytes.
    #[serde(default, rename = "RAM")]
    pub ram: Option<f64>,
    /// Whether a GPU is needed.
    #[serde(default, rename = "GPU")]
    pub gpu: bool,
    /// Libraries that must be installed, name to version (`{"tensorflow": "2.12.0"}`; a
    /// version may also be a PEP 440 specifier such as `>=2.12`, or empty for any).
    #[serde(default)]
    pub preinstalled_libraries: Option<std::collections::BTreeMap<String, String>>,
    /// Models that must be available, name to version (kept; Tessera nodes do not announce
    /// models, so placement does not judge them).
    #[serde(default)]
    pub available_models: Option<std::collections::BTreeMap<String, String>>,
}

impl ComponentNeeds {
    /// Reads and checks the `needs` of a document.
    ///
    /// # Errors
    /// [`HubError::BadRequest`] naming the field: wrong types, negative, non-finite or
    /// over-large sizes, a library that is not a valid requirement.
    pub fn parse(value: &Value) -> Result<ComponentNeeds, HubError> {
        // An object only: serde would also read a struct from a list, by position.
        if !(value.is_object() || value.is_null()) {
            return Err(HubError::BadRequest(format!(
                "invalid needs: {} is not an object of storage, RAM, GPU, preinstalled_libraries and available_models",
                truncate(&value.to_string())
            )));
        }
        let n: ComponentNeeds =
            serde_json::from_value(value.clone()).map_err(|e| HubError::BadRequest(format!("invalid needs: {e}")))?;
        for (field, v) in [("needs.storage", n.storage), ("needs.RAM", n.ram)] {
            if let Some(v) = v
                && !(v.is_finite() && (0.0..=MAX_NEED_GB).contains(&v))
            {
                return Err(HubError::BadRequest(format!(
                    "invalid {field} {v}: a number of gigabytes from 0 to {MAX_NEED_GB}"
                )));
            }
        }
        n.requirements()?;
        Ok(n)
    }

    /// `preinstalled_libraries` as requirements (`tensorflow==2.12.0`).
    fn requirements(&self) -> Result<Vec<String>, HubError> {
        let mut out = Vec::new();
        for (name, version) in self.preinstalled_libraries.iter().flatten() {
            let v = version.trim();
            let text = if v.is_empty() || v == "*" {
                name.clone()
            } else if v.starts_with(['=', '<', '>', '!', '~']) {
                format!("{name}{v}")
            } else {
                format!("{name}=={v}")
            };
            let r = Requirement::parse(&text).map_err(|e| {
                HubError::BadRequest(format!("invalid needs.preinstalled_libraries {:?}: {e}", truncate(name)))
            })?;
            out.push(r.to_string());
        }
        Ok(out)
    }

    /// The same needs as a module's `needs` (what placement judges nodes by): `storage` and
    /// `RAM` in bytes, `GPU` as one GPU, `preinstalled_libraries` as requirements.
    pub fn module_needs(&self) -> Needs {
        let bytes = |gb: Option<f64>| ByteSize((gb.unwrap_or(0.0) * GIGABYTE).round() as u64);
        Needs {
            memory: bytes(self.ram),
            storage: bytes(self.storage),
            gpu: u32::from(self.gpu),
            libraries: self.requirements().unwrap_or_default(),
            ..Needs::default()
        }
    }
}

/// Reads and checks a document for `collection`: a JSON object of at most
/// [`MAX_DOCUMENT_BYTES`] whose key fields are valid name parts, whose `meta` (models) is an
/// object and whose `needs` (the others) parse. Fields the hub sets (`model_id`, `tessera`)
/// are dropped. Returns the entry key and the document to store.
///
/// # Errors
/// [`HubError::BadRequest`] naming what is wrong; [`HubError::TooLarge`].
pub fn parse_document(collection: Collection, body: &[u8]) -> Result<(String, Map<String, Value>), HubError> {
    if body.len() > MAX_DOCUMENT_BYTES {
        return Err(HubError::TooLarge(format!(
            "the document is {} bytes; the limit is {MAX_DOCUMENT_BYTES}",
            body.len()
        )));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| HubError::BadRequest(format!("invalid JSON body: {e}")))?;
    let Value::Object(mut doc) = value else {
        return Err(HubError::BadRequest(format!("a {} is a JSON object", collection.name())));
    };
    doc.remove("model_id");
    doc.remove("tessera");
    let mut parts = Vec::new();
    for field in collection.key_fields() {
        let Some(Value::String(s)) = doc.get(*field) else {
            return Err(HubError::BadRequest(format!("a {} needs `{field}`, a string", collection.name())));
        };
        check_key_part(field, s)?;
        parts.push(s.clone());
    }
    check_fields(collection, &doc)?;
    Ok((parts.join("/"), doc))
}

/// Checks the fields other than the key.
fn check_fields(collection: Collection, doc: &Map<String, Value>) -> Result<(), HubError> {
    match collection {
        Collection::Model => {
            if let Some(m) = doc.get("meta")
                && !(m.is_object() || m.is_null())
            {
                return Err(HubError::BadRequest("a model's `meta` is a JSON object".into()));
            }
        }
        _ => {
            if let Some(n) = doc.get("needs")
                && !n.is_null()
            {
                ComponentNeeds::parse(n)?;
            }
        }
    }
    Ok(())
}

/// One stored object of an entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revision {
    /// 1 for the first object, then one more per replacement.
    pub revision: u64,
    /// BLAKE3 digest of its bytes (`b3:<hex>`).
    #[schema(value_type = String)]
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Who uploaded it (a public key), when signed.
    pub signer: Option<String>,
    /// When (RFC 3339).
    pub created_at: String,
}

/// An entry of a collection.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentRecord {
    /// Its collection.
    pub collection: Collection,
    /// Its key: the key fields' values joined by `/`.
    pub key: String,
    /// The document as its client sent it (without `model_id`).
    pub document: Map<String, Value>,
    /// Its objects, oldest first; the last is the current one.
    pub revisions: Vec<Revision>,
    /// Who signed the last change of its document, if signed.
    pub signer: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When its document or object last changed (RFC 3339).
    pub updated_at: String,
}

impl ComponentRecord {
    /// The current object, if it has one.
    pub fn current(&self) -> Option<&Revision> {
        self.revisions.last()
    }

    /// Its needs in the Component Repository's form (default when absent).
    pub fn needs(&self) -> ComponentNeeds {
        self.document.get("needs").and_then(|n| ComponentNeeds::parse(n).ok()).unwrap_or_default()
    }
}

/// An object upload written to a temporary file in the blob directory.
#[derive(Debug)]
pub struct ObjectUpload<'a> {
    /// The temporary file; moved into the store or removed.
    pub file: &'a Path,
    /// BLAKE3 digest of its bytes.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

fn not_found(collection: Collection, key: &str) -> HubError {
    HubError::NotFound(format!("{} {key}", collection.name()))
}

fn document_text(doc: &Map<String, Value>) -> Result<String, HubError> {
    let text = serde_json::to_string(doc).map_err(|e| HubError::Storage(e.to_string()))?;
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(HubError::TooLarge(format!(
            "the document is {} bytes; the limit is {MAX_DOCUMENT_BYTES}",
            text.len()
        )));
    }
    Ok(text)
}

/// Reads every entry back (a restore's check that the hub can read what it restored): its
/// key as its collection names entries, its document and revisions, and its needs.
pub(super) fn check_rows(conn: &Conn) -> Result<(), HubError> {
    let keys: Vec<(String, String)> =
        conn.query_all("SELECT collection, key FROM components", params![], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let orphans: Vec<(String, String)> = conn.query_all(
        "SELECT collection, key FROM component_revisions r WHERE NOT EXISTS
         (SELECT 1 FROM components c WHERE c.collection = r.collection AND c.key = r.key)",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let Some((c, k)) = orphans.first() {
        return Err(HubError::BadRequest(format!("a revision of {c} {k}, which has no entry")));
    }
    for (c, key) in keys {
        let bad = |e: HubError| HubError::BadRequest(format!("{c} {key}: {e}"));
        let collection = Collection::parse(&c).map_err(bad)?;
        collection.key_of_path(&key.split('/').collect::<Vec<_>>()).map_err(bad)?;
        let rec = read(conn, collection, &key).map_err(bad)?.ok_or_else(|| bad(not_found(collection, &key)))?;
        // What a write of the entry would be held to (a model's `needs` is not read).
        check_fields(collection, &rec.document).map_err(bad)?;
    }
    Ok(())
}

fn read(conn: &Conn, collection: Collection, key: &str) -> Result<Option<ComponentRecord>, HubError> {
    let row = conn
        .query_row(
            "SELECT document, signer, created_at, updated_at FROM components WHERE collection = ?1 AND key = ?2",
            params![collection.name(), key],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((text, signer, created_at, updated_at)) = row else { return Ok(None) };
    let document: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| HubError::Storage(format!("{} {key}: {e}", collection.name())))?;
    let mut stmt = conn.prepare(
        "SELECT revision, digest, size, signer, created_at FROM component_revisions
         WHERE collection = ?1 AND key = ?2 ORDER BY revision",
    )?;
    let rows = stmt.query_map(params![collection.name(), key], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut revisions = Vec::new();
    for row in rows {
        let (revision, digest, size, signer, created_at) = row?;
        revisions.push(Revision {
            revision: u64::try_from(revision).unwrap_or(0),
            digest: parse_digest(&digest).map_err(|e| HubError::Storage(e.to_string()))?,
            size: u64::try_from(size).unwrap_or(0),
            signer,
            created_at,
        });
    }
    Ok(Some(ComponentRecord { collection, key: key.to_owned(), document, revisions, signer, created_at, updated_at }))
}

impl HubStore {
    /// Creates an entry from its document (see [`parse_document`]), on behalf of `actor`.
    ///
    /// # Errors
    /// [`HubError::Conflict`] when the entry exists; the namespace rule's refusals.
    pub fn create_component(
        &self,
        collection: Collection,
        key: &str,
        document: &Map<String, Value>,
        actor: Option<&PublicKey>,
    ) -> Result<ComponentRecord, HubError> {
        collection.key_of_path(&key.split('/').collect::<Vec<_>>())?;
        let text = document_text(document)?;
        let signer = actor.map(ToString::to_string);
        self.write(Collection::owner_name(key), actor, |tx| {
            if read(tx, collection, key)?.is_some() {
                return Err(HubError::Conflict(format!("{} {key} already exists", collection.name())));
            }
            let now = now_rfc3339();
            tx.execute(
                "INSERT INTO components (collection, key, document, signer, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![collection.name(), key, text, signer, now],
            )?;
            read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))
        })
    }

    /// Updates an entry's document on behalf of `actor`: each field sent replaces the
    /// stored one (a model's `{"meta": {...}}` replaces its `meta`), and the result is
    /// checked as a new document would be, in one transaction.
    ///
    /// # Errors
    /// [`HubError::NotFound`]; [`HubError::BadRequest`] when the fields change the entry's
    /// key or do not check; the namespace rule's refusals.
    pub fn update_component(
        &self,
        collection: Collection,
        key: &str,
        fields: Map<String, Value>,
        actor: Option<&PublicKey>,
    ) -> Result<ComponentRecord, HubError> {
        let signer = actor.map(ToString::to_string);
        self.write(Collection::owner_name(key), actor, |tx| {
            let mut document = read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))?.document;
            document.extend(fields);
            let text = serde_json::to_vec(&document).map_err(|e| HubError::Storage(e.to_string()))?;
            let (new_key, document) = parse_document(collection, &text)?;
            if new_key != key {
                return Err(HubError::BadRequest(format!(
                    "the update names {} {new_key}, not {key}: an entry's {} cannot change",
                    collection.name(),
                    collection.key_fields().join(" and ")
                )));
            }
            tx.execute(
                "UPDATE components SET document = ?3, signer = ?4, updated_at = ?5 WHERE collection = ?1 AND key = ?2",
                params![collection.name(), key, document_text(&document)?, signer, now_rfc3339()],
            )?;
            read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))
        })
    }

    /// Stores an object for an existing entry, on behalf of `actor`: a new revision that
    /// becomes the current one (the same bytes as the current object change nothing).
    /// Returns the entry and whether a revision was added. The temporary file is moved into
    /// the store or removed.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when the entry does not exist; the namespace rule's refusals.
    pub fn put_component_object(
        &self,
        collection: Collection,
        key: &str,
        upload: ObjectUpload<'_>,
        actor: Option<&PublicKey>,
    ) -> Result<(ComponentRecord, bool), HubError> {
        let result = self.write_with_blob(Collection::owner_name(key), actor, (upload.file, &upload.digest), |tx| {
            let rec = read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))?;
            if rec.current().is_some_and(|r| r.digest == upload.digest) {
                if !self.has_blob(&upload.digest)? {
                    self.adopt(upload.file, &upload.digest)?;
                }
                return Ok((rec, false));
            }
            self.adopt(upload.file, &upload.digest)?;
            let next = rec.current().map_or(1, |r| r.revision + 1);
            let now = now_rfc3339();
            tx.execute(
                "INSERT INTO component_revisions (collection, key, revision, digest, size, signer, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    collection.name(),
                    key,
                    i64::try_from(next).unwrap_or(i64::MAX),
                    upload.digest.to_string(),
                    i64::try_from(upload.size).unwrap_or(i64::MAX),
                    actor.map(ToString::to_string),
                    now
                ],
            )?;
            tx.execute(
                "UPDATE components SET updated_at = ?3 WHERE collection = ?1 AND key = ?2",
                params![collection.name(), key, now],
            )?;
            Ok((read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))?, true))
        });
        remove_leftover(upload.file);
        if let Ok((rec, true)) = &result {
            tracing::info!(collection = collection.name(), %key, revision = rec.revisions.len(), "component object stored");
        }
        result
    }

    /// [`HubStore::put_component_object`] of bytes held in memory.
    ///
    /// # Errors
    /// As [`HubStore::put_component_object`]; I/O errors writing the temporary file.
    pub fn put_component_bytes(
        &self,
        collection: Collection,
        key: &str,
        bytes: &[u8],
        actor: Option<&PublicKey>,
    ) -> Result<(ComponentRecord, bool), HubError> {
        let file = self.blobs.temp_path();
        std::fs::write(&file, bytes)?;
        let upload = ObjectUpload { file: &file, digest: Digest::of(bytes), size: bytes.len() as u64 };
        self.put_component_object(collection, key, upload, actor)
    }

    /// An entry.
    ///
    /// # Errors
    /// [`HubError::NotFound`].
    pub fn component(&self, collection: Collection, key: &str) -> Result<ComponentRecord, HubError> {
        read(&self.db(), collection, key)?.ok_or_else(|| not_found(collection, key))
    }

    /// The entries of a collection, by key, `limit` of them after skipping `offset`.
    pub fn components(
        &self,
        collection: Collection,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<ComponentRecord>, HubError> {
        let db = self.db();
        let keys: Vec<String> = db
            .prepare("SELECT key FROM components WHERE collection = ?1 ORDER BY key LIMIT ?2 OFFSET ?3")?
            .query_map(
                params![
                    collection.name(),
                    i64::try_from(limit).unwrap_or(i64::MAX),
                    i64::try_from(offset).unwrap_or(i64::MAX)
                ],
                |r| r.get(0),
            )?
            .collect::<Result<_, _>>()?;
        keys.iter().filter_map(|k| read(&db, collection, k).transpose()).collect()
    }

    /// The digest of an entry's current object.
    ///
    /// # Errors
    /// [`HubError::NotFound`] when the entry does not exist or has no object yet.
    pub fn component_object(&self, collection: Collection, key: &str) -> Result<Digest, HubError> {
        let rec = self.component(collection, key)?;
        let rev = rec
            .current()
            .ok_or_else(|| HubError::NotFound(format!("{} {key} has no object yet", collection.name())))?;
        Ok(rev.digest)
    }

    /// Deletes an entry, its revisions and the blobs nothing else uses, on behalf of `actor`.
    ///
    /// # Errors
    /// [`HubError::NotFound`]; the namespace rule's refusals.
    pub fn delete_component(
        &self,
        collection: Collection,
        key: &str,
        actor: Option<&PublicKey>,
    ) -> Result<ComponentRecord, HubError> {
        let rec = self.write(Collection::owner_name(key), actor, |tx| {
            let rec = read(tx, collection, key)?.ok_or_else(|| not_found(collection, key))?;
            tx.execute(
                "DELETE FROM component_revisions WHERE collection = ?1 AND key = ?2",
                params![collection.name(), key],
            )?;
            tx.execute("DELETE FROM components WHERE collection = ?1 AND key = ?2", params![collection.name(), key])?;
            Ok(rec)
        })?;
        for r in &rec.revisions {
            self.collect_blob(&r.digest)?;
        }
        tracing::info!(collection = collection.name(), %key, "component deleted");
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_refuse_what_paths_and_routes_cannot_hold() {
        for bad in ["", ".", "..", "a..b", ".a", "a.", "a/b", "a b", "meta", "ä", &"x".repeat(201), "a\0b"] {
            assert!(check_key_part("id", bad).is_err(), "{bad:?}");
        }
        for good in ["base", "base2", "custom.preprocess_tensorflow_tensor", "1.0.0+build-7", "A-b_c"] {
            check_key_part("id", good).unwrap();
        }
    }

    #[test]
    fn keys_come_from_paths_by_the_collection_shape() {
        assert_eq!(Collection::Model.key_of_path(&["base", "base2"]).unwrap(), "base/base2");
        assert!(matches!(Collection::Model.key_of_path(&["base"]), Err(HubError::NotFound(_))));
        assert!(matches!(Collection::Service.key_of_path(&["a", "b"]), Err(HubError::NotFound(_))));
        assert!(matches!(Collection::parse("models"), Err(HubError::NotFound(_))));
        assert_eq!(Collection::parse("inferencer").unwrap(), Collection::Inferencer);
    }

    #[test]
    fn documents_are_checked_and_server_fields_dropped() {
        let (key, doc) = parse_document(
            Collection::Model,
            br#"{"meta": {"library": "keras"}, "model_name": "base", "model_version": "base2", "model_id": "x"}"#,
        )
        .unwrap();
        assert_eq!(key, "base/base2");
        assert!(!doc.contains_key("model_id"));
        for (c, bad) in [
            (Collection::Model, &br#"{"model_name": "base"}"#[..]),
            (Collection::Model, br#"{"model_name": "base", "model_version": 2}"#),
            (Collection::Model, br#"{"model_name": "..", "model_version": "1"}"#),
            (Collection::Model, br#"{"model_name": "a", "model_version": "1", "meta": [1]}"#),
            (Collection::Service, br#"[]"#),
            (Collection::Service, br#"{"id": "a", "needs": {"RAM": -1}}"#),
            (Collection::Service, br#"{"id": "a", "needs": {"storage": 1e308}}"#),
            (Collection::Service, br#"{"id": "a", "needs": {"GPU": "yes"}}"#),
            (Collection::Service, br#"{"id": "a", "needs": {"preinstalled_libraries": {"torch": "not a version!"}}}"#),
            (Collection::Service, br#"{"id": "a", "needs": {"preinstalled_libraries": {"https://x": ""}}}"#),
            (Collection::Inferencer, b"{\"id\": \"a\""),
        ] {
            assert!(matches!(parse_document(c, bad), Err(HubError::BadRequest(_))), "{}", String::from_utf8_lossy(bad));
        }
        let huge = format!(r#"{{"id": "a", "description": "{}"}}"#, "x".repeat(MAX_DOCUMENT_BYTES));
        assert!(matches!(parse_document(Collection::Service, huge.as_bytes()), Err(HubError::TooLarge(_))));
    }

    #[test]
    fn needs_become_module_needs() {
        let n = ComponentNeeds::parse(&serde_json::json!({
            "storage": 1.5, "RAM": 2, "GPU": true,
            "preinstalled_libraries": {"tensorflow": "2.12.0", "numpy": ">=1.26", "scipy": ""},
            "available_models": {}
        }))
        .unwrap();
        let m = n.module_needs();
        assert_eq!(m.storage, ByteSize(1_500_000_000));
        assert_eq!(m.memory, ByteSize(2_000_000_000));
        assert_eq!(m.gpu, 1);
        assert_eq!(m.libraries, vec!["numpy>=1.26", "scipy", "tensorflow==2.12.0"]);
        assert_eq!(ComponentNeeds::default().module_needs(), Needs::default());
    }
}
