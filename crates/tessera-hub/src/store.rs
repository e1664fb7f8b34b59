//! The hub's storage: SQLite for metadata, a content-addressed directory for bytes.
//!
//! Invariants: a row never points at a blob that is not on disk (the blob is moved into
//! place before its row is inserted, in one transaction with the version check); a
//! version, once published, keeps its bytes forever (re-publishing other bytes is a
//! conflict, even after a delete).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tessera_core::registry::{ModelRecord, PackageRecord};
use tessera_core::version::{LATEST, Selector, Version, check_alias, latest};
use tessera_core::wire::Lineage;
use tessera_core::{Digest, Kind, Manifest, ModulePath};
use tessera_identity::{KeyPair, KeyType, PackageSignature, PublicKey};
use tessera_package::{Limits, PackageInfo, UnpackError, inspect_reader};
use tessera_ports::FsBlobStore;

use crate::time::now_rfc3339;

/// Why a hub operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No such package, version, alias, model or blob.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with what is stored (an immutable version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request is malformed (bad name, version, digest, package).
    #[error("{0}")]
    BadRequest(String),
    /// The package was refused.
    #[error("package refused: {0}")]
    Package(#[from] UnpackError),
    /// Over a size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The request is not signed, or its signature is refused.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The signer may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The account is over its quota.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// Storage failed.
    #[error("hub storage: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for HubError {
    fn from(e: rusqlite::Error) -> Self {
        HubError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for HubError {
    fn from(e: std::io::Error) -> Self {
        HubError::Storage(e.to_string())
    }
}

impl From<tessera_ports::BlobError> for HubError {
    fn from(e: tessera_ports::BlobError) -> Self {
        HubError::Storage(e.to_string())
    }
}

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
    /// Text to find in the name or description.
    pub q: Option<String>,
    /// Every version instead of the latest of each package.
    #[serde(default)]
    pub all: bool,
}

/// A grant: the right to read a private package's ciphertext.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct GrantRecord {
    /// The package name (all its versions).
    pub name: String,
    /// Who may read it.
    pub grantee: String,
    /// When the grant ends (milliseconds since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
    /// True once revoked.
    pub revoked: bool,
}

/// What an account has used on a hub.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsageRecord {
    /// The account (a public key).
    pub account: String,
    /// Signed requests.
    pub requests: u64,
    /// Bytes uploaded.
    pub bytes_in: u64,
    /// Bytes downloaded.
    pub bytes_out: u64,
}

/// What publishing did.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// The record.
    pub record: PackageRecord,
    /// False when this exact package was already published (publishing is idempotent).
    pub created: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS packages (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    runtime TEXT NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    manifest TEXT NOT NULL,
    published_at TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS packages_digest ON packages(digest);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT,
    size INTEGER,
    metadata TEXT NOT NULL,
    lineage TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS models_digest ON models(digest);
CREATE TABLE IF NOT EXISTS namespaces (
    namespace TEXT PRIMARY KEY,
    owners TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    name TEXT NOT NULL,
    grantee TEXT NOT NULL,
    expires_ms INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, grantee)
);
CREATE TABLE IF NOT EXISTS usage (
    account TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0
);
";

/// Columns added after the first schema, with their definitions (added to older databases
/// when they are opened).
const ADDED_COLUMNS: [(&str, &str, &str); 3] = [
    ("packages", "signer", "TEXT"),
    ("packages", "signature", "TEXT"),
    ("packages", "private", "INTEGER NOT NULL DEFAULT 0"),
];

/// A `models` row: name, version, digest, size, metadata, lineage, created_at.
type ModelRow = (String, String, Option<String>, Option<i64>, String, Option<String>, String);

/// The hub's store.
pub struct HubStore {
    db: Mutex<Connection>,
    blobs: FsBlobStore,
    limits: Limits,
    dir: PathBuf,
    key: KeyPair,
}

fn parse_name(name: &str) -> Result<ModulePath, HubError> {
    name.parse().map_err(|e: tessera_core::name::NameError| HubError::BadRequest(e.to_string()))
}

fn parse_version(v: &str) -> Result<Version, HubError> {
    Version::parse(v)
        .map_err(|e| HubError::BadRequest(format!("invalid version {v:?}: {e} (versions are semver, e.g. 0.1.0)")))
}

fn parse_digest(d: &str) -> Result<Digest, HubError> {
    d.parse().map_err(|e: tessera_core::digest::DigestError| HubError::BadRequest(e.to_string()))
}

fn package_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(PackageRow, bool)> {
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
        },
        row.get::<_, i64>(6)? != 0,
    ))
}

const PACKAGE_COLUMNS: &str =
    "name, version, digest, size, manifest, published_at, deleted, signer, signature, private";

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
}

impl PackageRow {
    fn into_record(self) -> Result<PackageRecord, HubError> {
        let manifest: Manifest =
            serde_json::from_str(&self.manifest).map_err(|e| HubError::Storage(format!("stored manifest: {e}")))?;
        Ok(PackageRecord {
            name: self.name,
            version: self.version,
            digest: parse_digest(&self.digest)?,
            size: self.size as u64,
            kind: manifest.kind,
            runtime: manifest.runtime,
            description: manifest.description.clone(),
            tags: manifest.tags.clone(),
            published_at: self.published_at,
            manifest,
            signer: self.signer,
            signature: self.signature,
            private: self.private,
        })
    }
}

impl HubStore {
    /// Opens (or creates) a hub in `dir`: `dir/hub.sqlite` and `dir/blobs/`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, HubError> {
        Self::open_with_limits(dir, Limits::default())
    }

    /// Opens a hub with package limits.
    pub fn open_with_limits(dir: impl Into<PathBuf>, limits: Limits) -> Result<Self, HubError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let conn = Connection::open(dir.join("hub.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, def) in ADDED_COLUMNS {
            let exists: bool = conn.query_row(
                &format!("SELECT EXISTS(SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
                params![column],
                |r| r.get(0),
            )?;
            if !exists {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
            }
        }
        let keys = tessera_identity::keystore::Keystore::open(dir.join("identity"))
            .map_err(|e| HubError::Storage(e.to_string()))?;
        let key = match keys.load("hub", None) {
            Ok(k) => k,
            Err(tessera_identity::keystore::KeystoreError::NotFound(_)) => {
                keys.create("hub", KeyType::Ed25519, None).map_err(|e| HubError::Storage(e.to_string()))?;
                keys.load("hub", None).map_err(|e| HubError::Storage(e.to_string()))?
            }
            Err(e) => return Err(HubError::Storage(format!("the hub's key: {e}"))),
        };
        let blobs = FsBlobStore::open(dir.join("blobs"))?;
        Ok(HubStore { db: Mutex::new(conn), blobs, limits, dir, key })
    }

    /// The hub's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The package limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The blob directory.
    pub fn blobs(&self) -> &FsBlobStore {
        &self.blobs
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes package bytes held in memory. `expected`, when given, must be their digest.
    pub fn publish(
        &self,
        bytes: &[u8],
        expected: Option<Digest>,
        signature: Option<&PackageSignature>,
    ) -> Result<Published, HubError> {
        let tmp = self.blobs.temp_path();
        std::fs::write(&tmp, bytes)?;
        let digest = Digest::of(bytes);
        let result = self.publish_file(&tmp, digest, bytes.len() as u64, expected, signature);
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Publishes a package already written to a temporary file inside the blob directory
    /// (see [`FsBlobStore::temp_path`]), whose digest and size the caller computed while
    /// writing it. The file is moved into the store or removed.
    pub fn publish_file(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        expected: Option<Digest>,
        signature: Option<&PackageSignature>,
    ) -> Result<Published, HubError> {
        let result = self.publish_file_inner(file, digest, size, expected, signature);
        remove_leftover(file);
        result
    }

    fn publish_file_inner(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        expected: Option<Digest>,
        signature: Option<&PackageSignature>,
    ) -> Result<Published, HubError> {
        if let Some(sig) = signature {
            sig.verify(&digest).map_err(|e| {
                HubError::BadRequest(format!("the package signature by {} does not verify: {e}", sig.key))
            })?;
        }
        if let Some(e) = expected
            && e != digest
        {
            return Err(HubError::BadRequest(format!(
                "digest mismatch: the upload was announced as {e} but its bytes are {digest}"
            )));
        }
        let info: PackageInfo = inspect_reader(File::open(file)?, digest, size, &self.limits)?;
        let m = &info.manifest;
        let name = m.name.to_string();
        let version = m.version.to_string();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<(String, bool)> = tx
            .query_row(
                "SELECT digest, deleted FROM packages WHERE name = ?1 AND version = ?2",
                params![name, version],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?;
        if let Some((d, deleted)) = &existing
            && d != &digest.to_string()
        {
            let why = if *deleted { " (it was deleted; versions are never reused)" } else { "" };
            return Err(HubError::Conflict(format!(
                "{name}@{version} is already published as {d}{why}; versions are immutable: publish a new version"
            )));
        }
        // The namespace (first segment) belongs to the first key that published in it.
        let namespace = m.name.segments().next().unwrap_or_default().to_owned();
        Self::claim_or_check(&tx, &namespace, signature.map(|s| &s.key))?;
        let (signer, sig_text) = match signature {
            Some(s) => (Some(s.key.to_string()), Some(s.sig.to_text())),
            None => (None, None),
        };
        let created = match existing {
            Some((_, false)) => false,
            Some((_, true)) => {
                self.blobs.adopt_file(file, &digest)?;
                tx.execute(
                    "UPDATE packages SET deleted = 0, signer = ?3, signature = ?4 WHERE name = ?1 AND version = ?2",
                    params![name, version, signer, sig_text],
                )?;
                true
            }
            None => {
                self.blobs.adopt_file(file, &digest)?;
                Self::insert_package(&tx, m, &digest, size, signer, sig_text, false)?;
                true
            }
        };
        tx.commit()?;
        drop(db);
        if created {
            tracing::info!(%name, %version, %digest, "package published");
        }
        let record = self.get_exact(&name, &version)?;
        Ok(Published { record, created })
    }

    /// Publishes a sealed (private) package held in a temporary file in the blob directory.
    /// The hub cannot read it: it records the publisher's declared manifest, checks the
    /// publisher's signature over the sealed bytes and ownership of the namespace, and
    /// grants its recipients (and only them) the right to download it.
    pub fn publish_private(
        &self,
        file: &Path,
        digest: Digest,
        size: u64,
        declared: &Manifest,
        signature: &PackageSignature,
    ) -> Result<Published, HubError> {
        let result = self.publish_private_inner(file, digest, size, declared, signature);
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
        let name = declared.name.to_string();
        let version = declared.version.to_string();
        let namespace = declared.name.segments().next().unwrap_or_default().to_owned();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .query_row("SELECT digest FROM packages WHERE name = ?1 AND version = ?2", params![name, version], |r| {
                r.get(0)
            })
            .optional()?;
        match &existing {
            Some(d) if d != &digest.to_string() => {
                return Err(HubError::Conflict(format!(
                    "{name}@{version} is already published as {d}; versions are immutable"
                )));
            }
            _ => {}
        }
        Self::claim_or_check(&tx, &namespace, Some(&signature.key))?;
        let created = existing.is_none();
        if created {
            self.blobs.adopt_file(file, &digest)?;
            Self::insert_package(
                &tx,
                declared,
                &digest,
                size,
                Some(signature.key.to_string()),
                Some(signature.sig.to_text()),
                true,
            )?;
            for r in &recipients {
                tx.execute(
                    "INSERT INTO grants (name, grantee, expires_ms, revoked) VALUES (?1, ?2, NULL, 0)
                     ON CONFLICT(name, grantee) DO NOTHING",
                    params![name, r.to_string()],
                )?;
            }
        }
        tx.commit()?;
        drop(db);
        Ok(Published { record: self.get_exact(&name, &version)?, created })
    }

    /// The grants of a package.
    pub fn grants(&self, name: &str) -> Result<Vec<GrantRecord>, HubError> {
        parse_name(name)?;
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT grantee, expires_ms, revoked FROM grants WHERE name = ?1 ORDER BY grantee")?;
        let rows = stmt
            .query_map(params![name], |r| {
                Ok(GrantRecord {
                    name: name.to_owned(),
                    grantee: r.get(0)?,
                    expires_ms: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                    revoked: r.get::<_, i64>(2)? != 0,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Grants (or renews) `grantee` the right to read `name`, until `expires_ms` if given.
    pub fn set_grant(&self, name: &str, grantee: &PublicKey, expires_ms: Option<u64>) -> Result<GrantRecord, HubError> {
        parse_name(name)?;
        self.db().execute(
            "INSERT INTO grants (name, grantee, expires_ms, revoked) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT(name, grantee) DO UPDATE SET expires_ms = excluded.expires_ms, revoked = 0",
            params![name, grantee.to_string(), expires_ms.map(|v| v as i64)],
        )?;
        Ok(GrantRecord { name: name.to_owned(), grantee: grantee.to_string(), expires_ms, revoked: false })
    }

    /// Revokes a grant.
    pub fn revoke(&self, name: &str, grantee: &PublicKey) -> Result<GrantRecord, HubError> {
        parse_name(name)?;
        let n = self.db().execute(
            "UPDATE grants SET revoked = 1 WHERE name = ?1 AND grantee = ?2",
            params![name, grantee.to_string()],
        )?;
        if n == 0 {
            return Err(HubError::NotFound(format!("no grant of {name} to {grantee}")));
        }
        Ok(GrantRecord { name: name.to_owned(), grantee: grantee.to_string(), expires_ms: None, revoked: true })
    }

    /// Checks that `reader` may download a package's bytes: anyone for a public package;
    /// for a private one, an owner of its namespace or a holder of a live grant.
    pub fn check_read(&self, record: &PackageRecord, reader: Option<&PublicKey>, now_ms: u64) -> Result<(), HubError> {
        if !record.private {
            return Ok(());
        }
        let Some(reader) = reader else {
            return Err(HubError::Unauthorized(format!(
                "{} is private: sign the request with a key it was granted to",
                record.name
            )));
        };
        if self.authorize(&record.name, Some(reader)).is_ok()
            && self.owners(record.name.split('.').next().unwrap_or_default())?.is_some()
        {
            return Ok(());
        }
        let grant = self.grants(&record.name)?.into_iter().find(|g| g.grantee == reader.to_string());
        match grant {
            Some(g) if g.revoked => {
                Err(HubError::Forbidden(format!("the grant of {} to {reader} was revoked", record.name)))
            }
            Some(g) if g.expires_ms.is_some_and(|e| e <= now_ms) => {
                Err(HubError::Forbidden(format!("the grant of {} to {reader} has expired", record.name)))
            }
            Some(_) => Ok(()),
            None => Err(HubError::Forbidden(format!("{reader} has no grant to read {}", record.name))),
        }
    }

    /// Counts requests and bytes for an account.
    pub fn meter(&self, account: &PublicKey, requests: u64, bytes_in: u64, bytes_out: u64) -> Result<(), HubError> {
        self.db().execute(
            "INSERT INTO usage (account, requests, bytes_in, bytes_out) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(account) DO UPDATE SET requests = requests + ?2, bytes_in = bytes_in + ?3, bytes_out = bytes_out + ?4",
            params![account.to_string(), requests as i64, bytes_in as i64, bytes_out as i64],
        )?;
        Ok(())
    }

    /// What an account has used.
    pub fn usage(&self, account: &PublicKey) -> Result<UsageRecord, HubError> {
        let row = self
            .db()
            .query_row(
                "SELECT requests, bytes_in, bytes_out FROM usage WHERE account = ?1",
                params![account.to_string()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
            )
            .optional()?;
        let (requests, bytes_in, bytes_out) = row.unwrap_or_default();
        Ok(UsageRecord {
            account: account.to_string(),
            requests: requests as u64,
            bytes_in: bytes_in as u64,
            bytes_out: bytes_out as u64,
        })
    }

    /// Inserts a package row (inside the caller's transaction).
    #[allow(clippy::too_many_arguments)]
    fn insert_package(
        tx: &rusqlite::Transaction<'_>,
        m: &Manifest,
        digest: &Digest,
        size: u64,
        signer: Option<String>,
        signature: Option<String>,
        private: bool,
    ) -> Result<(), HubError> {
        let manifest = serde_json::to_string(m).map_err(|e| HubError::Storage(e.to_string()))?;
        tx.execute(
            "INSERT INTO packages (name, version, digest, size, kind, runtime, description, tags, manifest, published_at, signer, signature, private)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                m.name.to_string(),
                m.version.to_string(),
                digest.to_string(),
                size as i64,
                m.kind.as_str(),
                m.runtime.as_str(),
                m.description,
                serde_json::to_string(&m.tags).unwrap_or_default(),
                manifest,
                now_rfc3339(),
                signer,
                signature,
                i64::from(private),
            ],
        )?;
        Ok(())
    }

    /// Checks a publisher against a namespace's owners, claiming the namespace for it when
    /// unclaimed (inside the caller's transaction). Unsigned publishing is allowed only in
    /// unclaimed namespaces, and claims nothing.
    fn claim_or_check(
        tx: &rusqlite::Transaction<'_>,
        namespace: &str,
        publisher: Option<&PublicKey>,
    ) -> Result<(), HubError> {
        match (Self::owners_in(tx, namespace)?, publisher) {
            (Some(owners), Some(p)) if owners.contains(p) => Ok(()),
            (Some(owners), _) => Err(HubError::Forbidden(format!(
                "namespace {namespace:?} belongs to {}; packages there must be signed by an owner",
                owners.iter().map(PublicKey::to_string).collect::<Vec<_>>().join(", ")
            ))),
            (None, Some(p)) => {
                tx.execute(
                    "INSERT INTO namespaces (namespace, owners) VALUES (?1, ?2)",
                    params![namespace, serde_json::to_string(&vec![p.to_string()]).unwrap_or_default()],
                )?;
                tracing::info!(%namespace, owner = %p, "namespace claimed");
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// The hub's own key (the audience of signed requests).
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    fn owners_in(conn: &Connection, namespace: &str) -> Result<Option<Vec<PublicKey>>, HubError> {
        let text: Option<String> = conn
            .query_row("SELECT owners FROM namespaces WHERE namespace = ?1", params![namespace], |r| r.get(0))
            .optional()?;
        match text {
            None => Ok(None),
            Some(t) => {
                let keys: Vec<String> = serde_json::from_str(&t).map_err(|e| HubError::Storage(e.to_string()))?;
                let keys = keys
                    .iter()
                    .map(|k| k.parse())
                    .collect::<Result<Vec<PublicKey>, _>>()
                    .map_err(|e| HubError::Storage(e.to_string()))?;
                Ok(Some(keys))
            }
        }
    }

    /// The owners of a namespace (`None`: nobody has claimed it).
    pub fn owners(&self, namespace: &str) -> Result<Option<Vec<PublicKey>>, HubError> {
        Self::owners_in(&self.db(), namespace)
    }

    /// Checks that `actor` may change things under `name`'s namespace: an owner, or anyone
    /// while the namespace is unclaimed.
    pub fn authorize(&self, name: &str, actor: Option<&PublicKey>) -> Result<(), HubError> {
        let namespace = name.split('.').next().unwrap_or_default();
        match (self.owners(namespace)?, actor) {
            (None, _) => Ok(()),
            (Some(owners), Some(a)) if owners.contains(a) => Ok(()),
            (Some(_), None) => Err(HubError::Unauthorized(format!(
                "namespace {namespace:?} is owned: sign the request with an owner's key"
            ))),
            (Some(_), Some(a)) => Err(HubError::Forbidden(format!("{a} is not an owner of namespace {namespace:?}"))),
        }
    }

    /// Adds `key` to a namespace's owners (claiming it for `actor` and `key` when
    /// unclaimed). Only owners may add owners.
    pub fn add_owner(&self, namespace: &str, actor: &PublicKey, key: &PublicKey) -> Result<Vec<PublicKey>, HubError> {
        tessera_core::name::check_ident("namespace", namespace).map_err(|e| HubError::BadRequest(e.to_string()))?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut owners = match Self::owners_in(&tx, namespace)? {
            Some(o) if o.contains(actor) => o,
            Some(_) => return Err(HubError::Forbidden(format!("{actor} is not an owner of namespace {namespace:?}"))),
            None => vec![actor.clone()],
        };
        if !owners.contains(key) {
            owners.push(key.clone());
        }
        let text =
            serde_json::to_string(&owners.iter().map(PublicKey::to_string).collect::<Vec<_>>()).unwrap_or_default();
        tx.execute(
            "INSERT INTO namespaces (namespace, owners) VALUES (?1, ?2) ON CONFLICT(namespace) DO UPDATE SET owners = excluded.owners",
            params![namespace, text],
        )?;
        tx.commit()?;
        Ok(owners)
    }

    /// Removes `key` from a namespace's owners; the last owner stays.
    pub fn remove_owner(
        &self,
        namespace: &str,
        actor: &PublicKey,
        key: &PublicKey,
    ) -> Result<Vec<PublicKey>, HubError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut owners = match Self::owners_in(&tx, namespace)? {
            Some(o) if o.contains(actor) => o,
            Some(_) => return Err(HubError::Forbidden(format!("{actor} is not an owner of namespace {namespace:?}"))),
            None => return Err(HubError::NotFound(format!("namespace {namespace:?} has no owners"))),
        };
        owners.retain(|k| k != key);
        if owners.is_empty() {
            return Err(HubError::BadRequest("a namespace keeps at least one owner".into()));
        }
        let text =
            serde_json::to_string(&owners.iter().map(PublicKey::to_string).collect::<Vec<_>>()).unwrap_or_default();
        tx.execute("UPDATE namespaces SET owners = ?2 WHERE namespace = ?1", params![namespace, text])?;
        tx.commit()?;
        Ok(owners)
    }

    fn get_exact(&self, name: &str, version: &str) -> Result<PackageRecord, HubError> {
        let row = self
            .db()
            .query_row(
                &format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE name = ?1 AND version = ?2"),
                params![name, version],
                package_row,
            )
            .optional()?;
        match row {
            Some((r, false)) => r.into_record(),
            _ => Err(HubError::NotFound(format!("{name}@{version}"))),
        }
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
            Selector::Exact(v) => self.get_exact(name, &v.to_string()),
            Selector::Alias(a) if a == LATEST => {
                let versions = self.versions(name)?;
                let best = latest(versions.iter().map(|r| &r.manifest.version)).cloned();
                best.and_then(|v| versions.into_iter().find(|r| r.manifest.version == v))
                    .ok_or_else(|| HubError::NotFound(format!("{name} has no published versions")))
            }
            Selector::Alias(a) => {
                let v: Option<String> = self
                    .db()
                    .query_row("SELECT version FROM aliases WHERE name = ?1 AND alias = ?2", params![name, a], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let v = v.ok_or_else(|| HubError::NotFound(format!("{name}@{a}: no such alias")))?;
                self.get_exact(name, &v)
            }
        }
    }

    /// Resolves `name` and a version-or-alias string.
    pub fn resolve_str(&self, name: &str, version: &str) -> Result<PackageRecord, HubError> {
        let selector: Selector =
            version.parse().map_err(|e: tessera_core::version::RefError| HubError::BadRequest(e.to_string()))?;
        self.resolve(name, &selector)
    }

    /// Points an alias (not `latest`) at a published version.
    pub fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<PackageRecord, HubError> {
        check_alias(alias).map_err(|e| HubError::BadRequest(e.to_string()))?;
        if alias == LATEST {
            return Err(HubError::BadRequest("`latest` is computed (the highest release) and cannot be set".into()));
        }
        parse_version(version)?;
        let record = self.get_exact(name, version)?;
        self.db().execute(
            "INSERT INTO aliases (name, alias, version) VALUES (?1, ?2, ?3)
             ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version",
            params![name, alias, version],
        )?;
        Ok(record)
    }

    /// The latest version of each package matching the filters (or every version).
    pub fn list(&self, q: &ListQuery) -> Result<Vec<PackageRecord>, HubError> {
        let kind = match &q.kind {
            Some(k) => Some(k.parse::<Kind>().map_err(HubError::BadRequest)?),
            None => None,
        };
        let db = self.db();
        let mut stmt =
            db.prepare(&format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE deleted = 0 ORDER BY name"))?;
        let rows = stmt.query_map([], package_row)?.collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(db);
        let mut all = Vec::new();
        for (row, _) in rows {
            let r = row.into_record()?;
            if let Some(p) = &q.prefix
                && !r.manifest.name.has_prefix(p)
            {
                continue;
            }
            if let Some(t) = &q.tag
                && !r.tags.iter().any(|x| x == t)
            {
                continue;
            }
            if kind.is_some_and(|k| k != r.kind) {
                continue;
            }
            if let Some(text) = &q.q {
                let text = text.to_lowercase();
                if !r.name.contains(&text) && !r.description.to_lowercase().contains(&text) {
                    continue;
                }
            }
            all.push(r);
        }
        if q.all {
            all.sort_by(|a, b| a.name.cmp(&b.name).then(a.manifest.version.cmp(&b.manifest.version)));
            return Ok(all);
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
        Ok(out)
    }

    /// The live record of a package digest.
    pub fn by_digest(&self, digest: &Digest) -> Result<PackageRecord, HubError> {
        let row = self
            .db()
            .query_row(
                &format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE digest = ?1 AND deleted = 0 LIMIT 1"),
                params![digest.to_string()],
                package_row,
            )
            .optional()?;
        row.map(|(r, _)| r.into_record()).transpose()?.ok_or_else(|| HubError::NotFound(digest.to_string()))
    }

    /// True when a live package or a model uses the blob.
    fn blob_in_use(&self, digest: &Digest) -> Result<bool, HubError> {
        Ok(self.db().query_row(
            "SELECT EXISTS(SELECT 1 FROM packages WHERE digest = ?1 AND deleted = 0)
                 OR EXISTS(SELECT 1 FROM models WHERE digest = ?1)",
            params![digest.to_string()],
            |r| r.get(0),
        )?)
    }

    /// The file holding a blob the hub serves (a live package or a model binary).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, HubError> {
        let path = self.blobs.path_of(digest);
        if !self.blob_in_use(digest)? || !path.exists() {
            return Err(HubError::NotFound(digest.to_string()));
        }
        Ok(path)
    }

    /// Reads a served blob, verifying its digest.
    pub fn blob_bytes(&self, digest: &Digest) -> Result<Vec<u8>, HubError> {
        let bytes = std::fs::read(self.blob_path(digest)?)?;
        if &Digest::of(&bytes) != digest {
            return Err(HubError::Storage(format!("blob {digest} is corrupt on disk")));
        }
        Ok(bytes)
    }

    /// Deletes a version. Its number stays reserved for the same bytes.
    pub fn delete(&self, name: &str, version: &str) -> Result<PackageRecord, HubError> {
        parse_name(name)?;
        parse_version(version)?;
        let record = self.get_exact(name, version)?;
        {
            let db = self.db();
            db.execute("UPDATE packages SET deleted = 1 WHERE name = ?1 AND version = ?2", params![name, version])?;
            db.execute("DELETE FROM aliases WHERE name = ?1 AND version = ?2", params![name, version])?;
        }
        self.collect_blob(&record.digest)?;
        tracing::info!(%name, %version, "package deleted");
        Ok(record)
    }

    /// Removes a blob nothing uses any more.
    fn collect_blob(&self, digest: &Digest) -> Result<(), HubError> {
        if !self.blob_in_use(digest)? {
            let _ = std::fs::remove_file(self.blobs.path_of(digest));
        }
        Ok(())
    }

    // ---- models ----

    fn model_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ModelRow> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?))
    }

    fn model_record(
        (name, version, digest, size, metadata, lineage, created_at): ModelRow,
    ) -> Result<ModelRecord, HubError> {
        Ok(ModelRecord {
            name,
            version,
            digest: digest.map(|d| parse_digest(&d)).transpose()?,
            size: size.map(|s| s as u64),
            metadata: serde_json::from_str(&metadata).map_err(|e| HubError::Storage(e.to_string()))?,
            lineage: lineage
                .map(|l| serde_json::from_str(&l))
                .transpose()
                .map_err(|e| HubError::Storage(e.to_string()))?,
            created_at,
        })
    }

    /// Creates a model record (no binary yet). Exists already: conflict.
    pub fn create_model(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
    ) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        parse_version(version)?;
        if !metadata.is_object() {
            return Err(HubError::BadRequest("model metadata must be a JSON object".into()));
        }
        let lineage = lineage.map(|l| serde_json::to_string(l).unwrap_or_default());
        let n = self.db().execute(
            "INSERT OR IGNORE INTO models (name, version, metadata, lineage, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, version, metadata.to_string(), lineage, now_rfc3339()],
        )?;
        if n == 0 {
            return Err(HubError::Conflict(format!("model {name}@{version} exists already")));
        }
        self.model(name, version)
    }

    /// Updates a model's metadata (and lineage, when given). The binary never changes.
    pub fn update_model_meta(
        &self,
        name: &str,
        version: &str,
        metadata: &Value,
        lineage: Option<&Lineage>,
    ) -> Result<ModelRecord, HubError> {
        if !metadata.is_object() {
            return Err(HubError::BadRequest("model metadata must be a JSON object".into()));
        }
        let current = self.model(name, version)?;
        let lineage = lineage.map(|l| serde_json::to_string(l).unwrap_or_default());
        self.db().execute(
            "UPDATE models SET metadata = ?3, lineage = COALESCE(?4, lineage) WHERE name = ?1 AND version = ?2",
            params![current.name, current.version, metadata.to_string(), lineage],
        )?;
        self.model(name, &current.version)
    }

    /// Stores a model's binary from a temporary file in the blob directory (digest and size
    /// computed by the caller). Creates the record if needed; a record that already has
    /// other bytes is a conflict.
    pub fn put_model_file(
        &self,
        name: &str,
        version: &str,
        file: &Path,
        digest: Digest,
        size: u64,
    ) -> Result<(ModelRecord, bool), HubError> {
        let result = self.put_model_file_inner(name, version, file, digest, size);
        remove_leftover(file);
        result
    }

    fn put_model_file_inner(
        &self,
        name: &str,
        version: &str,
        file: &Path,
        digest: Digest,
        size: u64,
    ) -> Result<(ModelRecord, bool), HubError> {
        parse_name(name)?;
        parse_version(version)?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<Option<String>> = tx
            .query_row("SELECT digest FROM models WHERE name = ?1 AND version = ?2", params![name, version], |r| {
                r.get(0)
            })
            .optional()?;
        let created = match existing {
            Some(Some(d)) if d == digest.to_string() => false,
            Some(Some(d)) => {
                return Err(HubError::Conflict(format!(
                    "model {name}@{version} already has a binary ({d}); binaries are immutable: push a new version"
                )));
            }
            Some(None) => {
                self.blobs.adopt_file(file, &digest)?;
                tx.execute(
                    "UPDATE models SET digest = ?3, size = ?4 WHERE name = ?1 AND version = ?2",
                    params![name, version, digest.to_string(), size as i64],
                )?;
                true
            }
            None => {
                self.blobs.adopt_file(file, &digest)?;
                tx.execute(
                    "INSERT INTO models (name, version, digest, size, metadata, created_at) VALUES (?1, ?2, ?3, ?4, '{}', ?5)",
                    params![name, version, digest.to_string(), size as i64, now_rfc3339()],
                )?;
                true
            }
        };
        tx.commit()?;
        drop(db);
        Ok((self.model(name, version)?, created))
    }

    /// Stores a model's binary held in memory.
    pub fn put_model(&self, name: &str, version: &str, bytes: &[u8]) -> Result<(ModelRecord, bool), HubError> {
        let tmp = self.blobs.temp_path();
        std::fs::write(&tmp, bytes)?;
        self.put_model_file(name, version, &tmp, Digest::of(bytes), bytes.len() as u64)
    }

    /// A model record; `version` may be `latest`.
    pub fn model(&self, name: &str, version: &str) -> Result<ModelRecord, HubError> {
        parse_name(name)?;
        let version = if version == LATEST {
            let all = self.models(Some(name))?;
            let versions: Vec<Version> =
                all.iter().filter(|m| m.name == name).filter_map(|m| Version::parse(&m.version).ok()).collect();
            latest(&versions)
                .map(|v| v.to_string())
                .ok_or_else(|| HubError::NotFound(format!("model {name} has no versions")))?
        } else {
            parse_version(version)?;
            version.to_owned()
        };
        let row = self
            .db()
            .query_row(
                "SELECT name, version, digest, size, metadata, lineage, created_at FROM models WHERE name = ?1 AND version = ?2",
                params![name, version],
                Self::model_row,
            )
            .optional()?;
        row.map(Self::model_record).transpose()?.ok_or_else(|| HubError::NotFound(format!("model {name}@{version}")))
    }

    /// Models whose name has `prefix` (by segments), sorted by name and version.
    pub fn models(&self, prefix: Option<&str>) -> Result<Vec<ModelRecord>, HubError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT name, version, digest, size, metadata, lineage, created_at FROM models ORDER BY name")?;
        let rows = stmt.query_map([], Self::model_row)?.collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(db);
        let mut out = Vec::new();
        for row in rows {
            let m = Self::model_record(row)?;
            let keep = match prefix {
                Some(p) => m.name.parse::<ModulePath>().is_ok_and(|n| n.has_prefix(p)),
                None => true,
            };
            if keep {
                out.push(m);
            }
        }
        out.sort_by(|a, b| {
            a.name.cmp(&b.name).then_with(|| match (Version::parse(&a.version), Version::parse(&b.version)) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.version.cmp(&b.version),
            })
        });
        Ok(out)
    }

    /// The next free patch version of a model: `0.1.0` for a new model, else the latest
    /// version with its patch number raised.
    pub fn next_model_version(&self, name: &str) -> Result<String, HubError> {
        let current = match self.model(name, LATEST) {
            Ok(m) => Some(parse_version(&m.version)?),
            Err(HubError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(tessera_core::version::next_patch(current.as_ref()).to_string())
    }

    /// Deletes a model and, when nothing else uses it, its binary.
    pub fn delete_model(&self, name: &str, version: &str) -> Result<ModelRecord, HubError> {
        let m = self.model(name, version)?;
        self.db().execute("DELETE FROM models WHERE name = ?1 AND version = ?2", params![m.name, m.version])?;
        if let Some(d) = &m.digest {
            self.collect_blob(d)?;
        }
        Ok(m)
    }
}

/// Removes a temporary upload file that was not moved into the store.
fn remove_leftover(file: &Path) {
    if file.exists() {
        let _ = std::fs::remove_file(file);
    }
}
