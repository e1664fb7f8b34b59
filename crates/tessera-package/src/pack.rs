//! Packing a module folder into deterministic bytes.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tessera_core::Digest;
use tessera_core::manifest::{MANIFEST_FILE, Manifest, ManifestError, check_relative_path};

use crate::{FileInfo, IGNORE_FILE, IGNORED_DIRS, Limits, PackageInfo, ZSTD_LEVEL, check_entry};

/// A packed module.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The package bytes.
    pub bytes: Vec<u8>,
    /// Their digest: the package id.
    pub digest: Digest,
    /// What it holds.
    pub info: PackageInfo,
}

/// Why a folder could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading the folder failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The folder has no `module.yaml`.
    #[error("{0} has no module.yaml: a module is a folder with a module.yaml at its root")]
    NoManifest(PathBuf),
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The folder's `.tesseraignore` is malformed.
    #[error("{path}: {why}")]
    Ignore {
        /// The ignore file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Something in the folder cannot go in a package.
    #[error("cannot pack {path}: {why}")]
    Refused {
        /// The offending path, relative to the module folder.
        path: String,
        /// Why.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_owned(), source }
}

/// The matcher of a folder's [`IGNORE_FILE`] (gitignore syntax, through the `ignore` crate),
/// or none.
fn ignore_rules(dir: &Path) -> Result<Option<ignore::gitignore::Gitignore>, PackError> {
    let path = dir.join(IGNORE_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let mut builder = ignore::gitignore::GitignoreBuilder::new(dir);
    if let Some(e) = builder.add(&path) {
        return Err(PackError::Ignore { path, why: e.to_string() });
    }
    let rules = builder.build().map_err(|e| PackError::Ignore { path, why: e.to_string() })?;
    Ok(Some(rules))
}

/// Packs a module folder. The same folder (same relative paths, contents and executable
/// bits) always gives the same bytes. `.git/`, `target/`, `__pycache__/` and `.venv/`
/// stay out, and so does whatever the folder's `.tesseraignore` names (gitignore syntax);
/// `module.yaml` always goes in.
pub fn pack_dir(dir: &Path, limits: &Limits) -> Result<Packed, PackError> {
    pack_dir_inner(dir, limits, None)
}

/// Packs a module folder as a development build: its version becomes the pre-release
/// `<version>-dev.<12 hex digits of the folder's own package digest>` (in the packed
/// `module.yaml` only; the folder is not touched). The same folder gives the same dev
/// version and bytes; any change gives another, so each can be published next to the
/// others and never becomes `latest` over a release.
pub fn pack_dir_dev(dir: &Path, limits: &Limits) -> Result<Packed, PackError> {
    let plain = pack_dir(dir, limits)?;
    let v = &plain.info.manifest.version;
    let dev = format!("{}.{}.{}-dev.{}", v.major, v.minor, v.patch, &plain.digest.hex()[..12]);
    pack_dir_inner(dir, limits, Some(&dev))
}

/// `text` with its top-level `version:` line set to `version`.
fn with_version(text: &str, version: &str) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if !found && l.starts_with("version:") {
                found = true;
                format!("version: {version}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

fn pack_dir_inner(dir: &Path, limits: &Limits, version: Option<&str>) -> Result<Packed, PackError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = match fs::read_to_string(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PackError::NoManifest(dir.to_owned())),
        Err(e) => return Err(PackError::Io { path: manifest_path, source: e }),
    };
    let text = match version {
        None => text,
        Some(v) => with_version(&text, v).ok_or_else(|| PackError::Refused {
            path: MANIFEST_FILE.into(),
            why: "no top-level `version:` line to set the development version on".into(),
        })?,
    };
    let manifest = Manifest::parse(&text)?;

    let mut files = Vec::new();
    let rules = ignore_rules(dir)?;
    collect(dir, "", rules.as_ref(), &mut files)?;
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if files.len() > limits.max_entries {
        return Err(PackError::Refused {
            path: ".".into(),
            why: format!("{} files is over the limit of {}", files.len(), limits.max_entries),
        });
    }
    let mut total = 0u64;
    for (rel, _, size, _) in &files {
        if *size > limits.max_entry_bytes {
            return Err(PackError::Refused {
                path: rel.clone(),
                why: format!("{size} bytes is over the per-file limit of {}", limits.max_entry_bytes),
            });
        }
        total += size;
    }
    if total > limits.max_total_bytes {
        return Err(PackError::Refused {
            path: ".".into(),
            why: format!("{total} bytes in all is over the limit of {}", limits.max_total_bytes),
        });
    }
    check_entry(&manifest, |p| files.iter().any(|(rel, ..)| rel == p))
        .map_err(|why| PackError::Refused { path: manifest.entry.clone(), why })?;

    let mut encoder = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(io_err(dir))?;
    encoder.include_checksum(true).map_err(io_err(dir))?;
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    for (rel, full, size, executable) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        if version.is_some() && rel == MANIFEST_FILE {
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            builder.append_data(&mut header, rel, text.as_bytes()).map_err(io_err(full))?;
            continue;
        }
        header.set_size(*size);
        header.set_mode(if *executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let file = fs::File::open(full).map_err(io_err(full))?;
        // Read exactly the size recorded, so a file growing meanwhile cannot corrupt the archive.
        let reader = file.take(*size);
        builder
            .append_data(&mut header, rel, ExactReader { inner: reader, left: *size, path: full })
            .map_err(io_err(full))?;
    }
    let encoder = builder.into_inner().map_err(io_err(dir))?;
    let bytes = encoder.finish().map_err(io_err(dir))?;
    if bytes.len() as u64 > limits.max_package_bytes {
        return Err(PackError::Refused {
            path: ".".into(),
            why: format!("the package is {} bytes, over the limit of {}", bytes.len(), limits.max_package_bytes),
        });
    }
    let digest = Digest::of(&bytes);
    let packed_readme = files.iter().any(|(path, ..)| path == crate::unpack::README_FILE);
    let readme = std::fs::read(dir.join(crate::unpack::README_FILE))
        .ok()
        .filter(|_| packed_readme)
        .filter(|b| b.len() <= tessera_core::card::MAX_CARD_BYTES)
        .and_then(|b| String::from_utf8(b).ok());
    let info = PackageInfo {
        readme,
        digest,
        size: bytes.len() as u64,
        manifest,
        files: files
            .into_iter()
            .map(|(path, _, size, executable)| {
                let size = if version.is_some() && path == MANIFEST_FILE { text.len() as u64 } else { size };
                FileInfo { path, size, executable }
            })
            .collect(),
    };
    Ok(Packed { bytes, digest, info })
}

/// Reads exactly `left` bytes or fails (the file shrank while being packed).
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed size while being packed", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

type Collected = (String, PathBuf, u64, bool);

fn collect(
    dir: &Path,
    prefix: &str,
    rules: Option<&ignore::gitignore::Gitignore>,
    out: &mut Vec<Collected>,
) -> Result<(), PackError> {
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PackError::Refused {
                path: format!("{prefix}{}", name.to_string_lossy()),
                why: "the file name is not UTF-8".into(),
            });
        };
        let rel = format!("{prefix}{name}");
        let meta = fs::symlink_metadata(entry.path()).map_err(io_err(&entry.path()))?;
        let ft = meta.file_type();
        if rel != MANIFEST_FILE && rules.is_some_and(|r| r.matched(entry.path(), ft.is_dir()).is_ignore()) {
            continue;
        }
        if ft.is_symlink() {
            return Err(PackError::Refused {
                path: rel,
                why: "it is a symlink; packages hold regular files only".into(),
            });
        }
        if ft.is_dir() {
            if IGNORED_DIRS.contains(&name) {
                continue;
            }
            collect(&entry.path(), &format!("{rel}/"), rules, out)?;
            continue;
        }
        if !ft.is_file() {
            return Err(PackError::Refused {
                path: rel,
                why: "it is not a regular file (device, socket or FIFO)".into(),
            });
        }
        check_relative_path(&rel)
            .map_err(|why| PackError::Refused { path: rel.clone(), why: format!("the path {why}") })?;
        out.push((rel, entry.path(), meta.len(), is_executable(&meta)));
    }
    Ok(())
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    false
}
