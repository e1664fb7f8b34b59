//! Runs' `/scratch` folders. Making and removing a folder costs a run about as much as a
//! short task's own work on ext4, so a folder a run leaves as it found it goes to the next
//! run: empty, no larger than a new folder (a directory that held many entries keeps its
//! size, which would tell the next run how much was written), its timestamps reset (a run
//! may set them), at most [`REUSE_FOR`] old (no temporary-files cleaner, which waits days,
//! removes it meanwhile) and still the very folder the pool made (device and inode checked
//! before it is handed out, so nothing put at its path in between is opened). Anything
//! else is removed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Folders kept for reuse at most.
const POOL: usize = 64;

/// How long a folder is reused before a new one is made.
pub(crate) const REUSE_FOR: Duration = Duration::from_secs(60);

/// A folder the pool made: the folder, its identity, its size new, and when it was made.
struct Kept {
    dir: tempfile::TempDir,
    id: (u64, u64),
    size: u64,
    made: Instant,
}

/// Empty scratch folders, shared by a runtime's runs.
#[derive(Clone)]
pub(crate) struct ScratchPool {
    root: PathBuf,
    kept: Arc<Mutex<Vec<Kept>>>,
}

/// A run's `/scratch`: back to the pool when the run is done, if it left it as it was.
pub(crate) struct Scratch {
    kept: Option<Kept>,
    pool: ScratchPool,
}

impl ScratchPool {
    /// A pool making folders under `root`.
    pub(crate) fn new(root: PathBuf) -> ScratchPool {
        ScratchPool { root, kept: Arc::new(Mutex::new(Vec::new())) }
    }

    /// An empty folder: a reused one that passes the checks, or a new one.
    pub(crate) fn take(&self) -> std::io::Result<Scratch> {
        loop {
            let Some(k) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).pop() else { break };
            match identity(k.dir.path()) {
                Some((id, _)) if id == k.id && k.made.elapsed() < REUSE_FOR => {
                    return Ok(Scratch { kept: Some(k), pool: self.clone() });
                }
                // The pool's folder, too old: removed (by `TempDir`).
                Some((id, _)) if id == k.id => {}
                // Not the pool's folder any more: whatever is at the path is left alone.
                _ => {
                    let _ = k.dir.keep();
                }
            }
        }
        let dir = tempfile::Builder::new().prefix("tessera-wasm-scratch-").tempdir_in(&self.root)?;
        let (id, size) =
            identity(dir.path()).ok_or_else(|| std::io::Error::other("the new scratch folder vanished"))?;
        Ok(Scratch { kept: Some(Kept { dir, id, size, made: Instant::now() }), pool: self.clone() })
    }
}

/// A real directory's (device, inode) and size; `None` for anything else (a symlink).
fn identity(path: &Path) -> Option<((u64, u64), u64)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_dir().then(|| ((m.dev(), m.ino()), m.len()))
}

impl Scratch {
    /// The folder.
    pub(crate) fn path(&self) -> &Path {
        self.kept.as_ref().map_or(Path::new(""), |k| k.dir.path())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(k) = self.kept.take() else { return };
        let path = k.dir.path();
        let unchanged = identity(path).is_some_and(|(id, size)| id == k.id && size <= k.size);
        let empty = unchanged && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none());
        let reset = empty
            && std::fs::File::open(path)
                .and_then(|f| {
                    let now = SystemTime::now();
                    f.set_times(std::fs::FileTimes::new().set_accessed(now).set_modified(now))
                })
                .is_ok();
        let mut kept = self.pool.kept.lock().unwrap_or_else(|p| p.into_inner());
        if reset && k.made.elapsed() < REUSE_FOR && kept.len() < POOL {
            kept.push(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_folder_left_as_it_was_is_reused() {
        let root = tempfile::tempdir().unwrap();
        let pool = ScratchPool::new(root.path().to_owned());
        let first = pool.take().unwrap();
        let path = first.path().to_owned();
        // Timestamps a run set are reset before the next run sees the folder.
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::open(&path).unwrap().set_modified(old).unwrap();
        drop(first);
        let again = pool.take().unwrap();
        assert_eq!(again.path(), path, "reused");
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(modified > old + Duration::from_secs(1_000_000), "timestamps reset");

        // A folder left with anything in it is removed, not reused.
        std::fs::write(path.join("note"), b"left behind").unwrap();
        drop(again);
        assert!(!path.exists());
        let fresh = pool.take().unwrap();
        assert_ne!(fresh.path(), path);
        assert_eq!(std::fs::read_dir(fresh.path()).unwrap().count(), 0);

        // A folder that held many entries keeps its size on ext4: not reused either.
        let p = fresh.path().to_owned();
        for i in 0..2000 {
            std::fs::write(p.join(format!("entry-with-a-long-name-{i:05}")), b"").unwrap();
        }
        for i in 0..2000 {
            std::fs::remove_file(p.join(format!("entry-with-a-long-name-{i:05}"))).unwrap();
        }
        let grew = std::fs::metadata(&p).unwrap().len() > 4096;
        drop(fresh);
        assert_eq!(p.exists(), !grew, "kept only when its size is a new folder's");

        // Something else put at a pooled folder's path is never handed out.
        let kept = pool.take().unwrap();
        let kp = kept.path().to_owned();
        drop(kept);
        std::fs::remove_dir(&kp).unwrap();
        std::os::unix::fs::symlink(root.path(), &kp).unwrap();
        let next = pool.take().unwrap();
        assert_ne!(next.path(), kp);
        std::fs::remove_file(&kp).unwrap();
    }
}
