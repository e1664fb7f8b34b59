//! The hub's storage: SQLite for metadata, a content-addressed directory for bytes.
//!
//! Invariants:
//! - a row never points at a blob that is not on disk (the blob is moved into place before
//!   its row is written, in the transaction that checks the version);
//! - a version, once published, keeps its bytes forever (other bytes under it are a
//!   conflict, even after a delete), for packages and models alike; versions that differ
//!   only in build metadata (`1.0.0` and `1.0.0+hotfix`) are one version, as semver says;
//! - every write goes through [`HubStore::write`]: one transaction that applies the
//!   namespace rule (the first signed write under a namespace claims it, whatever it writes;
//!   then only its owners change anything in it) and the write itself, so a refused write
//!   leaves no trace, its claim included.

mod accounts;
pub(crate) mod cache;
mod component_packages;
pub(crate) mod components;
pub(crate) mod db;
mod directory;
mod dump;
mod grants;
pub(crate) mod models;
mod namespaces;
mod nonces;
mod packages;
mod pending;
pub(crate) mod search;
mod tls;
pub(crate) mod uploads;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use db::{Conn, OptionalExtension as _, Tx, TxKind, params};
use tessera_core::version::{BuildMetadata, Version};
use tessera_core::{Digest, ModulePath};
use tessera_identity::{KeyPair, KeyType, PublicKey};
use tessera_package::{Limits, UnpackError};
use tessera_ports::FsBlobStore;

pub use accounts::UsageRecord;
pub use cache::{Download, SharedDownload};
pub use components::{Collection, ComponentNeeds, ComponentRecord, ObjectUpload, Revision};
pub use directory::OpenChecks;
pub use dump::{DumpSummary, ShareBlob, SharedRestore};
pub use grants::GrantRecord;
pub use models::ModelUpload;
pub use packages::{ListQuery, PublishCheck, Published};
pub use search::Filters;

pub use uploads::UploadRecord;

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
    /// The account has as many uploads in progress as it may: try again shortly.
    #[error("busy: {0}")]
    Busy(String),
    /// Storage failed.
    #[error("hub storage: {0}")]
    Storage(String),
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
CREATE TABLE IF NOT EXISTS components (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    document TEXT NOT NULL,
    signer TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE TABLE IF NOT EXISTS component_revisions (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    signer TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (collection, key, revision)
);
CREATE INDEX IF NOT EXISTS component_revisions_digest ON component_revisions(digest);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    touched INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    signer TEXT NOT NULL,
    nonce TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces(expires_ms);
CREATE TABLE IF NOT EXISTS pending_blobs (
    token TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
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
const ADDED_COLUMNS: [(&str, &str, &str); 13] = [
    ("packages", "signer", "TEXT"),
    ("packages", "signature", "TEXT"),
    ("packages", "private", "INTEGER NOT NULL DEFAULT 0"),
    // The version without build metadata: versions are one when these are equal.
    ("packages", "vkey", "TEXT"),
    // A private package's recipients (JSON list of keys).
    ("packages", "recipients", "TEXT"),
    ("models", "vkey", "TEXT"),
    ("models", "deleted", "INTEGER NOT NULL DEFAULT 0"),
    ("models", "signer", "TEXT"),
    ("models", "meta_signer", "TEXT"),
    // Whole downloads of each version.
    ("packages", "downloads", "INTEGER NOT NULL DEFAULT 0"),
    ("models", "downloads", "INTEGER NOT NULL DEFAULT 0"),
    // The card (JSON of `tessera_core::card::Card`): a package's README.md, a model's given card.
    ("packages", "card", "TEXT"),
    ("models", "card", "TEXT"),
];

/// The digests of every blob the hub serves: live packages, models with their binary,
/// component revisions.
pub(crate) const SERVED_DIGESTS: &str = "SELECT digest FROM packages WHERE deleted = 0
     UNION SELECT digest FROM models WHERE deleted = 0 AND digest IS NOT NULL
     UNION SELECT digest FROM component_revisions";

/// A blob store shared by hub processes, and the runtime of its own its I/O runs on: the
/// server's threads may all be waiting for the database, which a write holds while it
/// stores a blob, so that I/O must not need them.
struct Shared {
    blobs: Arc<dyn tessera_ports::BlobStore>,
    /// The bound of this process's copy in the directory.
    cache: cache::CacheLimit,
    /// Always `Some` but while it is dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Shared {
    /// Runs `f` on the shared store's runtime in the background.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.runtime.as_ref().expect("the runtime lives until dropped").spawn(f);
    }

    /// Runs `f` to completion from synchronous code (off any runtime's threads).
    fn run<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.runtime.as_ref().expect("the runtime lives until dropped");
        db::off_runtime(|| runtime.block_on(f))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an asynchronous caller may not do.
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

/// Where a hub keeps its records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Database {
    /// `hub.sqlite` in the hub's directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database, by connection string (`postgres://user@host:port/db` or
    /// `host=... user=... dbname=...`), over TLS as its `sslmode` and `sslrootcert` say
    /// (libpq's parameters; see `store/tls.rs`). Several hub processes, on several
    /// machines, may share one.
    Postgres(String),
}

/// PostgreSQL's version of [`SCHEMA`] and [`ADDED_COLUMNS`]: 64-bit integers, text in the
/// "C" collation (SQLite's order), a `rowid` column for the insertion order SQLite keeps by
/// itself, and the hub's key.
fn pg_schema() -> String {
    let mut out = String::new();
    for stmt in SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        // Text compares and sorts by code point, as in SQLite, whatever the database's locale.
        let stmt = stmt.replace("INTEGER", "BIGINT").replace("TEXT", "TEXT COLLATE \"C\"");
        match stmt.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            Some(rest) => {
                let (table, columns) = rest.split_once('(').unwrap_or((rest, ""));
                out.push_str(&format!(
                    "CREATE TABLE IF NOT EXISTS {} (\n    rowid BIGSERIAL,{columns};\n",
                    table.trim()
                ));
            }
            None => out.push_str(&format!("{stmt};\n")),
        }
    }
    for (table, column, def) in ADDED_COLUMNS {
        let def = def.replace("INTEGER", "BIGINT").replace("TEXT", "TEXT COLLATE \"C\"");
        out.push_str(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {def};\n"));
    }
    out.push_str(
        "CREATE TABLE IF NOT EXISTS hub_key (id BIGINT PRIMARY KEY, key_type TEXT NOT NULL, secret TEXT NOT NULL);\n",
    );
    out
}

thread_local! {
    /// Set by [`HubStore::adopt`] when the write in progress on this thread found its blob
    /// gone from the shared store (a write runs on one thread from its put to its commit).
    static LOST_SHARED_BLOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The hub's store.
pub struct HubStore {
    db: Mutex<Conn>,
    /// The blob store every hub process shares, if any.
    shared: Option<Shared>,
    /// Blobs the write in progress moved into place (writes are serialised by `db`).
    adopted: Mutex<Vec<Digest>>,
    blobs: FsBlobStore,
    limits: Limits,
    dir: PathBuf,
    key: KeyPair,
    /// What the component objects read as packages turned out to be (manifest, or why
    /// not), by digest: bytes never change under a digest, and reading a package
    /// decompresses all of it.
    object_manifests: Mutex<component_packages::Inspected>,
}

/// The namespace of a name: its first segment.
pub(crate) fn namespace_of(name: &str) -> &str {
    name.split('.').next().unwrap_or_default()
}

pub(crate) fn parse_name(name: &str) -> Result<ModulePath, HubError> {
    name.parse().map_err(|e: tessera_core::name::NameError| HubError::BadRequest(e.to_string()))
}

/// The longest version the hub takes, in bytes: a package's manifest has the same bound.
pub(crate) const MAX_VERSION_LEN: usize = tessera_core::version::MAX_VERSION_LEN;

/// A version as stored records are looked up, read, deleted and restored by: semver of any
/// length (records stored before versions were bounded stay reachable).
pub(crate) fn parse_version(v: &str) -> Result<Version, HubError> {
    Version::parse(v)
        .map_err(|e| HubError::BadRequest(format!("invalid version {v:?}: {e} (versions are semver, e.g. 0.1.0)")))
}

/// The version of a record to be made: semver of at most [`MAX_VERSION_LEN`] bytes.
pub(crate) fn new_version(v: &str) -> Result<Version, HubError> {
    if v.len() > MAX_VERSION_LEN {
        let head: String = v.chars().take(32).collect();
        return Err(HubError::BadRequest(format!(
            "the version {head:?}... has {} bytes; the most is {MAX_VERSION_LEN}",
            v.len()
        )));
    }
    parse_version(v)
}

pub(crate) fn parse_digest(d: &str) -> Result<Digest, HubError> {
    d.parse().map_err(|e: tessera_core::digest::DigestError| HubError::BadRequest(e.to_string()))
}

/// The identity of a version: the version without its build metadata (semver 2.0 §10:
/// build metadata does not take part in precedence, so `1.0.0+a` and `1.0.0+b` are one
/// version).
pub(crate) fn vkey(v: &Version) -> String {
    let mut v = v.clone();
    v.build = BuildMetadata::EMPTY;
    v.to_string()
}

/// A list of keys as stored (JSON).
pub(crate) fn keys_json(keys: &[PublicKey]) -> String {
    serde_json::to_string(&keys.iter().map(PublicKey::to_string).collect::<Vec<_>>()).unwrap_or_default()
}

impl HubStore {
    /// Opens (or creates) a hub in `dir`: `dir/hub.sqlite` and `dir/blobs/`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, HubError> {
        Self::open_with_limits(dir, Limits::default())
    }

    /// Opens a hub with package limits.
    pub fn open_with_limits(dir: impl Into<PathBuf>, limits: Limits) -> Result<Self, HubError> {
        Self::open_database(dir, &Database::Sqlite, limits)
    }

    /// Opens a hub whose records are in `database` and whose blobs are in `dir/blobs/`.
    /// With PostgreSQL, the hub's key is kept in the database too (and copied to
    /// `dir/identity/`), so every hub process over it speaks for one hub.
    ///
    /// # Errors
    /// [`HubError::Storage`] when the database cannot be reached or its schema made.
    pub fn open_database(dir: impl Into<PathBuf>, database: &Database, limits: Limits) -> Result<Self, HubError> {
        Self::open_inner(dir.into(), database, limits, None)
    }

    /// [`HubStore::open_database`], with `checks` made before anything is written in `dir`
    /// (which a SQLite database is in, so it is made first there).
    fn open_inner(
        dir: PathBuf,
        database: &Database,
        limits: Limits,
        checks: Option<&OpenChecks>,
    ) -> Result<Self, HubError> {
        if *database == Database::Sqlite {
            std::fs::create_dir_all(&dir)?;
        }
        // Hub processes starting together over one new database: switching it to WAL can
        // be refused at once as busy (SQLite does not wait for that lock), so the opening
        // is tried again for a while.
        let mut pause = std::time::Duration::from_millis(10);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (conn, key) = loop {
            match Self::open_db(&dir, database, checks) {
                Err(OpenFailure::Busy(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(200));
                }
                Err(OpenFailure::Busy(e)) => return Err(e.into()),
                Err(OpenFailure::Other(e)) => return Err(e),
                Ok(opened) => break opened,
            }
        };
        let blobs = FsBlobStore::open(dir.join("blobs"))?;
        Ok(HubStore {
            db: Mutex::new(conn),
            shared: None,
            adopted: Mutex::default(),
            blobs,
            limits,
            dir,
            key,
            object_manifests: Mutex::default(),
        })
    }

    /// Connects to the database, brings its schema up to date and loads (or makes) the
    /// hub's key.
    fn open_db(dir: &Path, database: &Database, checks: Option<&OpenChecks>) -> Result<(Conn, KeyPair), OpenFailure> {
        let conn = match database {
            Database::Sqlite => {
                let conn = rusqlite::Connection::open(dir.join("hub.sqlite"))?;
                // The wait first: another hub process may hold the lock while this one starts.
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                Conn::Lite(conn)
            }
            Database::Postgres(url) => {
                Conn::Pg(std::cell::RefCell::new(Some(db::connect(url)?)), url.clone(), Default::default())
            }
        };
        let conn = Mutex::new(conn);
        // One transaction: hub processes starting together over one database neither see a
        // half-made schema nor add a column twice.
        let tx = Tx::begin(&conn, TxKind::Write)?;
        if tx.is_pg() {
            tx.execute_batch(&pg_schema())?;
        } else {
            tx.execute_batch(SCHEMA)?;
            for (table, column, def) in ADDED_COLUMNS {
                let exists: bool = tx.query_row(
                    &format!("SELECT EXISTS(SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
                    params![column],
                    |r| r.get(0),
                )?;
                if !exists {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
                }
            }
        }
        migrate(&tx)?;
        if let Some(checks) = checks {
            directory::check_before_writing(&tx, dir, checks)?;
        }
        if tx.is_pg() {
            // (A SQLite database is in the directory, made before it was opened.)
            std::fs::create_dir_all(dir).map_err(HubError::from)?;
        }
        if let Some(checks) = checks {
            // Under the same lock as the checks: of processes starting together over a new
            // database, the first one's claim is what the others check.
            directory::claim(&tx, dir, checks)?;
        }
        // The key too, under the same lock: processes starting together make one.
        let key = Self::hub_key(dir, &tx)?;
        tx.commit()?;
        Ok((conn.into_inner().unwrap_or_else(|p| p.into_inner()), key))
    }

    /// The hub's key: in `dir/identity/`, and with PostgreSQL in the database, which wins.
    fn hub_key(dir: &Path, conn: &Conn) -> Result<KeyPair, HubError> {
        let storage = |e: &dyn std::fmt::Display| HubError::Storage(format!("the hub's key: {e}"));
        let keys = tessera_identity::keystore::Keystore::open(dir.join("identity")).map_err(|e| storage(&e))?;
        if conn.is_pg() {
            let stored: Option<(String, String)> = conn
                .query_row("SELECT key_type, secret FROM hub_key WHERE id = 1", params![], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if let Some((ty, secret)) = stored {
                let ty: KeyType = ty.parse().map_err(|e| storage(&e))?;
                let secret = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret)
                    .map_err(|e| storage(&e))?;
                let key = KeyPair::from_secret(ty, &secret).map_err(|e| storage(&e))?;
                match keys.load("hub", None) {
                    Ok(local) if local.public() == key.public() => {}
                    Ok(local) => {
                        return Err(HubError::Conflict(format!(
                            "the hub's key: the data directory {} holds the key of another hub ({}) than the database's ({}): \
                             give --data the directory this hub's processes use (with --blobs, a new, empty \
                             one will do); this one may hold another hub's blobs and key",
                            dir.display(),
                            local.public(),
                            key.public()
                        )));
                    }
                    Err(_) => drop(keys.store("hub", &key, None)),
                }
                return Ok(key);
            }
        }
        let key = match keys.load("hub", None) {
            Ok(k) => k,
            Err(tessera_identity::keystore::KeystoreError::NotFound(_)) => {
                keys.create("hub", KeyType::Ed25519, None).map_err(|e| storage(&e))?;
                keys.load("hub", None).map_err(|e| storage(&e))?
            }
            Err(e) => return Err(storage(&e)),
        };
        if conn.is_pg() {
            let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key.secret_bytes());
            conn.execute(
                "INSERT INTO hub_key (id, key_type, secret) VALUES (1, ?1, ?2)",
                params![key.key_type().to_string(), secret],
            )?;
        }
        Ok(key)
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

    /// The hub's own key (the audience of signed requests).
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write transaction: it holds the database's write lock (every hub process's) from
    /// its start.
    fn write_tx(&self) -> Result<Tx<'_>, HubError> {
        Ok(Tx::begin(&self.db, TxKind::Write)?)
    }

    /// A read transaction: its reads are of one moment.
    fn read_tx(&self) -> Result<Tx<'_>, HubError> {
        Ok(Tx::begin(&self.db, TxKind::Read)?)
    }

    /// Runs a write under `name`'s namespace on behalf of `actor` (`None`: an unsigned
    /// request, which the API lets through only on an open hub): in one transaction, the
    /// namespace rule (an owned namespace takes writes from its owners only; an unowned one
    /// is claimed by the first signed write, and takes unsigned writes without being
    /// claimed), then `f`. When either refuses, nothing is written, the claim included, and
    /// the blobs `f` moved into place ([`HubStore::adopt`]) go again unless something else
    /// uses them.
    pub(crate) fn write<T>(
        &self,
        name: &str,
        actor: Option<&PublicKey>,
        f: impl FnOnce(&Conn) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let result = (|| {
            let tx = self.write_tx()?;
            self.adopted.lock().unwrap_or_else(|p| p.into_inner()).clear();
            namespaces::check_write(&tx, namespace_of(name), actor)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        let adopted = std::mem::take(&mut *self.adopted.lock().unwrap_or_else(|p| p.into_inner()));
        if result.is_ok() && !adopted.is_empty() {
            self.evict_cached();
        }
        if result.is_err() {
            // The transaction is rolled back (and its lock released): the blobs it adopted
            // are collected under a new one.
            for d in adopted {
                if let Err(e) = self.collect_blob(&d) {
                    tracing::warn!(blob = %d, error = %e, "a refused write's blob stays");
                }
            }
        }
        result
    }

    /// [`HubStore::write`] of a write that stores the upload `file` (verified: its bytes are
    /// `digest`). With shared blobs, the upload goes to the shared store first, outside the
    /// write's lock (a large model takes a while); a refused write takes it away again unless
    /// something else uses it.
    pub(crate) fn write_with_blob<T>(
        &self,
        name: &str,
        actor: Option<&PublicKey>,
        (file, digest): (&Path, &Digest),
        f: impl Fn(&Conn) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let mut attempt = 1;
        loop {
            LOST_SHARED_BLOB.set(false);
            let result = self.write_with_blob_once(name, actor, (file, digest), &f);
            // The blob left the shared store before the write's turn came ([`HubStore::adopt`]):
            // put again, noted, outside the lock.
            if result.is_err() && LOST_SHARED_BLOB.replace(false) && attempt < 3 {
                attempt += 1;
                continue;
            }
            return result;
        }
    }

    fn write_with_blob_once<T>(
        &self,
        name: &str,
        actor: Option<&PublicKey>,
        (file, digest): (&Path, &Digest),
        f: impl FnOnce(&Conn) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let mut pending = None;
        let source = if file.exists() { file.to_owned() } else { self.blobs.path_of(digest) };
        if let Some(shared) = &self.shared
            && source.exists()
            && !shared.run(shared.blobs.contains(digest))?
        {
            // Noted first: if this process dies before the write, the sweep collects it.
            let token = self.note_pending(digest)?;
            if let Err(e) = shared.run(shared.blobs.put_file(&source, digest)) {
                // A partial object may be left: the note stays for the sweep.
                return Err(e.into());
            }
            pending = Some(token);
        }
        let result = self.write(name, actor, f);
        if result.is_err()
            && pending.is_some()
            && let Err(e) = self.collect_blob(digest)
        {
            tracing::warn!(blob = %digest, error = %e, "a refused write's blob stays in the shared store");
            return result;
        }
        if let Some(token) = pending {
            self.forget_pending(&token);
        }
        result
    }

    /// Moves the upload `file` into the blob store as `digest`, inside a
    /// [`HubStore::write`] (whose refusal removes it again). With shared blobs, the shared
    /// store is checked under the write's lock: another process may have collected the blob
    /// since [`HubStore::write_with_blob`] put it there. The write is then refused
    /// ([`HubError::Busy`]) and `write_with_blob` puts the blob again and retries, rather
    /// than this putting it under the lock, where the put could not be noted as pending (the
    /// note must outlive the transaction), so no row is written for a blob it does not hold.
    pub(crate) fn adopt(&self, file: &Path, digest: &Digest) -> Result<(), HubError> {
        if let Some(shared) = &self.shared {
            if !shared.run(shared.blobs.contains(digest))? {
                LOST_SHARED_BLOB.set(true);
                return Err(HubError::Busy(format!(
                    "blob {digest} left the shared store while this write waited for its turn; send it again"
                )));
            } else if !file.exists() {
                // The shared store holds it: an upload of known bytes, which sent none, has
                // nothing to move (this process's copy may have been evicted).
                self.adopted.lock().unwrap_or_else(|p| p.into_inner()).push(*digest);
                return Ok(());
            }
        }
        self.blobs.adopt_file(file, digest)?;
        self.adopted.lock().unwrap_or_else(|p| p.into_inner()).push(*digest);
        Ok(())
    }

    /// True when a live package, a model or a component revision uses the blob.
    fn blob_in_use(conn: &Conn, digest: &Digest) -> Result<bool, HubError> {
        Ok(conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM packages WHERE digest = ?1 AND deleted = 0)
                 OR EXISTS(SELECT 1 FROM models WHERE digest = ?1 AND deleted = 0)
                 OR EXISTS(SELECT 1 FROM component_revisions WHERE digest = ?1)",
            params![digest.to_string()],
            |r| r.get(0),
        )?)
    }

    /// The file holding a blob the hub serves (a live package, a model binary or a component
    /// object of any revision). With shared blobs, a blob this process has not yet seen is
    /// fetched into its directory first (streamed, verified).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, HubError> {
        if !Self::blob_in_use(&self.db(), digest)? {
            return Err(HubError::NotFound(digest.to_string()));
        }
        match self.local_blob(digest)? {
            Some(path) => Ok(path),
            None if self.shared.is_some() => {
                Err(HubError::Storage(format!("blob {digest} is recorded but the shared store does not hold it")))
            }
            None => Err(HubError::NotFound(digest.to_string())),
        }
    }

    /// True when the blob is stored: in the shared store when there is one (this process's
    /// directory is then a cache), in the directory otherwise.
    pub(crate) fn has_blob(&self, digest: &Digest) -> Result<bool, HubError> {
        match &self.shared {
            Some(shared) => Ok(shared.run(shared.blobs.contains(digest))?),
            None => Ok(self.blobs.path_of(digest).exists()),
        }
    }

    /// Keeps the hub's blobs in `blobs` too (the NATS Object Store, say), which every hub
    /// process serving the same database shares: this process's directory becomes a cache
    /// of it. Blob I/O runs on `runtime`, which the store owns from now on: it must be the
    /// runtime `blobs` was made on (its connection's tasks run there), and one that the
    /// server's own threads do not drive.
    ///
    /// The database records that its blobs are shared ([`HubStore::expects_shared_blobs`]),
    /// so that a process started without the shared store can be refused.
    ///
    /// # Errors
    /// [`HubError::Storage`] when the record cannot be written.
    pub fn with_shared_blobs(
        mut self,
        blobs: Arc<dyn tessera_ports::BlobStore>,
        runtime: tokio::runtime::Runtime,
    ) -> Result<Self, HubError> {
        self.shared = Some(Shared { blobs, cache: cache::CacheLimit::default(), runtime: Some(runtime) });
        record_shared_blobs(&self.db())?;
        // What a process that died mid-write left, long enough ago.
        if let Err(e) = self.collect_pending(pending::PENDING_GRACE_SECS) {
            tracing::warn!(error = %e, "blobs left by unfinished writes stay until the next sweep");
        }
        self.sweep_temporaries();
        Ok(self)
    }

    /// The NATS Object Store buckets (blobs, small blobs) this hub's blobs are shared in:
    /// `tessera_hub_ID_blobs` and `tessera_hub_ID_small_blobs`, with `ID` random and
    /// recorded in the database by the first process to ask, so hubs with different
    /// databases (a restored copy, say) on one NATS server never share, nor remove, each
    /// other's blobs, and the processes of one hub agree. A database that shared its blobs
    /// before the names were recorded keeps the names it used, `tessera_hub_blobs` and
    /// `tessera_hub_small_blobs`.
    ///
    /// # Errors
    /// [`HubError::Storage`] when the record cannot be read or written.
    pub fn shared_blob_buckets(&self) -> Result<(String, String), HubError> {
        choose_blob_buckets(&self.db())
    }

    /// New bucket names for a hub's shared blobs (see [`HubStore::shared_blob_buckets`]),
    /// for a database about to be made (a restore's).
    ///
    /// # Errors
    /// [`HubError::Storage`] when the system's random source fails.
    pub fn fresh_blob_buckets() -> Result<(String, String), HubError> {
        let id = random_id()?;
        Ok((format!("tessera_hub_{id}_blobs"), format!("tessera_hub_{id}_small_blobs")))
    }

    /// The buckets a restore into `database` puts its shared blobs in: those the database
    /// records (chosen by an earlier restore of the same dump into it that was refused), or
    /// new ones ([`HubStore::fresh_blob_buckets`]). A SQLite database is made new by the
    /// restore: new ones.
    ///
    /// # Errors
    /// [`HubError::Storage`] (or the database's error) when the database cannot be read or
    /// records buckets in another form.
    pub fn restore_blob_buckets(database: &Database) -> Result<(String, String), HubError> {
        if let Database::Postgres(url) = database {
            let conn = Conn::Pg(std::cell::RefCell::new(Some(db::connect(url)?)), url.clone(), Default::default());
            if conn.tables()?.iter().any(|t| t == "settings") {
                let value: Option<String> = conn
                    .query_row("SELECT value FROM settings WHERE name = 'blob_buckets'", params![], |r| r.get(0))
                    .optional()?;
                if let Some(v) = value {
                    return parse_buckets(&v);
                }
            }
        }
        Self::fresh_blob_buckets()
    }

    /// Reads a served blob, verifying its digest.
    pub fn blob_bytes(&self, digest: &Digest) -> Result<Vec<u8>, HubError> {
        let bytes = std::fs::read(self.blob_path(digest)?)?;
        if &Digest::of(&bytes) != digest {
            return Err(HubError::Storage(format!("blob {digest} is corrupt on disk")));
        }
        Ok(bytes)
    }

    /// Removes a blob nothing uses any more (after the transaction that stopped using it),
    /// holding the database's write lock meanwhile, so no write of this process or another
    /// adopts the same blob between the check and the removal.
    fn collect_blob(&self, digest: &Digest) -> Result<(), HubError> {
        // A write transaction holds the database's write lock, which other hub processes
        // over the same database take too before they adopt a blob.
        let tx = self.write_tx()?;
        if !Self::blob_in_use(&tx, digest)? {
            let _ = std::fs::remove_file(self.blobs.path_of(digest));
            if let Some(shared) = &self.shared {
                shared.run(shared.blobs.delete(digest))?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Records in the database that the hub's blobs are in a shared store.
pub(crate) fn record_shared_blobs(conn: &Conn) -> Result<(), HubError> {
    conn.execute(
        "INSERT INTO settings (name, value) VALUES ('blobs', 'shared') ON CONFLICT(name) DO NOTHING",
        params![],
    )?;
    Ok(())
}

/// Rows read per batch of a [`HubStore::scan_by_name`]: the database's lock is held only
/// while a batch is read, and a batch of records of up to about 3 MiB each (metadata,
/// lineage, card) stays under about 25 MiB.
const SCAN_BATCH: i64 = 8;

use std::ops::ControlFlow;

impl HubStore {
    /// Every row of `SELECT {columns} FROM {table} WHERE {filter}` (the first two columns
    /// being `name` and `version`), read in (name, version) order a batch of
    /// [`SCAN_BATCH`] at a time, each handed to `f` with the lock released: a scan of the
    /// whole hub holds neither every row in memory nor the database from other requests.
    /// A row written or deleted meanwhile may or may not be seen, as in any scan without a
    /// transaction. `f` ends the scan early with [`ControlFlow::Break`].
    ///
    /// # Errors
    /// The database's; `f`'s first error ends the scan.
    pub(crate) fn scan_by_name<R>(
        &self,
        table: &str,
        columns: &str,
        filter: &str,
        read: impl Fn(&db::Row<'_>) -> Result<R, db::DbError>,
        mut f: impl FnMut(R) -> Result<ControlFlow<()>, HubError>,
    ) -> Result<(), HubError> {
        let sql = format!(
            "SELECT {columns} FROM {table} WHERE ({filter}) AND (name > ?1 OR (name = ?1 AND version > ?2))
             ORDER BY name, version LIMIT {SCAN_BATCH}"
        );
        let (mut name, mut version) = (String::new(), String::new());
        loop {
            let batch: Vec<(String, String, R)> =
                self.db().query_all(&sql, params![name, version], |row| Ok((row.get(0)?, row.get(1)?, read(row)?)))?;
            let n = batch.len();
            for (n, v, r) in batch {
                (name, version) = (n, v);
                if f(r)?.is_break() {
                    return Ok(());
                }
            }
            if n < SCAN_BATCH as usize {
                return Ok(());
            }
        }
    }
}

/// 16 random hex digits: an id for a database's buckets or a data directory.
fn random_id() -> Result<String, HubError> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| HubError::Storage(format!("a random id: {e}")))?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The recorded form of a hub's blob buckets, `"<blobs> <small blobs>"`, read.
fn parse_buckets(value: &str) -> Result<(String, String), HubError> {
    match value.split_once(' ') {
        Some((blobs, small)) if !blobs.is_empty() && !small.is_empty() => Ok((blobs.to_owned(), small.to_owned())),
        _ => Err(HubError::Storage(format!("the database's blob buckets are recorded as {value:?}"))),
    }
}

/// Records the buckets a hub's shared blobs are in, unless some are recorded already.
/// [`HubStore::shared_blob_buckets`] over `conn`: the recorded names, or those chosen now
/// and recorded (the legacy names for a database that shared its blobs without them).
pub(crate) fn choose_blob_buckets(conn: &Conn) -> Result<(String, String), HubError> {
    let recorded = |conn: &Conn| -> Result<Option<String>, HubError> {
        Ok(conn
            .query_row("SELECT value FROM settings WHERE name = 'blob_buckets'", params![], |r| r.get(0))
            .optional()?)
    };
    if let Some(value) = recorded(conn)? {
        return parse_buckets(&value);
    }
    let chosen = if directory::expects_shared_blobs(conn)? {
        ("tessera_hub_blobs".to_owned(), "tessera_hub_small_blobs".to_owned())
    } else {
        HubStore::fresh_blob_buckets()?
    };
    // The first process's names stand (another may be choosing at the same time).
    record_blob_buckets(conn, &chosen)?;
    let value = recorded(conn)?.ok_or_else(|| HubError::Storage("the hub's blob buckets were not recorded".into()))?;
    parse_buckets(&value)
}

pub(crate) fn record_blob_buckets(conn: &Conn, (blobs, small): &(String, String)) -> Result<(), HubError> {
    conn.execute(
        "INSERT INTO settings (name, value) VALUES ('blob_buckets', ?1) ON CONFLICT(name) DO NOTHING",
        params![format!("{blobs} {small}")],
    )?;
    Ok(())
}

/// Why opening the database failed: busy (another process holds a lock it did not wait
/// for) or otherwise.
enum OpenFailure {
    Busy(db::DbError),
    Other(HubError),
}

impl From<db::DbError> for OpenFailure {
    fn from(e: db::DbError) -> Self {
        if e.is_busy() { OpenFailure::Busy(e) } else { OpenFailure::Other(e.into()) }
    }
}

impl From<rusqlite::Error> for OpenFailure {
    fn from(e: rusqlite::Error) -> Self {
        db::DbError::from(e).into()
    }
}

impl From<HubError> for OpenFailure {
    fn from(e: HubError) -> Self {
        OpenFailure::Other(e)
    }
}

/// Brings rows written by older versions of the hub up to date: version keys, and private
/// packages' manifests reduced to their public part.
fn migrate(conn: &Conn) -> Result<(), HubError> {
    for table in ["packages", "models"] {
        let rows: Vec<(String, String)> = conn
            .prepare(&format!("SELECT name, version FROM {table} WHERE vkey IS NULL"))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (name, version) in rows {
            let key = Version::parse(&version).map(|v| vkey(&v)).unwrap_or(version.clone());
            conn.execute(
                &format!("UPDATE {table} SET vkey = ?3 WHERE name = ?1 AND version = ?2"),
                params![name, version, key],
            )?;
        }
    }
    let private: Vec<(String, String, String)> = conn
        .prepare("SELECT name, version, manifest FROM packages WHERE private = 1")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (name, version, text) in private {
        let Ok(m) = serde_json::from_str::<tessera_core::Manifest>(&text) else { continue };
        let public = serde_json::to_string(&m.public_part()).map_err(|e| HubError::Storage(e.to_string()))?;
        if public != text {
            conn.execute(
                "UPDATE packages SET manifest = ?3 WHERE name = ?1 AND version = ?2",
                params![name, version, public],
            )?;
        }
    }
    Ok(())
}

/// Removes a temporary upload file that was not moved into the store.
pub(crate) fn remove_leftover(file: &Path) {
    if file.exists() {
        let _ = std::fs::remove_file(file);
    }
}

#[cfg(test)]
mod tests {
    /// Each database gets buckets of its own for shared blobs, which every process of it
    /// reads back; one that shared blobs before the names were recorded keeps the first ones.
    #[test]
    fn each_hub_database_has_its_own_blob_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let a = crate::testing::open_store(dir.path().join("a"));
        let b = crate::testing::open_store(dir.path().join("b"));
        let (ab, asmall) = a.shared_blob_buckets().unwrap();
        assert!(ab.starts_with("tessera_hub_") && ab.ends_with("_blobs") && asmall.ends_with("_small_blobs"));
        assert_ne!(ab, b.shared_blob_buckets().unwrap().0);
        assert_eq!(a.shared_blob_buckets().unwrap(), (ab.clone(), asmall));
        let old = crate::testing::open_store(dir.path().join("old"));
        super::record_shared_blobs(&old.db()).unwrap();
        let legacy = ("tessera_hub_blobs".to_owned(), "tessera_hub_small_blobs".to_owned());
        assert_eq!(old.shared_blob_buckets().unwrap(), legacy);
    }

    /// Every table whose rows are named (a `name` or `key` column, but the hub's own
    /// settings) is one the namespaces are found in, so a hub that starts requiring
    /// signatures leaves no namespace unowned, whatever collection wrote it.
    #[test]
    fn every_named_table_is_searched_for_unowned_namespaces() {
        let mut named = Vec::new();
        for table in super::SCHEMA.split("CREATE TABLE IF NOT EXISTS ").skip(1) {
            let (name, columns) = table.split_once('(').unwrap();
            let has = |c: &str| columns.lines().any(|l| l.trim_start().starts_with(&format!("{c} ")));
            if name.trim() != "settings" && (has("name") || has("key")) {
                named.push(name.trim().to_owned());
            }
        }
        // And columns added to older tables since.
        for (table, column, _) in super::ADDED_COLUMNS {
            if matches!(column, "name" | "key") && table != "settings" {
                named.push(table.to_owned());
            }
        }
        assert!(named.len() >= 5, "{named:?}");
        for t in named {
            assert!(super::namespaces::NAMED_TABLES.iter().any(|(n, _)| *n == t), "table {t} is not in NAMED_TABLES");
        }
    }

    /// Every write that moves a blob into place does it through `HubStore::adopt`, so a
    /// refused write takes its blob away again: no other store file moves blobs itself
    /// (but the restore, which fills a staging directory nothing serves yet, and the cache,
    /// which copies into the directory what the shared store holds already).
    #[test]
    fn writes_adopt_blobs_through_the_store() {
        let files = [
            ("accounts.rs", include_str!("accounts.rs")),
            ("component_packages.rs", include_str!("component_packages.rs")),
            ("components.rs", include_str!("components.rs")),
            ("directory.rs", include_str!("directory.rs")),
            ("grants.rs", include_str!("grants.rs")),
            ("models.rs", include_str!("models.rs")),
            ("namespaces.rs", include_str!("namespaces.rs")),
            ("nonces.rs", include_str!("nonces.rs")),
            ("packages.rs", include_str!("packages.rs")),
            ("pending.rs", include_str!("pending.rs")),
            ("search.rs", include_str!("search.rs")),
            ("tls.rs", include_str!("tls.rs")),
            ("uploads.rs", include_str!("uploads.rs")),
        ];
        let listed: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/store"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !["mod.rs", "db.rs", "dump.rs", "cache.rs"].contains(&n.as_str()))
            .collect();
        for n in &listed {
            assert!(files.iter().any(|(f, _)| f == n), "{n} is not checked here: add it");
        }
        for (name, text) in files {
            assert!(!text.contains("adopt_file("), "{name} moves a blob into place itself; use HubStore::adopt");
        }
    }
}
