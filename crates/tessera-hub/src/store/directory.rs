//! What a hub process checks of the database before it writes in its data directory: that
//! it keeps its blobs where the database says they are (a shared store, or the one data
//! directory of a hub over PostgreSQL), so that a refused process leaves no directory and
//! no copy of the hub's key behind; and the claim of that directory.

use std::path::Path;

use super::db::{Conn, OptionalExtension as _, params};
use super::{Database, HubError, HubStore, SERVED_DIGESTS, parse_digest, random_id};
use tessera_package::Limits;
use tessera_ports::FsBlobStore;

/// What a process expects of the hub it opens, checked by [`HubStore::open_checked`]
/// against the database before anything is written in the data directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenChecks {
    /// This process keeps the hub's blobs in a shared store. Without it, a database whose
    /// blobs another process keeps in one is refused: this process would store blobs the
    /// others cannot read.
    pub shared_blobs: bool,
    /// For a hub over PostgreSQL without shared blobs, whether the data directory is
    /// checked as the one the blobs are in ([`HubStore::check_blob_directory`]):
    /// `Some(true)` by a process that serves (which claims the directory on first use),
    /// `Some(false)` by one that reads blobs, `None` by one that touches none.
    pub blob_directory: Option<bool>,
}

impl HubStore {
    /// [`HubStore::open_database`], refusing what `checks` rules out before it creates the
    /// data directory or copies the hub's key there (with PostgreSQL), then, in the same
    /// transaction, recording that the blobs are shared (`checks.shared_blobs`) or claiming
    /// the directory (`checks.blob_directory` is `Some(true)`), so that of processes
    /// starting together the others check what the first recorded.
    ///
    /// # Errors
    /// [`HubError::Conflict`] for a database whose blobs are shared when `checks` does not
    /// share them, or kept in another data directory (see
    /// [`HubStore::check_blob_directory`]); those of [`HubStore::open_database`].
    pub fn open_checked(
        dir: impl Into<std::path::PathBuf>,
        database: &Database,
        limits: Limits,
        checks: OpenChecks,
    ) -> Result<Self, HubError> {
        Self::open_inner(dir.into(), database, limits, Some(&checks))
    }

    /// Checks that this data directory is the one the database's blobs are in, for a hub
    /// over PostgreSQL whose blobs are not shared: processes on several machines must then
    /// see one directory (a shared file system), or a blob stored through one would be
    /// missing through another. The directory's id is a random one in its `directory-id`
    /// file; the database records the id of its directory the first time a process that
    /// serves (`record`) opens it, and only if this directory holds every blob the hub
    /// serves. Then a directory with another id, or none, is refused; before, nothing is. A
    /// SQLite database lives in its directory: nothing to check.
    ///
    /// # Errors
    /// [`HubError::Conflict`] for another directory, or one without the hub's blobs;
    /// [`HubError::Storage`] when the id cannot be read or written.
    pub fn check_blob_directory(&self, record: bool) -> Result<(), HubError> {
        blob_directory(&self.db(), self.dir(), record, true)
    }

    /// True when a process has kept this hub's blobs in a shared store: one without it
    /// would store blobs the other processes cannot read.
    pub fn expects_shared_blobs(&self) -> Result<bool, HubError> {
        expects_shared_blobs(&self.db())
    }
}

/// `checks` against the database `conn`, for the data directory `dir`, writing nothing.
pub(super) fn check_before_writing(conn: &Conn, dir: &Path, checks: &OpenChecks) -> Result<(), HubError> {
    if !checks.shared_blobs && expects_shared_blobs(conn)? {
        return Err(HubError::Conflict(
            "this hub keeps its blobs in a shared store (another process was started with --blobs): give this \
             one the same --blobs"
                .into(),
        ));
    }
    match (checks.shared_blobs, checks.blob_directory) {
        (false, Some(record)) => blob_directory(conn, dir, record, false),
        _ => Ok(()),
    }
}

/// What `checks` records once they have passed and the directory `dir` is made: that the
/// blobs are shared, or this directory as theirs.
pub(super) fn claim(conn: &Conn, dir: &Path, checks: &OpenChecks) -> Result<(), HubError> {
    match (checks.shared_blobs, checks.blob_directory) {
        // The bucket names before the record that the blobs are shared: a database
        // with the record and no names is one from before the names were recorded.
        (true, _) => {
            super::choose_blob_buckets(conn)?;
            super::record_shared_blobs(conn)
        }
        (false, Some(record)) => blob_directory(conn, dir, record, true),
        (false, None) => Ok(()),
    }
}

pub(super) fn expects_shared_blobs(conn: &Conn) -> Result<bool, HubError> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE name = 'blobs'", params![], |r| r.get::<_, String>(0))
        .optional()?
        .is_some_and(|v| v == "shared"))
}

/// [`HubStore::check_blob_directory`] over `conn` for `dir`; without `claim`, what it
/// would refuse is refused and nothing is written (the directory and its id may not exist
/// yet).
fn blob_directory(conn: &Conn, dir: &Path, record: bool, claim: bool) -> Result<(), HubError> {
    if !conn.is_pg() {
        return Ok(());
    }
    let marker = dir.join("directory-id");
    let read_marker = || -> Result<Option<String>, HubError> {
        match std::fs::read_to_string(&marker) {
            Ok(t) if t.trim().len() == 16 && t.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Some(t.trim().to_owned()))
            }
            Ok(_) => Err(HubError::Storage(format!("{} does not hold a directory id", marker.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HubError::Storage(format!("{}: {e}", marker.display()))),
        }
    };
    let recorded = || -> Result<Option<String>, HubError> {
        Ok(conn
            .query_row("SELECT value FROM settings WHERE name = 'blob_directory'", params![], |r| r.get(0))
            .optional()?)
    };
    let mut mine = read_marker()?;
    if recorded()?.is_none() && record {
        // The database's served blobs must all be here before this directory is theirs.
        let served: Vec<String> = conn.query_all(SERVED_DIGESTS, params![], |r| r.get(0))?;
        for d in served {
            let digest = parse_digest(&d)?;
            if !FsBlobStore::path_under(&dir.join("blobs"), &digest).exists() {
                return Err(HubError::Conflict(format!(
                    "the data directory {} does not hold the hub's blob {digest}: give --data the directory \
                     this hub's processes use (one shared file system), or keep the blobs in NATS with --blobs",
                    dir.display()
                )));
            }
        }
        if !claim {
            return Ok(());
        }
        if mine.is_none() {
            // Written whole under another name, then linked: a process starting at the
            // same time never reads a half-written id.
            let at = |e: std::io::Error| HubError::Storage(format!("{}: {e}", marker.display()));
            let tmp = tempfile::NamedTempFile::new_in(dir)
                .map_err(|e| HubError::Storage(format!("{}: {e}", dir.display())))?;
            std::fs::write(tmp.path(), random_id()?).map_err(at)?;
            tmp.as_file().sync_all().map_err(at)?;
            match tmp.persist_noclobber(&marker) {
                Ok(_) => {}
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(at(e.error)),
            }
            mine = read_marker()?;
        }
        if let Some(id) = &mine {
            conn.execute(
                "INSERT INTO settings (name, value) VALUES ('blob_directory', ?1) ON CONFLICT(name) DO NOTHING",
                params![id],
            )?;
        }
    }
    match (recorded()?, mine) {
        (None, _) => Ok(()),
        (Some(r), Some(m)) if r == m => Ok(()),
        (Some(r), m) => Err(HubError::Conflict(format!(
            "the database keeps its blobs in another data directory (id {r}) than {} (id {}): give every \
             process of this hub the same --data (one shared file system), or keep the blobs in NATS with \
             --blobs (if the blobs really moved here, remove the database's record: DELETE FROM settings \
             WHERE name = 'blob_directory')",
            dir.display(),
            m.as_deref().unwrap_or("none")
        ))),
    }
}
