//! Packages: publishing (public and sealed), versions, aliases, listing, deletion.

use std::fs::File;
use std::path::Path;

use super::db::{Conn, OptionalExtension, params};
use tessera_core::registry::PackageRecord;
use tessera_core::version::{LATEST, Selector, Version, check_alias, latest};
use tessera_core::{Digest, Kind, Manifest};
use tessera_identity::{PackageSignature, PublicKey};
use tessera_package::{PackageInfo, inspect_reader};

use super::{HubError, HubStore, keys_json, parse_digest, parse_name, parse_version, remove_leftover, vkey};
use crate::time::now_rfc3339;

/// Filters for listing packages.
#[derive(Clone, Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Module-path prefix, by segments (`fl` matches `fl.softmax.worker`, not `flow`).
    pub prefix: Option<String>,
    /// Only packages with this tag.
    pub tag: Option<String>,
    /// Only packages of this kind.
    pub kind: Option<String>,
    /// Text to find in the name or description (the manifest's or the card's).
    pub q: Option<String>,
    /// Every version instead of the latest of each package.
    #[serde(default)]
    pub all: bool,
    /// Only under this license (manifest or card; SPDX id, e.g. `apache-2.0`).
    pub license: Option<String>,
    /// Only packages that need this library (`needs.libraries`) or whose card names it.
    pub library: Option<String>,
    /// Only packages signed by this key.
    pub signer: Option<String>,
    /// Records to skip (default 0).
    pub offset: Option<u64>,
    /// Records to return (default and most: 1,000).
    pub limit: Option<u64>,
}

impl ListQuery {
    fn filters(&self) -> super::search::Filters {
        super::search::Filters {
            q: self.q.clone(),
            tag: self.tag.clone(),
            license: self.license.clone(),
            library: self.library.clone(),
            signer: self.signer.clone(),
            offset: self.offset,
            limit: self.limit,
        }
    }
}

/// What publishing did.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// The record.
    pub record: PackageRecord,
    /// False when this exact package was already published (publishing is idempotent).
    pub created: bool,
}

/// What a publish checks besides the package itself.
#[derive(Clone, Debug, Default)]
pub struct PublishCheck {
    /// The digest the client announced: the bytes must have it.
    pub expected: Option<Digest>,
    /// The `name` and `version` the client declared: the package's manifest must say them.
    pub declared: Option<(String, String)>,
    /// The publisher's signature over the digest, recorded with the package.
    pub signature: Option<PackageSignature>,
}

const PACKAGE_COLUMNS: &str =
    "name, version, digest, size, manifest, published_at, deleted, signer, signature, private, downloads, card";

struct PackageRow {
    name: String,
    version: String,
    digest: String,
    size: i64,
    manifest: String,
    published_at: String,
    signer: Option<String>,
    signature: Option<String>,
    private: bool,
    downloads: i64,
    card: Option<String>,
}

fn package_row(row: &super::db::Row<'_>) -> Result<(PackageRow, bool), super::db::DbError> {
    Ok((
        PackageRow {
            name: row.get(0)?,
            version: row.get(1)?,
            digest: row.get(2)?,
            size: row.get(3)?,
            manifest: row.get(4)?,
            published_at: row.get(5)?,
            signer: row.get(7)?,
            signature: row.get(8)?,
            private: row.get::<_, i64>(9)? != 0,
            downloads: row.get(10)?,
            card: row.get(11)?,
        },
        row.get::<_, i64>(6)? != 0,
    ))
}

impl PackageRow {
    fn into_record(self) -> Result<PackageRecord, HubError> {
        let manifest: Manifest =
            serde_json::from_str(&self.manifest).map_err(|e| HubError::Storage(format!("stored manifest: {e}")))?;
        Ok(PackageRecord {
            name: self.name,
            version: self.version,
            digest: parse_digest(&self.digest)?,
            size: u64::try_from(self.size).unwrap_or(0),
            kind: manifest.kind,
            runtime: manifest.runtime,
            description: manifest.description.clone(),
            tags: manifest.tags.clone(),
            published_at: self.published_at,
            manifest,
            signer: self.signer,
            signature: self.signature,
            private: self.private,
            downloads: u64::try_from(self.downloads).unwrap_or(0),
            card: match self.card {
                Some(text) => {
                    Some(serde_json::from_str(&text).map_err(|e| HubError::Storage(format!("stored card: {e}")))?)
                }
                None => None,
            },
            component: None,
        })
    }
}

/// Reads every package row back as a record (a restore's check that the hub can read what
/// it restored), one at a time.
pub(super) fn check_rows(conn: &Conn) -> Result<(), HubError> {
    let mut failed = None;
    conn.query_all(&format!("SELECT {PACKAGE_COLUMNS} FROM packages"), params![], |row| {
        let (name, version): (String, String) = (row.get(0)?, row.get(1)?);
        if let Err(e) = package_row(row).map_err(HubError::from).and_then(|(r, _)| r.into_record()) {
            failed.get_or_insert(HubError::BadRequest(format!("package {name}@{version}: {e}")));
        }
        Ok(())
    })?;
    failed.map_or(Ok(()), Err)
}

/// A record for a listing: its card's facts without the card's text (which the card route
/// serves).
fn strip_card_text(mut r: PackageRecord) -> PackageRecord {
    if let Some(c) = &mut r.card {
        c.text.clear();
    }
    r
}

/// The stored version of `name` that is `version` (build metadata aside), deleted or not:
/// its exact version text, digest and whether it is deleted.
fn existing(conn: &Conn, name: &str, version: &Version) -> Result<Option<(String, String, bool)>, HubError> {
    Ok(conn
        .query_row(
            "SELECT version, digest, deleted FROM packages WHERE name = ?1 AND vkey = ?2 ORDER BY rowid LIMIT 1",
            params![name, vkey(version)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)),
        )
        .optional()?)
}

/// A live version (build metadata aside).
fn get_exact(conn: &Conn, name: &str, version: &Version) -> Result<PackageRecord, HubError> {
    let row = conn
        .query_row(
            &format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE name = ?1 AND vkey = ?2 ORDER BY rowid LIMIT 1"),
            params![name, vkey(version)],
            package_row,
        )
        .optional()?;
    match row {
        Some((r, false)) => r.into_record(),
        _ => Err(HubError::NotFound(format!("{name}@{version}"))),
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_package(
    tx: &Conn,
    m: &Manifest,
    digest: &Digest,
    size: u64,
    signature: Option<&PackageSignature>,
    private: bool,
    recipients: Option<&[PublicKey]>,
) -> Result<(), HubError> {
    let manifest = serde_json::to_string(m).map_err(|e| HubError::Storage(e.to_string()))?;
    tx.execute(
        "INSERT INTO packages (name, version, digest, size, kind, runtime, description, tags, manifest, published_at, signer, signature, private, vkey, recipients)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            m.name.to_string(),
            m.version.to_string(),
            digest.to_string(),
            i64::try_from(size).unwrap_or(i64::MAX),
            m.kind.as_str(),
            m.runtime.as_str(),
            m.description,
            serde_json::to_string(&m.tags).unwrap_or_default(),
            manifest,
            now_rfc3339(),
            signature.map(|s| s.key.to_string()),
            signature.map(|s| s.sig.to_text()),
            i64::from(private),
            vkey(&m.version),
            recipients.map(keys_json),
        ],
    )?;
    Ok(())
}

/// The conflict of publishing `digest` as `name@version` over what is stored, if any.
fn version_conflict(
    name: &str,
    version: &Version,
    stored: &(String, String, bool),
    digest: &Digest,
) -> Option<HubError> {
    let (v, d, deleted) = stored;
    if d == &digest.to_string() {
        return None;
    }
    let why = if *deleted { " (it was deleted; versions are never reused)" } else { "" };
    let same = if v != &version.to_string() {
        format!(" as {v} (build metadata does not make another version)")
    } else {
        String::new()
    };
    Some(HubError::Conflict(format!(
        "{name}@{version} is already published{same} with other bytes ({d}){why}; versions are immutable: publish a new version"
    )))
}

impl HubStore {
    /// Publishes package bytes held in memory, on behalf of the package's signer (in-process
    /// callers). `expected`, when given, must be their digest.
    pub fn publish(
        &self,
        bytes: &[u8],
        expected: Option<Digest>,
        signature: Option<&PackageSignature>,
    ) -> Result<Published, HubError> {
        let tmp = self.blobs.temp_path();
        std::fs::write(&tmp, bytes)?;
        let digest = Digest::of(bytes);
        let actor = signature.map(|s| s.key.clone());
        let check = PublishCheck { expected, declared: None, signature: signature.cloned() };
        self.publish_file(&tmp, digest, bytes.len() as u64, &check, actor.as_ref())
    }

    /// Publishes a package already written to a temporary file inside the blob directory
    /// (see [`tessera_ports::FsBlobStore::temp_path`]), whose digest and size the caller
    /// computed while writing it, on behalf of `actor` (the request's signer). The file is
    /// moved into the store or removed.
    pub fn publish_file(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        check: &PublishCheck,
        actor: Option<&PublicKey>,
    ) -> Result<Published, HubError> {
        let result = self.publish_file_inner(file, digest, size, check, actor);
        remove_leftover(file);
        result
    }

    fn publish_file_inner(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        check: &PublishCheck,
        actor: Option<&PublicKey>,
    ) -> Result<Published, HubError> {
        let signature = check.signature.as_ref();
        if let Some(sig) = signature {
            sig.verify(&digest).map_err(|e| {
                HubError::BadRequest(format!("the package signature by {} does not verify: {e}", sig.key))
            })?;
        }
        if let Some(e) = check.expected
            && e != digest
        {
            return Err(HubError::BadRequest(format!(
                "digest mismatch: the upload was announced as {e} but its bytes are {digest}"
            )));
        }
        let info: PackageInfo = inspect_reader(File::open(file)?, digest, size, &self.limits)?;
        let card = match &info.readme {
            Some(text) => Some(
                tessera_core::card::Card::parse(text)
                    .map_err(|e| HubError::BadRequest(format!("the package's README.md: {e}")))?,
            ),
            None => None,
        };
        let m = &info.manifest;
        let name = m.name.to_string();
        let version = m.version.clone();
        if let Some((n, v)) = &check.declared
            && (n != &name || v != &version.to_string())
        {
            return Err(HubError::BadRequest(format!(
                "the upload was declared as {n}@{v}, but the package's module.yaml says {name}@{version}"
            )));
        }
        // The record is read inside the write: a delete right after it must not turn a
        // successful publish into a "not found".
        let (created, record) = self.write_with_blob(&name, actor, (file, &digest), |tx| {
            let stored = existing(tx, &name, &version)?;
            if let Some(s) = &stored
                && let Some(e) = version_conflict(&name, &version, s, &digest)
            {
                return Err(e);
            }
            let created = match stored {
                Some((_, _, false)) => {
                    // The same bytes again: a no-op, but one that brings back a missing blob.
                    if !self.has_blob(&digest)? {
                        self.adopt(file, &digest)?;
                    }
                    false
                }
                Some((v, _, true)) => {
                    // The same bytes under a deleted version: live again, with the signer it
                    // was first published with (the module's `owner` role is its signer).
                    self.adopt(file, &digest)?;
                    tx.execute("UPDATE packages SET deleted = 0 WHERE name = ?1 AND version = ?2", params![name, v])?;
                    true
                }
                None => {
                    self.adopt(file, &digest)?;
                    insert_package(tx, m, &digest, size, signature, false, None)?;
                    if let Some(c) = &card {
                        let text = serde_json::to_string(c).map_err(|e| HubError::Storage(e.to_string()))?;
                        tx.execute(
                            "UPDATE packages SET card = ?3 WHERE name = ?1 AND version = ?2",
                            params![name, version.to_string(), text],
                        )?;
                    }
                    true
                }
            };
            Ok((created, get_exact(tx, &name, &version)?))
        })?;
        if created {
            tracing::info!(%name, %version, %digest, "package published");
        }
        Ok(Published { record, created })
    }

    /// Publishes a sealed (private) package held in a temporary file in the blob directory.
    /// The hub cannot read it: it records the public part of the publisher's declared
    /// manifest (name, version, kind, runtime, description, license, tags, needs; the rest
    /// travels sealed), checks the publisher's signature over the sealed bytes and
    /// ownership of the namespace, and grants its recipients (and only them) the right to
    /// download it.
    pub fn publish_private(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        declared: &Manifest,
        signature: &PackageSignature,
        actor: Option<&PublicKey>,
    ) -> Result<Published, HubError> {
        let result = self.publish_private_inner(file, digest, size, declared, signature, actor);
        remove_leftover(file);
        result
    }

    fn publish_private_inner(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        declared: &Manifest,
        signature: &PackageSignature,
        actor: Option<&PublicKey>,
    ) -> Result<Published, HubError> {
        if size > self.limits.max_package_bytes {
            return Err(HubError::TooLarge(format!(
                "{size} bytes, over the limit of {}",
                self.limits.max_package_bytes
            )));
        }
        signature.verify(&digest).map_err(|e| {
            HubError::BadRequest(format!("the package signature by {} does not verify: {e}", signature.key))
        })?;
        let mut head = Vec::new();
        {
            use std::io::Read;
            File::open(file)?.take(11 + (1 << 20)).read_to_end(&mut head)?;
        }
        let recipients = tessera_identity::seal::recipients(&head).map_err(|e| HubError::BadRequest(e.to_string()))?;
        let public = declared.public_part();
        let name = public.name.to_string();
        let version = public.version.clone();
        // In-process callers publish as the package's signer; the API always passes the
        // request's signer.
        let actor = actor.unwrap_or(&signature.key);
        // The record is read inside the write, as for public packages.
        let (created, record) = self.write_with_blob(&name, Some(actor), (file, &digest), |tx| {
            let created = (|| -> Result<bool, HubError> {
                let stored = existing(tx, &name, &version)?;
                if let Some(s) = &stored
                    && let Some(e) = version_conflict(&name, &version, s, &digest)
                {
                    return Err(e);
                }
                match stored {
                    Some((_, _, false)) => {
                        if !self.has_blob(&digest)? {
                            self.adopt(file, &digest)?;
                        }
                        return Ok(false);
                    }
                    Some((v, _, true)) => {
                        self.adopt(file, &digest)?;
                        tx.execute(
                            "UPDATE packages SET deleted = 0 WHERE name = ?1 AND version = ?2",
                            params![name, v],
                        )?;
                        return Ok(true);
                    }
                    None => {}
                }
                self.adopt(file, &digest)?;
                insert_package(tx, &public, &digest, size, Some(signature), true, Some(&recipients))?;
                // The publisher reads as an owner, not by a grant that would outlive its
                // ownership.
                for r in recipients.iter().filter(|r| *r != &signature.key) {
                    tx.execute(
                        "INSERT INTO grants (name, grantee, expires_ms, revoked) VALUES (?1, ?2, NULL, 0)
                         ON CONFLICT(name, grantee) DO NOTHING",
                        params![name, r.to_string()],
                    )?;
                }
                Ok(true)
            })()?;
            Ok((created, get_exact(tx, &name, &version)?))
        })?;
        Ok(Published { record, created })
    }

    /// The keys the live private versions of `name` were sealed for.
    pub(crate) fn recipients(&self, name: &str) -> Result<Vec<PublicKey>, HubError> {
        let rows: Vec<(String, Option<String>)> = self
            .db()
            .prepare("SELECT digest, recipients FROM packages WHERE name = ?1 AND private = 1 AND deleted = 0")?
            .query_map(params![name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out: Vec<PublicKey> = Vec::new();
        for (digest, stored) in rows {
            let keys: Vec<PublicKey> = match stored {
                Some(text) => serde_json::from_str::<Vec<String>>(&text)
                    .map_err(|e| HubError::Storage(e.to_string()))?
                    .iter()
                    .filter_map(|k| k.parse().ok())
                    .collect(),
                None => {
                    // Published before recipients were recorded: read the sealed header.
                    use std::io::Read;
                    let mut head = Vec::new();
                    File::open(self.blob_path(&parse_digest(&digest)?)?)?
                        .take(11 + (1 << 20))
                        .read_to_end(&mut head)?;
                    tessera_identity::seal::recipients(&head).map_err(|e| HubError::Storage(e.to_string()))?
                }
            };
            for k in keys {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        Ok(out)
    }

    /// Every live version of a package, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<PackageRecord>, HubError> {
        parse_name(name)?;
        let db = self.db();
        let mut stmt =
            db.prepare(&format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE name = ?1 AND deleted = 0"))?;
        let rows = stmt.query_map(params![name], package_row)?.collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(db);
        let mut out = rows.into_iter().map(|(r, _)| r.into_record()).collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.manifest.version.cmp(&b.manifest.version));
        Ok(out)
    }

    /// Resolves `name` with a version or alias.
    pub fn resolve(&self, name: &str, selector: &Selector) -> Result<PackageRecord, HubError> {
        parse_name(name)?;
        match selector {
            Selector::Exact(v) => get_exact(&self.db(), name, v),
            Selector::Alias(a) if a == LATEST => {
                let versions = self.versions(name)?;
                let best = latest(versions.iter().map(|r| &r.manifest.version)).cloned();
                best.and_then(|v| versions.into_iter().find(|r| r.manifest.version == v))
                    .ok_or_else(|| HubError::NotFound(format!("{name} has no published versions")))
            }
            Selector::Range(req) => {
                let versions = self.versions(name)?;
                let best =
                    tessera_core::version::highest_in(req, versions.iter().map(|r| &r.manifest.version)).cloned();
                best.and_then(|v| versions.into_iter().find(|r| r.manifest.version == v))
                    .ok_or_else(|| HubError::NotFound(format!("{name} has no published version in {req}")))
            }
            Selector::Alias(a) => {
                // The alias and its version read at one moment (another hub process may move
                // or delete them in between).
                let db = self.read_tx()?;
                let v: Option<String> = db
                    .query_row("SELECT version FROM aliases WHERE name = ?1 AND alias = ?2", params![name, a], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let v = v.ok_or_else(|| HubError::NotFound(format!("{name}@{a}: no such alias")))?;
                get_exact(&db, name, &parse_version(&v)?)
            }
        }
    }

    /// Resolves `name` and a version-or-alias string.
    pub fn resolve_str(&self, name: &str, version: &str) -> Result<PackageRecord, HubError> {
        let selector: Selector =
            version.parse().map_err(|e: tessera_core::version::RefError| HubError::BadRequest(e.to_string()))?;
        self.resolve(name, &selector)
    }

    /// Points an alias (not `latest`) at a published version, on behalf of `actor`.
    pub fn set_alias(
        &self,
        name: &str,
        alias: &str,
        version: &str,
        actor: Option<&PublicKey>,
    ) -> Result<PackageRecord, HubError> {
        parse_name(name)?;
        check_alias(alias).map_err(|e| HubError::BadRequest(e.to_string()))?;
        if alias == LATEST {
            return Err(HubError::BadRequest("`latest` is computed (the highest release) and cannot be set".into()));
        }
        let v = parse_version(version)?;
        self.write(name, actor, |tx| {
            let record = get_exact(tx, name, &v)?;
            tx.execute(
                "INSERT INTO aliases (name, alias, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version",
                params![name, alias, record.version],
            )?;
            Ok(record)
        })
    }

    /// The latest version of each package matching the filters (or every version).
    pub fn list(&self, q: &ListQuery) -> Result<Vec<PackageRecord>, HubError> {
        let kind = match &q.kind {
            Some(k) => Some(k.parse::<Kind>().map_err(HubError::BadRequest)?),
            None => None,
        };
        let filters = q.filters();
        // A batch of rows at a time, the database's lock only while a batch is read: only
        // the matching records are kept, without their cards' text.
        let mut all = Vec::new();
        self.scan_by_name("packages", PACKAGE_COLUMNS, "deleted = 0", package_row, |(row, _)| {
            let r = row.into_record()?;
            let under = q.prefix.as_ref().is_none_or(|p| r.manifest.name.has_prefix(p));
            if under && kind.is_none_or(|k| k == r.kind) && filters.accepts(&super::search::Facets::of_package(&r)) {
                all.push(strip_card_text(r));
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        if q.all {
            all.sort_by(|a, b| a.name.cmp(&b.name).then(a.manifest.version.cmp(&b.manifest.version)));
            return Ok(filters.page(all));
        }
        let mut out: Vec<PackageRecord> = Vec::new();
        for r in all {
            match out.last_mut() {
                Some(last) if last.name == r.name => {
                    let best = latest([&last.manifest.version, &r.manifest.version]).cloned();
                    if best.as_ref() == Some(&r.manifest.version) {
                        *last = r;
                    }
                }
                _ => out.push(r),
            }
        }
        Ok(filters.page(out))
    }

    /// The live record of a package digest or, when no package has it, of a
    /// transformation's, service's or inferencer's object that is a package (see
    /// [`HubStore::component_package`]; here with the package's own `needs`).
    ///
    /// # Errors
    /// [`HubError::NotFound`]; [`HubError::BadRequest`] when the digest is only such an
    /// entry's object and that is no package.
    pub fn by_digest(&self, digest: &Digest) -> Result<PackageRecord, HubError> {
        match self.published_by_digest(digest)? {
            Some(r) => Ok(r),
            None => self.component_object_package(digest)?.ok_or_else(|| HubError::NotFound(digest.to_string())),
        }
    }

    /// The live record of a published package by digest, if any.
    pub(crate) fn published_by_digest(&self, digest: &Digest) -> Result<Option<PackageRecord>, HubError> {
        let row = self
            .db()
            .query_row(
                &format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE digest = ?1 AND deleted = 0 LIMIT 1"),
                params![digest.to_string()],
                package_row,
            )
            .optional()?;
        row.map(|(r, _)| r.into_record()).transpose()
    }

    /// Deletes a version, on behalf of `actor`. Its number stays reserved for the same
    /// bytes.
    pub fn delete(&self, name: &str, version: &str, actor: Option<&PublicKey>) -> Result<PackageRecord, HubError> {
        parse_name(name)?;
        let v = parse_version(version)?;
        let record = self.write(name, actor, |tx| {
            let record = get_exact(tx, name, &v)?;
            tx.execute(
                "UPDATE packages SET deleted = 1 WHERE name = ?1 AND version = ?2",
                params![name, record.version],
            )?;
            tx.execute("DELETE FROM aliases WHERE name = ?1 AND version = ?2", params![name, record.version])?;
            Ok(record)
        })?;
        self.collect_blob(&record.digest)?;
        tracing::info!(%name, %version, "package deleted");
        Ok(record)
    }
}

impl HubStore {
    /// Counts a whole download of a package version.
    pub fn count_package_download(&self, name: &str, version: &str) -> Result<(), HubError> {
        self.db().execute(
            "UPDATE packages SET downloads = downloads + 1 WHERE name = ?1 AND version = ?2",
            params![name, version],
        )?;
        Ok(())
    }
}
