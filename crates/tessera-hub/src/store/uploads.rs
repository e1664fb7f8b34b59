//! Resumable uploads: a large object sent in pieces that a broken connection does not lose.
//!
//! The protocol follows tus (tus.io, "resumable upload protocol" 1.0) in spirit: a client
//! declares the object's digest and size, gets an upload id, appends pieces at the offset
//! the hub reports (a piece at any other offset is refused), asks the offset again after a
//! failure, and once every byte arrived names the upload in the request that stores the
//! object. The bytes are kept in a file of the blob directory, `uploads/<id>`; the offset
//! is the bytes of accepted pieces, recorded with the upload (whatever lies past it in the
//! file, from a piece that failed, is cut off before the next piece or the naming); the
//! declared digest is checked over the whole file when the upload is used, so a corrupt
//! piece is caught before anything is recorded. That check is also why a piece may be
//! signed over its statement ([`tessera_core::registry::upload_piece_statement`]: upload,
//! offset, length) rather than its bytes: neither side hashes a piece twice. An object the hub
//! already serves as a model or component (public bytes) needs no bytes at all.
//!
//! The same signed account declaring the same digest and size again gets its upload in
//! progress back: a client resumes without keeping any state. (Unsigned clients of an open
//! hub are one account, so they never get another's upload back: each declaration begins a
//! new one, and theirs are removed after [`UNSIGNED_STALE_AFTER_SECS`].) Each account has at
//! most [`MAX_OPEN_UPLOADS`] uploads open; an upload untouched for [`STALE_AFTER_SECS`] is
//! removed.

use std::path::PathBuf;

use super::db::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tessera_core::Digest;

use super::{HubError, HubStore, parse_digest};

/// Seconds between two sweeps of stale uploads.
const SWEEP_EVERY_SECS: u64 = 60;

/// When the last sweep ran (seconds since the epoch).
static LAST_SWEEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Uploads one account may have open at once.
pub const MAX_OPEN_UPLOADS: u64 = 8;

/// Seconds after its last piece an unfinished upload is removed (one day).
pub const STALE_AFTER_SECS: u64 = 24 * 3600;

/// Seconds after its last piece an unsigned client's unfinished upload is removed (an hour).
pub const UNSIGNED_STALE_AFTER_SECS: u64 = 3600;

/// An upload in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadRecord {
    /// Its id (32 hex characters; `null` when the hub already had the bytes).
    pub id: Option<String>,
    /// The object's declared digest.
    #[schema(value_type = String)]
    pub digest: Digest,
    /// The object's declared size in bytes.
    pub size: u64,
    /// Bytes received so far: the offset of the next piece.
    pub offset: u64,
    /// True when every byte is there (or the hub already had them).
    pub complete: bool,
}

/// Checks an upload id: 32 lowercase hex characters.
pub(crate) fn check_upload_id(id: &str) -> Result<(), HubError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(HubError::BadRequest(format!(
            "invalid upload id {:?}: 32 hex characters",
            id.chars().take(40).collect::<String>()
        )))
    }
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl HubStore {
    fn uploads_dir(&self) -> PathBuf {
        self.blobs.dir().join("uploads")
    }

    /// The file holding an upload's bytes.
    pub(crate) fn upload_file(&self, id: &str) -> PathBuf {
        self.uploads_dir().join(id)
    }

    /// True when the hub serves these bytes publicly (a live model or a component
    /// revision), so an upload of them needs no bytes: a private package's ciphertext does
    /// not count, or anyone knowing its digest could make it public under a model name.
    pub(crate) fn has_public_blob(&self, digest: &Digest) -> Result<bool, HubError> {
        let d = digest.to_string();
        // The connection is released before the shared store is asked.
        let used: bool = self.db().query_row(
            "SELECT EXISTS(SELECT 1 FROM models WHERE digest = ?1 AND deleted = 0)
                 OR EXISTS(SELECT 1 FROM component_revisions WHERE digest = ?1)",
            params![d],
            |r| r.get(0),
        )?;
        Ok(used && self.has_blob(digest)?)
    }

    /// Starts (or, for the same account, digest and size, finds again) an upload of
    /// `size` bytes with `digest`. Unfinished uploads older than [`STALE_AFTER_SECS`] are
    /// removed first.
    ///
    /// # Errors
    /// [`HubError::Busy`] when the account has [`MAX_OPEN_UPLOADS`] open.
    pub fn begin_upload(&self, account: &str, digest: &Digest, size: u64) -> Result<UploadRecord, HubError> {
        self.expire_uploads()?;
        if self.has_public_blob(digest)? {
            return Ok(UploadRecord { id: None, digest: *digest, size, offset: size, complete: true });
        }
        // One write transaction: hub processes sharing the database neither open the same
        // upload twice nor pass the account's bound together.
        let db = self.write_tx()?;
        let found: Option<String> = if account.is_empty() {
            None
        } else {
            db.query_row(
                "SELECT id FROM uploads WHERE account = ?1 AND digest = ?2 AND size = ?3 ORDER BY rowid LIMIT 1",
                params![account, digest.to_string(), i64::try_from(size).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )
            .optional()?
        };
        if let Some(id) = found {
            drop(db);
            return self.upload(&id, account);
        }
        let open: u64 = db.query_row("SELECT COUNT(*) FROM uploads WHERE account = ?1", params![account], |r| {
            r.get::<_, i64>(0).map(|n| u64::try_from(n).unwrap_or(0))
        })?;
        if open >= MAX_OPEN_UPLOADS {
            return Err(HubError::Busy(format!(
                "{} uploads are open for this account (the most is {MAX_OPEN_UPLOADS}); finish one first",
                open
            )));
        }
        let id = new_id();
        // The row first, then the file: a crash between them leaves a row whose file the
        // first piece creates (or which expires), never a file nothing names.
        db.execute(
            "INSERT INTO uploads (id, account, digest, size, touched) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                account,
                digest.to_string(),
                i64::try_from(size).unwrap_or(i64::MAX),
                i64::try_from(now_secs()).unwrap_or(0)
            ],
        )?;
        db.commit()?;
        std::fs::create_dir_all(self.uploads_dir())?;
        std::fs::File::create(self.upload_file(&id))?;
        tracing::info!(%id, %digest, size, "upload begun");
        Ok(UploadRecord { id: Some(id), digest: *digest, size, offset: 0, complete: size == 0 })
    }

    /// An upload of `account` (another account's is not found).
    ///
    /// # Errors
    /// [`HubError::NotFound`]; [`HubError::BadRequest`] for a malformed id.
    pub fn upload(&self, id: &str, account: &str) -> Result<UploadRecord, HubError> {
        check_upload_id(id)?;
        self.expire_uploads()?;
        let row: Option<(String, i64, i64)> = self
            .db()
            .query_row(
                "SELECT digest, size, received FROM uploads WHERE id = ?1 AND account = ?2",
                params![id, account],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let (digest, size, received) = row.ok_or_else(|| HubError::NotFound(format!("upload {id}")))?;
        let size = u64::try_from(size).unwrap_or(0);
        let offset = u64::try_from(received).unwrap_or(0).min(size);
        Ok(UploadRecord {
            id: Some(id.to_owned()),
            digest: parse_digest(&digest).map_err(|e| HubError::Storage(e.to_string()))?,
            size,
            offset,
            complete: offset == size,
        })
    }

    /// Marks an upload as in use now (a piece or a naming begins), so it does not expire
    /// meanwhile.
    pub(crate) fn touch_upload(&self, id: &str) -> Result<(), HubError> {
        self.db().execute(
            "UPDATE uploads SET touched = ?2 WHERE id = ?1",
            params![id, i64::try_from(now_secs()).unwrap_or(0)],
        )?;
        Ok(())
    }

    /// Records an accepted piece: the upload's offset is now `received`.
    pub(crate) fn accept_piece(&self, id: &str, received: u64) -> Result<(), HubError> {
        self.db().execute(
            "UPDATE uploads SET received = ?2, touched = ?3 WHERE id = ?1",
            params![id, i64::try_from(received).unwrap_or(i64::MAX), i64::try_from(now_secs()).unwrap_or(0)],
        )?;
        Ok(())
    }

    /// Cuts an upload's file back to its offset: bytes past it are of a piece that was not
    /// accepted. Called with the upload's piece lock held.
    pub(crate) fn trim_upload(&self, id: &str, offset: u64) -> Result<(), HubError> {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.upload_file(id))?;
        if f.metadata()?.len() != offset {
            f.set_len(offset)?;
        }
        Ok(())
    }

    /// Abandons an upload of `account`.
    ///
    /// # Errors
    /// [`HubError::NotFound`] for another account's or an unknown upload.
    pub fn cancel_upload(&self, id: &str, account: &str) -> Result<(), HubError> {
        self.upload(id, account)?;
        self.end_upload(id)
    }

    /// Forgets an upload and removes its file (after it was used, or when its bytes did
    /// not match their digest).
    pub(crate) fn end_upload(&self, id: &str) -> Result<(), HubError> {
        self.db().execute("DELETE FROM uploads WHERE id = ?1", params![id])?;
        super::remove_leftover(&self.upload_file(id));
        Ok(())
    }

    /// Removes uploads untouched for [`STALE_AFTER_SECS`] ([`UNSIGNED_STALE_AFTER_SECS`]
    /// for unsigned clients'), upload files no row names (left by a crash) and blobs a crash
    /// left in the shared store ([`HubStore::collect_pending`]); at most once a minute.
    fn expire_uploads(&self) -> Result<(), HubError> {
        let now = now_secs();
        let last = LAST_SWEEP.load(std::sync::atomic::Ordering::Relaxed);
        if now < last.saturating_add(SWEEP_EVERY_SECS)
            || LAST_SWEEP
                .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        let cutoff = i64::try_from(now.saturating_sub(STALE_AFTER_SECS)).unwrap_or(0);
        let unsigned_cutoff = i64::try_from(now.saturating_sub(UNSIGNED_STALE_AFTER_SECS)).unwrap_or(0);
        let stale: Vec<String> = self
            .db()
            .prepare("SELECT id FROM uploads WHERE touched < ?1 OR (account = '' AND touched < ?2)")?
            .query_map(params![cutoff, unsigned_cutoff], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in stale {
            tracing::info!(%id, "stale upload removed");
            self.end_upload(&id)?;
        }
        // Blobs a dead process put in the shared store ahead of a write it never made (a
        // failure there is the next sweep's to retry, not this request's).
        if let Err(e) = self.collect_pending(super::pending::PENDING_GRACE_SECS) {
            tracing::warn!(error = %e, "blobs left by unfinished writes stay until the next sweep");
        }
        self.sweep_temporaries();
        let Ok(files) = std::fs::read_dir(self.uploads_dir()) else { return Ok(()) };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let named: bool =
                self.db()
                    .query_row("SELECT EXISTS(SELECT 1 FROM uploads WHERE id = ?1)", params![name], |r| r.get(0))?;
            if !named {
                super::remove_leftover(&f.path());
            }
        }
        Ok(())
    }
}
