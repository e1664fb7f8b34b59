//! Models: records with metadata and lineage, immutable binaries, versions reserved after
//! deletion, `latest` over complete versions only.

use std::path::Path;

use super::db::{Conn, OptionalExtension, params};
use serde_json::Value;
use tessera_core::registry::ModelRecord;
use tessera_core::version::{LATEST, Version, latest, next_patch};
use tessera_core::wire::Lineage;
use tessera_core::{Digest, ModulePath};
use tessera_identity::PublicKey;

use super::{HubError, HubStore, new_version, parse_digest, parse_name, parse_version, remove_leftover, vkey};
use crate::time::now_rfc3339;

/// Largest metadata (or lineage) accepted for one model, as JSON text, in bytes.
pub const MAX_MODEL_META_BYTES: usize = 1 << 20;

/// A model binary written to a temporary file in the blob directory (digest and size
/// computed by the caller while writing it), with the metadata and lineage that go with it.
#[derive(Debug)]
pub struct ModelUpload<'a> {
    /// The temporary file; moved into the store or removed.
    pub file: &'a Path,
    /// BLAKE3 digest of its bytes.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Metadata to set with it (a JSON object), if any.
    pub metadata: Option<Value>,
    /// Lineage to set with it, if any.
    pub lineage: Option<Lineage>,
    /// A card to set with it, if any.
    pub card: Option<tessera_core::card::Card>,
}

const MODEL_COLUMNS: &str =
    "name, version, digest, size, metadata, lineage, created_at, signer, meta_signer, downloads, card";

fn model_row(row: &super::db::Row<'_>) -> Result<ModelRow, super::db::DbError> {
    Ok(ModelRow {
        name: row.get(0)?,
        version: row.get(1)?,
        digest: row.get(2)?,
        size: row.get(3)?,
        metadata: row.get(4)?,
        lineage: row.get(5)?,
        created_at: row.get(6)?,
        signer: row.get(7)?,
        meta_signer: row.get(8)?,
        downloads: row.get(9)?,
        card: row.get(10)?,
    })
}

struct ModelRow {
    name: String,
    version: String,
    digest: Option<String>,
    size: Option<i64>,
    metadata: String,
    lineage: Option<String>,
    created_at: String,
    signer: Option<String>,
    meta_signer: Option<String>,
    downloads: i64,
    card: Option<String>,
}

impl ModelRow {
    fn into_record(self) -> Result<ModelRecord, HubError> {
        Ok(ModelRecord {
            name: self.name,
            version: self.version,
            digest: self.digest.map(|d| parse_digest(&d)).transpose()?,
            size: self.size.map(|s| u64::try_from(s).unwrap_or(0)),
            metadata: serde_json::from_str(&self.metadata).map_err(|e| HubError::Storage(e.to_string()))?,
            lineage: self
                .lineage
                .map(|l| serde_json::from_str(&l))
                .transpose()
                .map_err(|e| HubError::Storage(e.to_string()))?,
            created_at: self.created_at,
            signer: self.signer,
            meta_signer: self.meta_signer,
            downloads: u64::try_from(self.downloads).unwrap_or(0),
            card: self
                .card
                .map(|c| serde_json::from_str(&c))
                .transpose()
                .map_err(|e| HubError::Storage(format!("stored card: {e}")))?,
        })
    }
}

/// Checks metadata (a JSON object under the size limit) and serializes it.
pub(crate) fn metadata_text(metadata: &Value) -> Result<String, HubError> {
    if !metadata.is_object() {
        return Err(HubError::BadRequest("model metadata must be a JSON object".into()));
    }
    let text = metadata.to_string();
    if text.len() > MAX_MODEL_META_BYTES {
        return Err(HubError::TooLarge(format!(
            "model metadata is {} bytes; the limit is {MAX_MODEL_META_BYTES}",
            text.len()
        )));
    }
    Ok(text)
}

pub(crate) fn lineage_text(lineage: Option<&Lineage>) -> Result<Option<String>, HubError> {
    let Some(l) = lineage else { return Ok(None) };
    let text = serde_json::to_string(l).map_err(|e| HubError::Storage(e.to_string()))?;
    if text.len() > MAX_MODEL_META_BYTES {
        return Err(HubError::TooLarge(format!(
            "model lineage is {} bytes; the limit is {MAX_MODEL_META_BYTES}",
            text.len()
        )));
    }
    Ok(Some(text))
}

/// Checks the metadata and lineage sent with a binary before anything is written (a refused
/// upload leaves no blob behind).
fn check_upload_meta(upload: &ModelUpload<'_>) -> Result<(), HubError> {
    if let Some(m) = &upload.metadata {
        metadata_text(m)?;
    }
    lineage_text(upload.lineage.as_ref())?;
    Ok(())
}

/// A stored version of a model (build metadata aside), deleted or not.
struct Stored {
    version: String,
    digest: Option<String>,
    deleted: bool,
}

fn stored(conn: &Conn, name: &str, version: &Version) -> Result<Option<Stored>, HubError> {
    Ok(conn
        .query_row(
            "SELECT version, digest, deleted FROM models WHERE name = ?1 AND vkey = ?2 ORDER BY rowid LIMIT 1",
            params![name, vkey(version)],
            |r| Ok(Stored { version: r.get(0)?, digest: r.get(1)?, deleted: r.get::<_, i64>(2)? != 0 }),
        )
        .optional()?)
}

/// A live record by exact version (build metadata aside).
fn live(conn: &Conn, name: &str, version: &Version) -> Result<ModelRecord, HubError> {
    let row = conn
        .query_row(
            &format!(
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1 AND vkey = ?2 AND deleted = 0 ORDER BY rowid LIMIT 1"
            ),
            params![name, vkey(version)],
            model_row,
        )
        .optional()?;
    row.map(ModelRow::into_record).transpose()?.ok_or_else(|| HubError::NotFound(format!("model {name}@{version}")))
}

/// Every version of `name` ever stored (deleted ones too: their numbers stay taken).
fn all_versions(conn: &Conn, name: &str) -> Result<Vec<Version>, HubError> {
    let texts: Vec<String> = conn
        .prepare("SELECT version FROM models WHERE name = ?1")?
        .query_map(params![name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(texts.iter().filter_map(|v| Version::parse(v).ok()).collect())
}

/// The version after the highest one `name` ever had.
fn next_version(conn: &Conn, name: &str) -> Result<Version, HubError> {
    let versions = all_versions(conn, name)?;
    let highest = versions.iter().max();
    next_patch(highest).ok_or_else(|| match highest {
        Some(v) => {
            HubError::BadRequest(format!("model {name} has no version after {v}: its patch number is the largest"))
        }
        None => HubError::BadRequest(format!("model {name} has no next version")),
    })
}

/// A card as stored (JSON).
fn card_text(card: Option<&tessera_core::card::Card>) -> Result<Option<String>, HubError> {
    card.map(|c| serde_json::to_string(c).map_err(|e| HubError::Storage(e.to_string()))).transpose()
}

/// Sets metadata and lineage given with an upload (inside the upload's transaction).
fn set_meta(
    tx: &Conn,
    name: &str,
    version: &str,
    upload: &ModelUpload<'_>,
    actor: Option<&PublicKey>,
) -> Result<(), HubError> {
    if upload.metadata.is_none() && upload.lineage.is_none() && upload.card.is_none() {
        return Ok(());
    }
    let metadata = upload.metadata.as_ref().map(metadata_text).transpose()?;
    let lineage = lineage_text(upload.lineage.as_ref())?;
    let card = card_text(upload.card.as_ref())?;
    tx.execute(
        "UPDATE models SET metadata = COALESCE(?3, metadata), lineage = COALESCE(?4, lineage), meta_signer = ?5,
             card = COALESCE(?6, card)
         WHERE name = ?1 AND version = ?2",
        params![name, version, metadata, lineage, actor.map(ToString::to_string), card],
    )?;
    Ok(())
}

/// Reads every model row back as a record (a restore's check that the hub can read what
/// it restored), one at a time.
pub(super) fn check_rows(conn: &Conn) -> Result<(), HubError> {
    let mut failed = None;
    conn.query_all(&format!("SELECT {MODEL_COLUMNS} FROM models"), params![], |row| {
        let (name, version): (String, String) = (row.get(0)?, row.get(1)?);
        if let Err(e) = model_row(row).map_err(HubError::from).and_then(ModelRow::into_record) {
            failed.get_or_insert(HubError::BadRequest(format!("model {name}@{version}: {e}")));
        }
        Ok(())
    })?;
    failed.map_or(Ok(()), Err)
}

impl HubStore {
    /// Creates a model record (metadata and lineage, no binary yet) on behalf of `actor`.
    /// A version that exists, or existed, is a conflict. `latest` skips it until its binary
    /// arrives.
    pub fn create_model(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
        actor: Option<&PublicKey>,
    ) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        let v = new_version(version)?;
        let metadata = metadata_text(metadata)?;
        let lineage = lineage_text(lineage)?;
        self.write(name, actor, |tx| {
            if let Some(s) = stored(tx, name, &v)? {
                let why = if s.deleted { " (deleted; versions are never reused)" } else { "" };
                return Err(HubError::Conflict(format!("model {name}@{} exists already{why}", s.version)));
            }
            tx.execute(
                "INSERT INTO models (name, version, metadata, lineage, created_at, vkey, meta_signer)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    name,
                    v.to_string(),
                    metadata,
                    lineage,
                    now_rfc3339(),
                    vkey(&v),
                    actor.map(ToString::to_string)
                ],
            )?;
            live(tx, name, &v)
        })
    }

    /// Replaces a model's metadata (and lineage, when given) on behalf of `actor`. The
    /// binary never changes.
    pub fn update_model_meta(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
        card: Option<&tessera_core::card::Card>,
        actor: Option<&PublicKey>,
    ) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        let v = parse_version(version)?;
        let metadata = metadata_text(metadata)?;
        let lineage = lineage_text(lineage)?;
        let card = card_text(card)?;
        self.write(name, actor, |tx| {
            let current = live(tx, name, &v)?;
            tx.execute(
                "UPDATE models SET metadata = ?3, lineage = COALESCE(?4, lineage), meta_signer = ?5,
                     card = COALESCE(?6, card)
                 WHERE name = ?1 AND version = ?2",
                params![name, current.version, metadata, lineage, actor.map(ToString::to_string), card],
            )?;
            live(tx, name, &v)
        })
    }

    /// Stores a model's binary (with the metadata and lineage given with it, in the same
    /// transaction) as `name@version` on behalf of `actor`. Creates the record if needed;
    /// the same bytes again are a no-op (their metadata, if given, is set); other bytes
    /// than a stored or deleted version's are a conflict that changes nothing. Returns the
    /// record and whether the binary is new.
    pub fn put_model_file(
        &self,
        name: &str,
        version: &str,
        upload: ModelUpload<'_>,
        actor: Option<&PublicKey>,
    ) -> Result<(ModelRecord, bool), HubError> {
        let file = upload.file;
        let result = self.put_model_file_inner(name, version, &upload, actor);
        remove_leftover(file);
        result
    }

    fn put_model_file_inner(
        &self,
        name: &str,
        version: &str,
        upload: &ModelUpload<'_>,
        actor: Option<&PublicKey>,
    ) -> Result<(ModelRecord, bool), HubError> {
        parse_name(name)?;
        let v = parse_version(version)?;
        check_upload_meta(upload)?;
        // A version too long for a new record is refused before its blob is stored (and
        // again under the write lock, in case it went meanwhile).
        if new_version(version).is_err() && stored(&*self.read_tx()?, name, &v)?.is_none() {
            new_version(version)?;
        }
        let digest = upload.digest.to_string();
        let signer = actor.map(ToString::to_string);
        self.write_with_blob(name, actor, (upload.file, &upload.digest), |tx| {
            let created = match stored(tx, name, &v)? {
                Some(Stored { digest: Some(d), version: sv, deleted }) if d != digest => {
                    let why = if deleted { " (it was deleted; versions are never reused)" } else { "" };
                    return Err(HubError::Conflict(format!(
                        "model {name}@{sv} already has a binary ({d}){why}; binaries are immutable: push a new version"
                    )));
                }
                Some(Stored { digest: Some(_), version: sv, deleted: false }) => {
                    // The same bytes again: a no-op that brings back a missing blob.
                    if !self.has_blob(&upload.digest)? {
                        self.adopt(upload.file, &upload.digest)?;
                    }
                    set_meta(tx, name, &sv, upload, actor)?;
                    false
                }
                Some(Stored { version: sv, .. }) => {
                    self.adopt(upload.file, &upload.digest)?;
                    tx.execute(
                        "UPDATE models SET digest = ?3, size = ?4, deleted = 0, signer = ?5 WHERE name = ?1 AND version = ?2",
                        params![name, sv, digest, i64::try_from(upload.size).unwrap_or(i64::MAX), signer],
                    )?;
                    set_meta(tx, name, &sv, upload, actor)?;
                    true
                }
                None => {
                    new_version(version)?;
                    self.adopt(upload.file, &upload.digest)?;
                    insert_with_binary(tx, name, &v, upload, actor)?;
                    true
                }
            };
            Ok((live(tx, name, &v)?, created))
        })
    }

    /// Stores a model binary as the next patch version of `name` (after the highest version
    /// it ever had; `0.1.0` for a new model), chosen inside the write's transaction, so
    /// concurrent uploads get distinct versions.
    pub fn put_model_next(
        &self,
        name: &str,
        upload: ModelUpload<'_>,
        actor: Option<&PublicKey>,
    ) -> Result<ModelRecord, HubError> {
        let file = upload.file;
        let result = (|| {
            parse_name(name)?;
            check_upload_meta(&upload)?;
            self.write_with_blob(name, actor, (upload.file, &upload.digest), |tx| {
                let v = next_version(tx, name)?;
                self.adopt(upload.file, &upload.digest)?;
                insert_with_binary(tx, name, &v, &upload, actor)?;
                live(tx, name, &v)
            })
        })();
        remove_leftover(file);
        result
    }

    /// Stores a model's binary held in memory, on behalf of `actor` (in-process callers).
    pub fn put_model(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        actor: Option<&PublicKey>,
    ) -> Result<(ModelRecord, bool), HubError> {
        let tmp = self.blobs.temp_path();
        std::fs::write(&tmp, bytes)?;
        let upload = ModelUpload {
            file: &tmp,
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            metadata: None,
            lineage: None,
            card: None,
        };
        self.put_model_file(name, version, upload, actor)
    }

    /// Stores a model held in memory as the next version of `name`, with its metadata and
    /// lineage, on behalf of `actor` (in-process callers; see [`HubStore::put_model_next`]).
    pub fn publish_model(
        &self,
        name: &str,
        bytes: &[u8],
        metadata: Value,
        lineage: Option<Lineage>,
        actor: Option<&PublicKey>,
    ) -> Result<ModelRecord, HubError> {
        let tmp = self.blobs.temp_path();
        std::fs::write(&tmp, bytes)?;
        let upload = ModelUpload {
            file: &tmp,
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            metadata: Some(metadata),
            lineage,
            card: None,
        };
        self.put_model_next(name, upload, actor)
    }

    /// A live model record; `version` may be `latest` (the highest version that has a
    /// binary: a record still waiting for its upload is never `latest`).
    pub fn model(&self, name: &str, version: &str) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        // The versions and the chosen one read at one moment.
        let db = self.read_tx()?;
        if version == LATEST {
            let complete: Vec<String> = db
                .prepare("SELECT version FROM models WHERE name = ?1 AND deleted = 0 AND digest IS NOT NULL")?
                .query_map(params![name], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let versions: Vec<Version> = complete.iter().filter_map(|v| Version::parse(v).ok()).collect();
            let best = latest(&versions)
                .ok_or_else(|| HubError::NotFound(format!("model {name} has no version with a binary")))?;
            return live(&db, name, best);
        }
        live(&db, name, &parse_version(version)?)
    }

    /// Live models whose name has `prefix` (by segments), sorted by name and version.
    pub fn models(&self, prefix: Option<&str>) -> Result<Vec<ModelRecord>, HubError> {
        let all = super::search::Filters { limit: Some(u64::MAX), ..Default::default() };
        self.page_of_models(prefix, &all, usize::MAX)
    }

    /// Models under `prefix` that pass `filters`, by name and version, the page the
    /// filters ask for; cards without their text.
    pub fn search_models(
        &self,
        prefix: Option<&str>,
        filters: &super::search::Filters,
    ) -> Result<Vec<ModelRecord>, HubError> {
        self.page_of_models(prefix, filters, usize::try_from(super::search::MAX_PAGE).unwrap_or(usize::MAX))
    }

    /// Every live model, one at a time ([`HubStore::scan_by_name`]: a batch of rows held at
    /// once, the database's lock only while a batch is read).
    fn for_each_model(&self, mut f: impl FnMut(ModelRecord)) -> Result<(), HubError> {
        self.scan_by_name("models", MODEL_COLUMNS, "deleted = 0", model_row, |row| {
            f(row.into_record()?);
            Ok(std::ops::ControlFlow::Continue(()))
        })
    }

    /// The page of the models under `prefix` that pass `filters` (at most `most`), by
    /// name and version, read in one scan: the rows come by name, so one name's matching
    /// versions are gathered, put in semver order, and kept only if they fall in the page;
    /// the scan ends once the page is full.
    fn page_of_models(
        &self,
        prefix: Option<&str>,
        filters: &super::search::Filters,
        most: usize,
    ) -> Result<Vec<ModelRecord>, HubError> {
        let offset = usize::try_from(filters.offset.unwrap_or(0)).unwrap_or(usize::MAX);
        let limit = usize::try_from(filters.limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX).min(most);
        let end = offset.saturating_add(limit);
        let mut seen = 0usize;
        let mut out = Vec::new();
        let mut group: Vec<ModelRecord> = Vec::new();
        // One name's versions, in semver order, into the page.
        let flush = |group: &mut Vec<ModelRecord>, out: &mut Vec<ModelRecord>, seen: &mut usize| {
            group.sort_by(|a, b| match (Version::parse(&a.version), Version::parse(&b.version)) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.version.cmp(&b.version),
            });
            for m in group.drain(..) {
                if (offset..end).contains(seen) {
                    out.push(m);
                }
                *seen += 1;
            }
        };
        self.scan_by_name("models", MODEL_COLUMNS, "deleted = 0", model_row, |row| {
            if group.first().is_some_and(|g| g.name != row.name) {
                flush(&mut group, &mut out, &mut seen);
                if seen >= end {
                    // The page is full.
                    return Ok(std::ops::ControlFlow::Break(()));
                }
            }
            let under = prefix.is_none_or(|p| row.name.parse::<ModulePath>().is_ok_and(|n| n.has_prefix(p)));
            if under {
                let mut m = row.into_record()?;
                if filters.accepts(&super::search::Facets::of_model(&m)) {
                    if let Some(c) = &mut m.card {
                        c.text.clear();
                    }
                    group.push(m);
                }
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        flush(&mut group, &mut out, &mut seen);
        Ok(out)
    }

    /// Counts a whole download of a model version's binary.
    pub fn count_model_download(&self, name: &str, version: &str) -> Result<(), HubError> {
        self.db().execute(
            "UPDATE models SET downloads = downloads + 1 WHERE name = ?1 AND version = ?2",
            params![name, version],
        )?;
        Ok(())
    }

    /// The models built from `name@version` (or from `name` without a version): those
    /// whose lineage or card names it as their `base_model`.
    pub fn derived_models(&self, name: &str, version: &str) -> Result<Vec<ModelRecord>, HubError> {
        let exact = format!("{name}@{version}");
        let mut out = Vec::new();
        // One model at a time: only those built from this one are kept.
        self.for_each_model(|mut m| {
            let base = m
                .lineage
                .as_ref()
                .and_then(|l| l.base_model.clone())
                .or_else(|| m.card.as_ref().and_then(|c| c.base_model.clone()));
            if base.is_some_and(|b| b == exact || b == name) {
                if let Some(c) = &mut m.card {
                    c.text.clear();
                }
                out.push(m);
            }
        })?;
        out.sort_by(|a, b| {
            a.name.cmp(&b.name).then_with(|| match (Version::parse(&a.version), Version::parse(&b.version)) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.version.cmp(&b.version),
            })
        });
        Ok(out)
    }

    /// The next free patch version of a model: `0.1.0` for a new model, else the highest
    /// version it ever had with its patch number raised. (Uploads that must not collide use
    /// [`HubStore::put_model_next`], which chooses inside its transaction.)
    pub fn next_model_version(&self, name: &str) -> Result<String, HubError> {
        parse_name(name)?;
        Ok(next_version(&self.db(), name)?.to_string())
    }

    /// Deletes a model version on behalf of `actor`, and its binary when nothing else uses
    /// it. A version that had a binary stays reserved for the same bytes.
    pub fn delete_model(&self, name: &str, version: &str, actor: Option<&PublicKey>) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        let v = parse_version(version)?;
        let m = self.write(name, actor, |tx| {
            let m = live(tx, name, &v)?;
            if m.digest.is_some() {
                tx.execute(
                    "UPDATE models SET deleted = 1 WHERE name = ?1 AND version = ?2",
                    params![m.name, m.version],
                )?;
            } else {
                tx.execute("DELETE FROM models WHERE name = ?1 AND version = ?2", params![m.name, m.version])?;
            }
            Ok(m)
        })?;
        if let Some(d) = &m.digest {
            self.collect_blob(d)?;
        }
        tracing::info!(%name, %version, "model deleted");
        Ok(m)
    }
}

fn insert_with_binary(
    tx: &Conn,
    name: &str,
    v: &Version,
    upload: &ModelUpload<'_>,
    actor: Option<&PublicKey>,
) -> Result<(), HubError> {
    let metadata = metadata_text(upload.metadata.as_ref().unwrap_or(&Value::Object(Default::default())))?;
    let lineage = lineage_text(upload.lineage.as_ref())?;
    let signer = actor.map(ToString::to_string);
    let meta_signer = if upload.metadata.is_some() || upload.lineage.is_some() || upload.card.is_some() {
        signer.clone()
    } else {
        None
    };
    let card = card_text(upload.card.as_ref())?;
    tx.execute(
        "INSERT INTO models (name, version, digest, size, metadata, lineage, created_at, vkey, signer, meta_signer, card)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            name,
            v.to_string(),
            upload.digest.to_string(),
            i64::try_from(upload.size).unwrap_or(i64::MAX),
            metadata,
            lineage,
            now_rfc3339(),
            vkey(v),
            signer,
            meta_signer,
            card
        ],
    )?;
    Ok(())
}
