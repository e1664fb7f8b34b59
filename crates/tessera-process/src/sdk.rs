//! The Python SDK (`sdk/python/tessera/`), embedded so a node works with any `python3`.

use std::path::{Path, PathBuf};

use tessera_core::Digest;

/// The SDK's files: path under the SDK folder (what goes on `PYTHONPATH`) and text.
pub const SDK_FILES: &[(&str, &str)] = &[
    ("tessera/__init__.py", include_str!("../../../sdk/python/tessera/__init__.py")),
    ("tessera/_declare.py", include_str!("../../../sdk/python/tessera/_declare.py")),
    ("tessera/client.py", include_str!("../../../sdk/python/tessera/client.py")),
    ("tessera/dataflow.py", include_str!("../../../sdk/python/tessera/dataflow.py")),
    ("tessera/host.py", include_str!("../../../sdk/python/tessera/host.py")),
    ("tessera/protocol.py", include_str!("../../../sdk/python/tessera/protocol.py")),
    ("tessera/safetensors.py", include_str!("../../../sdk/python/tessera/safetensors.py")),
    ("tessera/swarm.py", include_str!("../../../sdk/python/tessera/swarm.py")),
    ("tessera/task.py", include_str!("../../../sdk/python/tessera/task.py")),
];

/// Why the SDK could not be written out.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// A file or folder could not be written.
    #[error("cannot write the Python SDK to {path}: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A short hash of the embedded SDK's files: the folder name of a cached copy.
pub fn sdk_version() -> String {
    let mut all = Vec::new();
    for (path, text) in SDK_FILES {
        all.extend_from_slice(&(path.len() as u64).to_le_bytes());
        all.extend_from_slice(path.as_bytes());
        all.extend_from_slice(&(text.len() as u64).to_le_bytes());
        all.extend_from_slice(text.as_bytes());
    }
    Digest::of(&all).hex()[..16].to_owned()
}

/// Writes the SDK's files under `dir` (`dir/tessera/...`), creating folders as needed.
pub fn write_sdk(dir: &Path) -> Result<(), SdkError> {
    for (rel, text) in SDK_FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SdkError::Write { path: parent.to_owned(), source })?;
        }
        std::fs::write(&path, text).map_err(|source| SdkError::Write { path: path.clone(), source })?;
    }
    Ok(())
}

/// Writes the SDK once under `cache_dir/python-sdk/<version>` (atomically: into a
/// temporary sibling, then renamed) and returns that folder.
pub fn cached_sdk(cache_dir: &Path) -> Result<PathBuf, SdkError> {
    let base = cache_dir.join("python-sdk");
    let dir = base.join(sdk_version());
    if dir.join(SDK_FILES[0].0).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base).map_err(|source| SdkError::Write { path: base.clone(), source })?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = base.join(format!(".tmp-{}-{nanos}", std::process::id()));
    let written = write_sdk(&tmp);
    let renamed = written.and_then(|()| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Someone else put it there first.
        Err(_) if dir.join(SDK_FILES[0].0).is_file() => Ok(()),
        Err(source) => Err(SdkError::Write { path: dir.clone(), source }),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    renamed.map(|()| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sdk_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python");
        let mut on_disk: Vec<String> = std::fs::read_dir(root.join("tessera"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".py"))
            .map(|n| format!("tessera/{n}"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(embedded, on_disk, "update SDK_FILES in src/sdk.rs");
        for (rel, text) in SDK_FILES {
            assert_eq!(&std::fs::read_to_string(root.join(rel)).unwrap(), text);
        }
    }

    #[test]
    fn the_cache_is_written_once() {
        let tmp = tempfile::tempdir().unwrap();
        let a = cached_sdk(tmp.path()).unwrap();
        assert!(a.ends_with(sdk_version()));
        for (rel, text) in SDK_FILES {
            assert_eq!(&std::fs::read_to_string(a.join(rel)).unwrap(), text);
        }
        assert_eq!(cached_sdk(tmp.path()).unwrap(), a);
        let entries = std::fs::read_dir(tmp.path().join("python-sdk")).unwrap().count();
        assert_eq!(entries, 1, "no temporary folder left behind");
    }
}
