//! Module packages: a module folder turned into one deterministic archive, and back.
//!
//! A package is a tar archive compressed with zstd. Entries are sorted, metadata is
//! normalised (owner 0, mtime 0, mode 0644 or 0755), so the same folder always gives the
//! same bytes, and the package's id is the BLAKE3 digest of those bytes ([`Digest`]).
//!
//! Unpacking treats the bytes as hostile: it refuses absolute paths, `..`, symlinks, hard
//! links, devices, duplicate entries, and anything past the size and entry-count limits
//! (decompression bombs), and the error names the entry and the reason. It never writes
//! outside the destination folder and leaves nothing behind when it fails.
//!
//! This crate knows files and bytes; it does not know the hub, the network or how a module
//! runs.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_package::{Limits, pack_dir, unpack};
//! let packed = pack_dir(std::path::Path::new("my-module"), &Limits::default())?;
//! println!("{} is {}", packed.info.manifest.name, packed.digest);
//! unpack(&packed.bytes, std::path::Path::new("/tmp/out"), &Limits::default())?;
//! # Ok(()) }
//! ```

mod pack;
mod unpack;

pub use pack::{PackError, Packed, pack_dir, pack_dir_dev};
pub use unpack::{UnpackError, inspect, inspect_reader, unpack, verify};

use tessera_core::manifest::Manifest;
use tessera_core::{Digest, RuntimeKind};

/// The file extension used for packages on disk.
pub const EXTENSION: &str = "tpkg";

/// Directories never packed: build output and version-control data.
pub const IGNORED_DIRS: [&str; 4] = [".git", "target", "__pycache__", ".venv"];

/// The file in a module folder that says, in gitignore syntax, what stays out of its
/// package (besides [`IGNORED_DIRS`]); `module.yaml` always goes in.
pub const IGNORE_FILE: &str = ".tesseraignore";

/// zstd level used for packing (fixed: the level is part of what makes bytes repeatable).
pub const ZSTD_LEVEL: i32 = 9;

/// Limits applied when packing and unpacking.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most entries (files and directories).
    pub max_entries: usize,
    /// Largest unpacked total, in bytes.
    pub max_total_bytes: u64,
    /// Largest single file, in bytes.
    pub max_entry_bytes: u64,
    /// Largest compressed package, in bytes.
    pub max_package_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 10_000,
            max_total_bytes: 1 << 30,
            max_entry_bytes: 512 << 20,
            max_package_bytes: 512 << 20,
        }
    }
}

/// One file in a package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Relative, `/`-separated path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// True when packed with mode 0755.
    pub executable: bool,
}

/// What a package holds.
#[derive(Clone, Debug, PartialEq)]
pub struct PackageInfo {
    /// Its digest (the package id).
    pub digest: Digest,
    /// Its compressed size.
    pub size: u64,
    /// The validated manifest.
    pub manifest: Manifest,
    /// Its files, sorted by path.
    pub files: Vec<FileInfo>,
    /// Its `README.md` (the module's card), when it has one of at most
    /// [`tessera_core::card::MAX_CARD_BYTES`] in UTF-8.
    pub readme: Option<String>,
}

impl PackageInfo {
    /// Total unpacked size.
    pub fn unpacked_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Checks that a manifest's entry exists among the files (builtins have no file).
fn check_entry(manifest: &Manifest, has_file: impl Fn(&str) -> bool) -> Result<(), String> {
    if manifest.runtime != RuntimeKind::Builtin && !has_file(&manifest.entry) {
        let hint = if manifest.runtime == RuntimeKind::Wasm { " (build it first: tessera module build)" } else { "" };
        return Err(format!("the entry {:?} named in module.yaml is not in the module{hint}", manifest.entry));
    }
    Ok(())
}
