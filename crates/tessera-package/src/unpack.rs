//! Reading packages: verifying, inspecting and unpacking hostile bytes safely.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tessera_core::Digest;
use tessera_core::manifest::{MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, ManifestError, check_relative_path};

use crate::{FileInfo, Limits, PackageInfo, check_entry};

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The bytes do not have the digest they were announced with.
    #[error("package digest mismatch: expected {expected}, the bytes are {actual}")]
    DigestMismatch {
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// The compressed package is over the size limit.
    #[error("package of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The archive is malformed (not zstd, not tar, truncated).
    #[error("malformed package: {0}")]
    Malformed(String),
    /// One entry is refused.
    #[error("package entry {entry:?} refused: {why}")]
    Entry {
        /// The entry's path as written in the archive.
        entry: String,
        /// Why.
        why: String,
    },
    /// The package has no `module.yaml`.
    #[error("the package has no module.yaml at its root")]
    NoManifest,
    /// The manifest inside is invalid.
    #[error("invalid manifest in package: {0}")]
    Manifest(#[from] ManifestError),
    /// Writing the unpacked files failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Checks that `bytes` have the digest `expected`.
pub fn verify(bytes: &[u8], expected: &Digest) -> Result<(), UnpackError> {
    let actual = Digest::of(bytes);
    if &actual != expected {
        return Err(UnpackError::DigestMismatch { expected: *expected, actual });
    }
    Ok(())
}

/// Reads and validates a package without writing anything: every entry is checked and
/// every byte decompressed, within the limits.
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<PackageInfo, UnpackError> {
    check_size(bytes.len() as u64, limits)?;
    walk(bytes, Digest::of(bytes), bytes.len() as u64, limits, None)
}

/// Like [`inspect`], for a package read from `reader` whose digest and size the caller
/// already knows (a streamed upload hashed while it was written to disk).
pub fn inspect_reader(
    reader: impl Read,
    digest: Digest,
    size: u64,
    limits: &Limits,
) -> Result<PackageInfo, UnpackError> {
    check_size(size, limits)?;
    walk(io::BufReader::new(reader), digest, size, limits, None)
}

/// The file a module's card is read from.
pub const README_FILE: &str = "README.md";

fn check_size(size: u64, limits: &Limits) -> Result<(), UnpackError> {
    if size > limits.max_package_bytes {
        return Err(UnpackError::TooLarge { size, limit: limits.max_package_bytes });
    }
    Ok(())
}

/// Unpacks a package into `dest`, which must not exist yet. On failure nothing is left at
/// `dest`.
pub fn unpack(bytes: &[u8], dest: &Path, limits: &Limits) -> Result<PackageInfo, UnpackError> {
    if dest.exists() {
        return Err(UnpackError::Io {
            path: dest.to_owned(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "the destination already exists"),
        });
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pkg".into());
    // A staging name of its own: several unpacks (threads, processes) may share a parent.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = parent.join(format!(".{name}.unpacking-{}-{n}", std::process::id()));
    fs::create_dir_all(parent).map_err(|source| UnpackError::Io { path: parent.to_owned(), source })?;
    fs::create_dir(&staging).map_err(|source| UnpackError::Io { path: staging.clone(), source })?;
    check_size(bytes.len() as u64, limits)?;
    match walk(bytes, Digest::of(bytes), bytes.len() as u64, limits, Some(&staging)) {
        Ok(info) => {
            fs::rename(&staging, dest).map_err(|source| {
                let _ = fs::remove_dir_all(&staging);
                UnpackError::Io { path: dest.to_owned(), source }
            })?;
            Ok(info)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// A reader that fails once more than `limit` bytes have come through.
struct Capped<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(Bomb(self.limit)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct Bomb(u64);
impl std::fmt::Display for Bomb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the package decompresses to more than {} bytes (a decompression bomb?)", self.0)
    }
}
impl std::error::Error for Bomb {}

fn malformed(e: &io::Error) -> UnpackError {
    if let Some(b) = e.get_ref().and_then(|i| i.downcast_ref::<Bomb>()) {
        return UnpackError::TooLarge { size: b.0 + 1, limit: b.0 };
    }
    UnpackError::Malformed(e.to_string())
}

fn walk<R: io::BufRead>(
    input: R,
    digest: Digest,
    size: u64,
    limits: &Limits,
    dest: Option<&Path>,
) -> Result<PackageInfo, UnpackError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input).map_err(|e| malformed(&e))?;
    // Refuse frames that ask for a window over 128 MiB: bounded decoder memory.
    decoder.window_log_max(27).map_err(|e| malformed(&e))?;
    // Tar adds at most three 512-byte blocks per entry (header, long name, padding).
    let stream_limit = limits
        .max_total_bytes
        .saturating_add((limits.max_entries as u64 + 2).saturating_mul(1536))
        .saturating_add(20 * 512);
    let mut capped = Capped { inner: decoder, read: 0, limit: stream_limit };
    let mut archive = tar::Archive::new(&mut capped);
    let mut files: Vec<FileInfo> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    let mut file_paths = BTreeSet::new();
    let mut manifest_text: Option<String> = None;
    let mut readme: Option<String> = None;
    let mut total = 0u64;
    let mut count = 0usize;

    let entries = archive.entries().map_err(|e| malformed(&e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| malformed(&e))?;
        count += 1;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |why: String| UnpackError::Entry { entry: raw.chars().take(300).collect(), why };
        if count > limits.max_entries {
            return Err(refuse(format!("the package has more than {} entries", limits.max_entries)));
        }
        let path =
            std::str::from_utf8(&entry.path_bytes()).map_err(|_| refuse("the path is not UTF-8".into()))?.to_owned();
        let ty = entry.header().entry_type();
        let trimmed = if ty.is_dir() { path.trim_end_matches('/') } else { path.as_str() };
        check_relative_path(trimmed).map_err(|why| refuse(format!("the path {why}")))?;
        if !seen.insert(trimmed.to_owned()) {
            return Err(refuse("the path appears twice".into()));
        }
        // A path may not run through something that is a file.
        for (i, _) in trimmed.match_indices('/') {
            let parent = &trimmed[..i];
            if file_paths.contains(parent) {
                return Err(refuse(format!("its parent {parent:?} is a file")));
            }
            dirs.insert(parent.to_owned());
        }
        match ty {
            t if t.is_dir() => {
                if file_paths.contains(trimmed) {
                    return Err(refuse("a file of that name exists".into()));
                }
                dirs.insert(trimmed.to_owned());
                if let Some(d) = dest {
                    let p = d.join(trimmed);
                    fs::create_dir_all(&p).map_err(|source| UnpackError::Io { path: p, source })?;
                }
                continue;
            }
            t if t.is_file() => {}
            t if t.is_symlink() => return Err(refuse("it is a symlink; packages hold regular files only".into())),
            t if t.is_hard_link() => return Err(refuse("it is a hard link; packages hold regular files only".into())),
            t if t.is_character_special() || t.is_block_special() => {
                return Err(refuse("it is a device; packages hold regular files only".into()));
            }
            t if t.is_fifo() => return Err(refuse("it is a FIFO; packages hold regular files only".into())),
            t => return Err(refuse(format!("entry type {:?} is not allowed", t.as_byte() as char))),
        }
        if dirs.contains(trimmed) {
            return Err(refuse("a directory of that name exists".into()));
        }
        let size = entry.header().size().map_err(|e| refuse(e.to_string()))?;
        if size > limits.max_entry_bytes {
            return Err(refuse(format!("{size} bytes is over the per-file limit of {}", limits.max_entry_bytes)));
        }
        total = total.saturating_add(size);
        if total > limits.max_total_bytes {
            return Err(UnpackError::TooLarge { size: total, limit: limits.max_total_bytes });
        }
        let mode = entry.header().mode().unwrap_or(0o644);
        let executable = mode & 0o111 != 0;
        let copied = if trimmed == MANIFEST_FILE {
            if size > MAX_MANIFEST_BYTES as u64 {
                return Err(refuse(format!("module.yaml is over {MAX_MANIFEST_BYTES} bytes")));
            }
            let mut buf = Vec::with_capacity(size as usize);
            (&mut entry).take(size).read_to_end(&mut buf).map_err(|e| malformed(&e))?;
            if let Some(d) = dest {
                write_file(&d.join(trimmed), &buf, false)?;
            }
            let n = buf.len() as u64;
            manifest_text = Some(String::from_utf8(buf).map_err(|_| refuse("module.yaml is not UTF-8".into()))?);
            n
        } else if trimmed == README_FILE && size <= tessera_core::card::MAX_CARD_BYTES as u64 {
            // The module's card; kept as text when it is UTF-8.
            let mut buf = Vec::with_capacity(size as usize);
            (&mut entry).take(size).read_to_end(&mut buf).map_err(|e| malformed(&e))?;
            if let Some(d) = dest {
                write_file(&d.join(trimmed), &buf, executable)?;
            }
            let n = buf.len() as u64;
            readme = String::from_utf8(buf).ok();
            n
        } else if let Some(d) = dest {
            let p = d.join(trimmed);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|source| UnpackError::Io { path: parent.to_owned(), source })?;
            }
            let mut f = create_new(&p, executable)?;
            let n = io::copy(&mut (&mut entry).take(size), &mut f).map_err(|e| malformed(&e))?;
            f.flush().map_err(|source| UnpackError::Io { path: p.clone(), source })?;
            n
        } else {
            io::copy(&mut (&mut entry).take(size), &mut io::sink()).map_err(|e| malformed(&e))?
        };
        if copied != size {
            return Err(UnpackError::Malformed(format!("entry {trimmed:?} is truncated ({copied} of {size} bytes)")));
        }
        file_paths.insert(trimmed.to_owned());
        files.push(FileInfo { path: trimmed.to_owned(), size, executable });
    }
    // Read to the end of the zstd stream: this checks the frame's checksum and catches
    // truncation and trailing garbage.
    io::copy(&mut capped, &mut io::sink()).map_err(|e| malformed(&e))?;

    let text = manifest_text.ok_or(UnpackError::NoManifest)?;
    let manifest = Manifest::parse(&text)?;
    check_entry(&manifest, |p| file_paths.contains(p))
        .map_err(|why| UnpackError::Entry { entry: manifest.entry.clone(), why })?;
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(PackageInfo { digest, size, manifest, files, readme })
}

fn create_new(p: &Path, executable: bool) -> Result<fs::File, UnpackError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if executable { 0o755 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = executable;
    opts.open(p).map_err(|source| UnpackError::Io { path: p.to_owned(), source })
}

fn write_file(p: &Path, bytes: &[u8], executable: bool) -> Result<(), UnpackError> {
    let mut f = create_new(p, executable)?;
    f.write_all(bytes).map_err(|source| UnpackError::Io { path: p.to_owned(), source })
}
