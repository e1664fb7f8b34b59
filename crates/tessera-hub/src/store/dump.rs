//! Dump and restore: a hub's whole state in one file, to move it to another machine or
//! data directory, verified by digest on the way back.
//!
//! The dump is a tar archive: `tessera-hub-dump.json` (format, counts), one
//! `tables/<table>.jsonl` per table (each row a JSON object of its columns), every blob as
//! `blobs/<hex digest>`, and the hub's key as `identity/hub.json` (the audience of signed
//! requests, so clients that know the hub keep knowing it; the dump is written `0600`).
//! Restoring needs an empty data directory (nothing already stored is overwritten), checks
//! every blob against its name's digest and every row against the target's columns, and
//! leaves nothing behind when it refuses. Uploads in progress are not dumped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tessera_core::{Digest, DigestWriter};

use super::db::{self, params};
use super::{Database, HubError, HubStore};

/// The dump format's version.
const FORMAT: u32 = 1;

/// The file naming the dump's format.
const MANIFEST: &str = "tessera-hub-dump.json";

/// Tables a dump leaves out: uploads in progress (their files are not dumped either),
/// the replay cache (its rows expire with the signature window, a minute by default),
/// PostgreSQL's copy of the hub's key (the dump holds the key as a file), the
/// deployment's settings (whether blobs are shared: the restore's target says), and notes
/// of blobs put ahead of their writes (the sweep's business).
const SKIPPED: [&str; 5] = ["uploads", "nonces", "hub_key", "settings", "pending_blobs"];

/// What a dump or a restore moved.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpSummary {
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Blobs, each verified by digest.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
}

fn io(what: &str, e: impl std::fmt::Display) -> HubError {
    HubError::Storage(format!("{what}: {e}"))
}

fn append(tar: &mut tar::Builder<impl Write>, path: &str, bytes: &[u8], mode: u32) -> Result<(), HubError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, path, bytes).map_err(|e| io(path, e))
}

/// A reader that hashes what it hands out.
struct Hashing<R> {
    inner: R,
    hasher: DigestWriter,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl HubStore {
    /// Writes the hub's whole state to `file` (see the module's documentation), reading every
    /// blob once to verify it.
    ///
    /// # Errors
    /// [`HubError::Storage`] when a blob does not match its digest (the dump is removed) or
    /// writing fails.
    pub fn dump(&self, file: &Path) -> Result<DumpSummary, HubError> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        // A file that exists is never touched; one this dump made is removed if it fails.
        let out = opts.open(file).map_err(|e| io(&file.display().to_string(), e))?;
        let result = self.dump_into(out);
        if result.is_err() {
            let _ = std::fs::remove_file(file);
        }
        result
    }

    fn dump_into(&self, out: std::fs::File) -> Result<DumpSummary, HubError> {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(out));
        let mut summary = DumpSummary::default();
        let mut served: Option<Vec<String>> = None;
        {
            // One read transaction: the rows are of one moment, and so are the blobs named.
            let tx = self.read_tx()?;
            if self.shared.is_some() {
                served = Some(tx.query_all(super::SERVED_DIGESTS, params![], |r| r.get::<_, String>(0))?);
            }
            for table in tx.tables()?.iter().filter(|t| !SKIPPED.contains(&t.as_str())) {
                let query = format!("SELECT * FROM \"{table}\" ORDER BY rowid");
                // PostgreSQL's tables have their insertion order as a column; it is not dumped.
                let columns: Vec<(usize, String)> =
                    tx.columns(&query)?.into_iter().enumerate().filter(|(_, c)| c != "rowid").collect();
                let mut text = Vec::new();
                let mut n = 0u64;
                tx.query_all(&query, params![], |row| {
                    let mut obj = Map::new();
                    for (i, c) in &columns {
                        let v = row
                            .json(*i)
                            .map_err(|e| db::DbError::Type { column: *i, why: format!("{table}.{c}: {e}") })?;
                        obj.insert(c.clone(), v);
                    }
                    serde_json::to_writer(&mut text, &obj)
                        .map_err(|e| db::DbError::Type { column: 0, why: e.to_string() })?;
                    text.push(b'\n');
                    n += 1;
                    Ok(())
                })?;
                append(&mut tar, &format!("tables/{table}.jsonl"), &text, 0o644)?;
                summary.rows.insert(table.clone(), n);
            }
        }
        // With shared blobs this directory is a cache: the blobs the hub serves are dumped,
        // each fetched if this process has not seen it.
        // Each is read as soon as it is fetched: the cache may evict what was fetched long ago.
        let files: Box<dyn Iterator<Item = Result<PathBuf, HubError>> + '_> = match &served {
            Some(digests) => Box::new(digests.iter().map(|d| self.dump_blob(&super::parse_digest(d)?))),
            None => Box::new(self.blob_files()?.into_iter().map(Ok)),
        };
        for path in files {
            let path = path?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let digest = Digest::from_hex(&name).map_err(|e| io(&name, e))?;
            // Streamed into the dump, hashed on the way: a blob of any size in bounded memory.
            let what = path.display().to_string();
            let file = std::fs::File::open(&path).map_err(|e| io(&what, e))?;
            let len = file.metadata().map_err(|e| io(&what, e))?.len();
            let mut h = tar::Header::new_gnu();
            h.set_size(len);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            let mut reading = Hashing { inner: file, hasher: DigestWriter::new() };
            tar.append_data(&mut h, format!("blobs/{name}"), &mut reading).map_err(|e| io(&what, e))?;
            if reading.hasher.len() != len || reading.hasher.finish() != digest {
                return Err(HubError::Storage(format!("blob {digest} is corrupt on disk; nothing was dumped")));
            }
            summary.blobs += 1;
            summary.blob_bytes += len;
        }
        let key = std::fs::read(self.dir.join("identity/hub.json")).map_err(|e| io("the hub's key", e))?;
        append(&mut tar, "identity/hub.json", &key, 0o600)?;
        let manifest = serde_json::json!({"format": FORMAT, "summary": summary});
        append(&mut tar, MANIFEST, manifest.to_string().as_bytes(), 0o644)?;
        let mut w = tar.into_inner().map_err(|e| io("the dump", e))?;
        w.flush().map_err(|e| io("the dump", e))?;
        w.get_ref().sync_all().map_err(|e| io("the dump", e))?;
        Ok(summary)
    }

    /// The file of a blob a dump names: this process's copy, or the shared store's fetched
    /// into the directory.
    fn dump_blob(&self, digest: &Digest) -> Result<PathBuf, HubError> {
        match self.local_blob(digest)? {
            Some(path) => Ok(path),
            None if self.shared.is_some() => Err(HubError::Conflict(format!(
                "blob {digest} left the shared store while the dump was read (the hub changed): dump again"
            ))),
            None => Err(HubError::NotFound(digest.to_string())),
        }
    }

    /// The stored blobs' files (`<2 hex>/<64 hex>`), sorted.
    fn blob_files(&self) -> Result<Vec<PathBuf>, HubError> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.blobs.dir())?.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            if n.len() != 2 || !d.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(d.path())?.flatten() {
                if f.file_name().len() == 64 {
                    out.push(f.path());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Restores a dump into `dir`, which must hold no hub yet, and opens it. Every blob is
    /// checked against its digest and every row against the tables' columns; when anything
    /// is refused, `dir` is left as it was.
    ///
    /// # Errors
    /// [`HubError::Conflict`] when `dir` holds a hub; [`HubError::BadRequest`] for a dump
    /// that is not one, of another format, with a blob that does not match its name or a row
    /// that does not fit.
    pub fn restore(dir: &Path, file: &Path) -> Result<(HubStore, DumpSummary), HubError> {
        Self::restore_to(dir, &Database::Sqlite, file)
    }

    /// Restores a dump into a hub whose blobs go to `dir` (which must hold no hub yet) and
    /// whose records go to `database` (which must hold none: with PostgreSQL, a database
    /// that another hub's key or records are in is refused), and opens it. A refused
    /// restore into PostgreSQL writes no records, but leaves the schema and the dump's key.
    ///
    /// # Errors
    /// As [`HubStore::restore`].
    pub fn restore_to(dir: &Path, database: &Database, file: &Path) -> Result<(HubStore, DumpSummary), HubError> {
        Self::restore_with(dir, database, file, None)
    }

    /// [`HubStore::restore_to`] for a hub with shared blobs: `share` stores each restored
    /// blob (a file and its verified digest) in the shared store before the records are
    /// committed, so no record names a blob the shared store lacks; when it fails, nothing
    /// is recorded.
    ///
    /// # Errors
    /// As [`HubStore::restore`], and `share`'s.
    pub fn restore_with(
        dir: &Path,
        database: &Database,
        file: &Path,
        share: Option<&SharedRestore<'_>>,
    ) -> Result<(HubStore, DumpSummary), HubError> {
        // Checked before anything is written (a restore into PostgreSQL commits its records
        // before the directory takes the restored blobs).
        if dir.exists() && !dir.is_dir() {
            return Err(HubError::Conflict(format!("{} is a file, not a directory to restore into", dir.display())));
        }
        let occupied = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
        if occupied {
            return Err(HubError::Conflict(format!(
                "{} is not empty (it may hold a hub); restore into an empty directory",
                dir.display()
            )));
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| io(&parent.display().to_string(), e))?;
        let staging = tempfile::Builder::new()
            .prefix(".tessera-restore-")
            .tempdir_in(parent)
            .map_err(|e| io(&parent.display().to_string(), e))?;
        let summary = restore_into(staging.path(), database, file, share)?;
        if dir.exists() {
            // An empty directory (checked: no hub in it) gives way to the restored one.
            std::fs::remove_dir(dir).map_err(|e| {
                HubError::Conflict(format!("{} is not empty ({e}); restore into an empty directory", dir.display()))
            })?;
        }
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, dir) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(io(&dir.display().to_string(), e));
        }
        let store = HubStore::open_database(dir, database, tessera_package::Limits::default())?;
        Ok((store, summary))
    }
}

/// Checks a restored value as the hub's own writes would have made it: names, versions,
/// digests and keys parse, and the columns holding JSON hold what their readers expect.
/// Columns not listed take any value of their type.
fn check_value(table: &str, column: &str, v: &Value) -> Result<(), String> {
    let text = || v.as_str().ok_or_else(|| format!("{v} is not text"));
    let json = || serde_json::from_str::<Value>(text()?).map_err(|e| format!("not JSON: {e}"));
    let key = |k: &str| k.parse::<tessera_identity::PublicKey>().map(drop).map_err(|e| e.to_string());
    match (table, column) {
        (_, "signer" | "grantee") if v.is_null() => Ok(()),
        (_, "signer" | "grantee") => key(text()?),
        ("packages" | "models" | "aliases" | "grants", "name") => {
            super::parse_name(text()?).map(drop).map_err(|e| e.to_string())
        }
        ("packages" | "models" | "aliases", "version") => {
            super::parse_version(text()?).map(drop).map_err(|e| e.to_string())
        }
        (_, "digest") if v.is_null() => Ok(()),
        (_, "digest") => super::parse_digest(text()?).map(drop).map_err(|e| e.to_string()),
        ("models", "metadata") | ("components", "document") | ("packages", "manifest") => {
            json()?.is_object().then_some(()).ok_or_else(|| "not a JSON object".to_owned())
        }
        ("packages", "tags") => json()?.is_array().then_some(()).ok_or_else(|| "not a JSON array".to_owned()),
        ("models", "lineage") if v.is_null() => Ok(()),
        ("models", "lineage") => json().map(drop),
        ("namespaces", "namespace") => tessera_core::name::check_ident("namespace", text()?).map_err(|e| e.to_string()),
        ("namespaces", "owners") => {
            let keys: Vec<String> = serde_json::from_str(text()?).map_err(|e| format!("not a list of keys: {e}"))?;
            keys.iter().try_for_each(|k| key(k))
        }
        _ => Ok(()),
    }
}

/// A read error of the dump: one that ended early says the dump was cut.
fn cut_or(e: std::io::Error, bad: &impl Fn(String) -> HubError) -> HubError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad(format!("the dump ends early ({e}): it was cut; nothing was restored"))
    } else {
        bad(e.to_string())
    }
}

/// Reads the dump into a new hub at `dir` (a fresh staging directory).
/// Stores one restored blob in a shared store: its file and digest.
pub type ShareBlob<'a> = dyn Fn(&Path, &Digest) -> Result<(), HubError> + Sync + 'a;

/// Where a restore's blobs go when they are shared: the buckets the restored database
/// records ([`HubStore::restore_blob_buckets`]) and what stores each blob in them.
pub struct SharedRestore<'a> {
    /// The buckets (blobs, small blobs) `put` stores into.
    pub buckets: (String, String),
    /// Stores one restored blob.
    pub put: &'a ShareBlob<'a>,
}

fn restore_into(
    dir: &Path,
    database: &Database,
    file: &Path,
    share: Option<&SharedRestore<'_>>,
) -> Result<DumpSummary, HubError> {
    let bad = |why: String| HubError::BadRequest(format!("{}: {why}", file.display()));
    // The key first, so the hub opens with the dumped one rather than making its own.
    let mut key: Option<Vec<u8>> = None;
    let mut tables: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifest: Option<Value> = None;
    let mut summary = DumpSummary::default();
    let blobs = tessera_ports::FsBlobStore::open(dir.join("blobs"))?;
    let f = std::fs::File::open(file).map_err(|e| bad(e.to_string()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| cut_or(e, &bad))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!("entry {path:?} is not a file")));
        }
        let size = entry.header().size().map_err(|e| bad(e.to_string()))?;
        if let Some(hex) = path.strip_prefix("blobs/") {
            let digest = Digest::from_hex(hex).map_err(|e| bad(format!("entry {path:?}: {e}")))?;
            // Streamed to a file beside the store, hashed on the way, adopted once it matches.
            let tmp = blobs.temp_path();
            let mut out = std::fs::File::create(&tmp)?;
            let mut h = DigestWriter::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(|e| cut_or(e, &bad))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            out.sync_all()?;
            drop(out);
            if h.len() != size {
                let _ = std::fs::remove_file(&tmp);
                return Err(bad(format!(
                    "the dump ends inside blob {digest} ({} of its {size} bytes): it was cut; nothing was restored",
                    h.len()
                )));
            }
            if h.finish() != digest {
                let _ = std::fs::remove_file(&tmp);
                return Err(bad(format!("blob {digest} does not match its digest; nothing was restored")));
            }
            blobs.adopt_file(&tmp, &digest)?;
            summary.blobs += 1;
            summary.blob_bytes += h.len();
            continue;
        }
        if size > 1 << 30 {
            return Err(bad(format!("entry {path:?} is {size} bytes")));
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
        let twice = || bad(format!("the dump holds {path:?} twice"));
        match path.as_str() {
            "identity/hub.json" if key.is_some() => return Err(twice()),
            "identity/hub.json" => key = Some(bytes),
            MANIFEST if manifest.is_some() => return Err(twice()),
            MANIFEST => manifest = Some(serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?),
            p => match p.strip_prefix("tables/").and_then(|t| t.strip_suffix(".jsonl")) {
                Some(t) if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                    if tables.insert(t.to_owned(), bytes).is_some() {
                        return Err(twice());
                    }
                }
                _ => return Err(bad(format!("unexpected entry {path:?}"))),
            },
        }
    }
    let manifest = manifest.ok_or_else(|| bad("not a hub dump (no tessera-hub-dump.json)".into()))?;
    if manifest["format"] != FORMAT {
        return Err(bad(format!("dump format {} (this hub reads {FORMAT})", manifest["format"])));
    }
    // The manifest counts what the dump holds: a table or rows taken out, or blobs cut off,
    // refuse the dump before anything is written.
    let declared: DumpSummary = serde_json::from_value(manifest["summary"].clone())
        .map_err(|e| bad(format!("the dump's manifest has no summary of what it holds: {e}")))?;
    let held: BTreeMap<String, u64> = tables
        .iter()
        .map(|(t, text)| (t.clone(), text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() as u64))
        .collect();
    if held != declared.rows || summary.blobs != declared.blobs {
        return Err(bad(format!(
            "the dump holds {} blobs and rows {held:?}, but its manifest says {} blobs and rows {:?}: it was changed or cut",
            summary.blobs, declared.blobs, declared.rows
        )));
    }
    let key = key.ok_or_else(|| bad("the dump holds no hub key".into()))?;
    let id = dir.join("identity");
    std::fs::create_dir_all(&id)?;
    #[cfg(unix)]
    std::fs::set_permissions(&id, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(id.join("hub.json"))?.write_all(&key)?;
    // The schema of this hub, then the rows, in one transaction. A database that holds
    // another hub's key holds that hub.
    let store = HubStore::open_database(dir, database, tessera_package::Limits::default()).map_err(|e| match e {
        HubError::Conflict(_) => HubError::Conflict(
            "the database holds another hub's key (a hub's, or one left by a refused restore of another dump); \
             restore into an empty database"
                .into(),
        ),
        e => e,
    })?;
    let holds_a_hub = |tx: &super::Tx<'_>| -> Result<bool, HubError> {
        let held: i64 = tx.query_row(
            "SELECT (SELECT COUNT(*) FROM packages) + (SELECT COUNT(*) FROM models)
                  + (SELECT COUNT(*) FROM components) + (SELECT COUNT(*) FROM namespaces)",
            params![],
            |r| r.get(0),
        )?;
        Ok(held > 0)
    };
    let refused = || HubError::Conflict("the database holds a hub's records already; restore into an empty one".into());
    // Looked at before the notes below are written, and again under the write lock.
    if holds_a_hub(&store.read_tx()?)? {
        return Err(refused());
    }
    // Blobs going to the shared store are noted first, in their own transaction: a restore
    // that dies after putting them leaves notes for the sweep of the hub processes over
    // this database (a refused restore into PostgreSQL keeps the schema, and so its notes;
    // into SQLite the staging directory goes with its notes, and a refused restore's puts
    // stay in the shared store).
    if let Some(share) = share {
        // The buckets go on record first, committed: a hub process starting over this
        // database meanwhile uses them, and one that recorded others before is found here.
        super::record_blob_buckets(&store.db(), &share.buckets)?;
        if store.shared_blob_buckets()? != share.buckets {
            return Err(HubError::Conflict(
                "a hub process over this database keeps its blobs in other buckets; restore into an empty database \
                 with no hub process over it"
                    .into(),
            ));
        }
    }
    let mut notes = Vec::new();
    if share.is_some() {
        for path in store.blob_files()? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            notes.push(store.note_pending(&Digest::from_hex(&name).map_err(|e| bad(e.to_string()))?)?);
        }
    }
    let tx = store.write_tx()?;
    if holds_a_hub(&tx)? {
        return Err(refused());
    }
    for (table, text) in &tables {
        let columns = tx.table_columns(table)?;
        if columns.is_empty() || SKIPPED.contains(&table.as_str()) {
            return Err(bad(format!("table {table} is not a table of this hub")));
        }
        let mut n = 0u64;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let row: Map<String, Value> =
                serde_json::from_slice(line).map_err(|e| bad(format!("a row of {table}: {e}")))?;
            let mut names = Vec::new();
            let mut values: Vec<db::Param> = Vec::new();
            for (k, v) in row {
                let Some((_, integer)) = columns.iter().find(|(c, _)| *c == k && c != "rowid") else {
                    return Err(bad(format!("table {table} has no column {k:?}")));
                };
                check_value(table, &k, &v).map_err(|why| bad(format!("table {table}, column {k}: {why}")))?;
                names.push(format!("\"{k}\""));
                values.push(match v {
                    Value::Null if *integer => db::Param::Int(None),
                    Value::Null => db::Param::Text(None),
                    Value::Bool(b) => db::Param::Int(Some(i64::from(b))),
                    Value::Number(x) if *integer => match x.as_i64() {
                        Some(i) => db::Param::Int(Some(i)),
                        None => return Err(bad(format!("table {table}, column {k}: {x} is not an integer"))),
                    },
                    Value::Number(x) => match x.as_i64() {
                        Some(i) => db::Param::Int(Some(i)),
                        None => db::Param::Real(Some(x.as_f64().unwrap_or(0.0))),
                    },
                    Value::String(s) if *integer => {
                        return Err(bad(format!("table {table}, column {k}: {s:?} is not an integer")));
                    }
                    Value::String(s) => db::Param::Text(Some(s)),
                    other => return Err(bad(format!("table {table}, column {k}: {other} is not a column value"))),
                });
            }
            let marks: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
            tx.execute(
                &format!("INSERT INTO \"{table}\" ({}) VALUES ({})", names.join(", "), marks.join(", ")),
                &values,
            )
            .map_err(|e| bad(format!("a row of {table}: {e}")))?;
            n += 1;
        }
        summary.rows.insert(table.clone(), n);
    }
    // Every restored record reads back as the hub reads it (what `check_value` does not
    // see: cards, manifests, keys of entries, revisions without their entry).
    let read_back = |e: HubError| bad(format!("the dump holds what this hub cannot read: {e}"));
    super::models::check_rows(&tx).map_err(read_back)?;
    super::packages::check_rows(&tx).map_err(read_back)?;
    super::components::check_rows(&tx).map_err(read_back)?;
    super::namespaces::check_rows(&tx).map_err(read_back)?;
    // Every row that names a blob has it.
    for query in [
        "SELECT digest FROM packages WHERE deleted = 0",
        "SELECT digest FROM models WHERE deleted = 0",
        "SELECT digest FROM component_revisions",
    ] {
        let table = query.split_whitespace().nth(3).unwrap_or_default();
        let digests: Vec<Option<String>> = tx.query_all(query, params![], |r| r.get(0))?;
        for d in digests.into_iter().flatten() {
            let digest: Digest = d.parse().map_err(|e| bad(format!("{table}: {e}")))?;
            if !blobs.path_of(&digest).exists() {
                return Err(bad(format!("{table} names blob {digest}, which the dump does not hold")));
            }
        }
    }
    if let Some(share) = share {
        super::record_shared_blobs(&tx)?;
        super::record_blob_buckets(&tx, &share.buckets)?;
        let served: Vec<String> = tx.query_all(super::SERVED_DIGESTS, params![], |r| r.get(0))?;
        for d in served {
            let digest = super::parse_digest(&d)?;
            (share.put)(&blobs.path_of(&digest), &digest)?;
        }
    }
    tx.commit()?;
    for token in notes {
        store.forget_pending(&token);
    }
    Ok(summary)
}
