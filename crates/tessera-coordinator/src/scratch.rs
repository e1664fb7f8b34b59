//! A round's scratch directory in the system's temporary directory (`TMPDIR`): where a
//! windowed round copies the updates of a store without positioned reads. It is removed
//! when the round ends; one left by a coordinator that died mid-round is removed by the
//! next round that makes one.
//!
//! Ownership is an advisory lock (`flock`), not a process id, so coordinators in other PID
//! namespaces sharing the directory are told apart: each scratch directory holds `.lock`,
//! locked (exclusively) for as long as its round lives, and the kernel lets the lock go
//! when the process dies, however it dies. A directory whose `.lock` can be locked has no
//! owner left. The lock is taken on a file under another name and only then renamed to
//! `.lock`, so a directory being made is never taken for an abandoned one.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The name every scratch directory begins with.
pub(crate) const PREFIX: &str = "tessera-round-";

/// The lock file's name inside a scratch directory.
const LOCK: &str = ".lock";

/// A round's scratch directory, removed on drop.
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
    _lock: File,
}

impl Scratch {
    /// Makes a scratch directory in `parent` (the system's temporary directory in a
    /// round), after removing the abandoned ones there.
    ///
    /// # Errors
    /// The I/O error of making the directory, its lock file, or the lock.
    pub(crate) fn new_in(parent: &Path) -> std::io::Result<Scratch> {
        remove_abandoned(parent);
        let dir = tempfile::Builder::new().prefix(PREFIX).tempdir_in(parent)?;
        let making = dir.path().join(".lock.making");
        let lock = File::create(&making)?;
        lock.lock()?;
        std::fs::rename(&making, dir.path().join(LOCK))?;
        Ok(Scratch { dir, _lock: lock })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the scratch directories in `parent` whose owner is gone (their `.lock` can be
/// locked). A directory without `.lock` (being made, or not one of ours) is left alone, as
/// is anything that is not a directory. Failures are logged, never returned: a leftover
/// costs disk space, not correctness.
pub(crate) fn remove_abandoned(parent: &Path) {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!("listing {} for abandoned round scratch: {e}", parent.display());
            return;
        }
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        // Not followed: a symbolic link named like a scratch directory is not ours.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir: PathBuf = entry.path();
        let Ok(lock) = File::open(dir.join(LOCK)) else { continue };
        match lock.try_lock() {
            Ok(()) => {
                tracing::info!("removing {}, a round's scratch its coordinator left", dir.display());
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => tracing::debug!("locking {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_scratch_is_removed_and_live_scratch_kept() {
        let parent = tempfile::tempdir().unwrap();
        let live = Scratch::new_in(parent.path()).unwrap();
        std::fs::write(live.path().join("0"), b"update").unwrap();
        assert!(live.path().join(LOCK).exists());
        assert!(!live.path().join(".lock.making").exists());

        // A coordinator that died: its directory and lock file are there, the lock is not
        // held (a lock's holder dropping it is what the kernel does at a process's death).
        let dead = parent.path().join(format!("{PREFIX}dead"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("3"), vec![0u8; 4096]).unwrap();
        // Being made (no `.lock` yet), a file, and a link to a directory: left alone.
        let making = parent.path().join(format!("{PREFIX}making"));
        std::fs::create_dir(&making).unwrap();
        std::fs::write(making.join(".lock.making"), b"").unwrap();
        let file = parent.path().join(format!("{PREFIX}file"));
        std::fs::write(&file, b"").unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join(LOCK), b"").unwrap();
        let link = parent.path().join(format!("{PREFIX}link"));
        std::os::unix::fs::symlink(target.path(), &link).unwrap();
        // Someone else's directory.
        let other = parent.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(LOCK), b"").unwrap();

        // The next round's scratch sweeps.
        let next = Scratch::new_in(parent.path()).unwrap();
        assert!(!dead.exists(), "an abandoned scratch directory is removed");
        assert!(live.path().join("0").exists(), "a live round's scratch is kept");
        assert!(making.exists() && file.exists() && link.exists() && other.exists());
        assert!(target.path().join(LOCK).exists(), "a link is not followed");

        // A round that ends removes its own.
        let (live_path, next_path) = (live.path().to_owned(), next.path().to_owned());
        drop(live);
        drop(next);
        assert!(!live_path.exists() && !next_path.exists());
    }

    #[test]
    fn a_scratch_whose_process_died_is_removed() {
        use std::io::BufRead;
        // A real process takes a scratch directory's lock (flock, as `File::lock` does),
        // says so, and is killed.
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join(format!("{PREFIX}child"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(LOCK), b"").unwrap();
        let mut child = std::process::Command::new("python3")
            .args(["-c", "import fcntl, sys, time\nf = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)"])
            .arg(dir.join(LOCK))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        remove_abandoned(parent.path());
        assert!(dir.exists(), "kept while its process lives");
        child.kill().unwrap();
        child.wait().unwrap();
        remove_abandoned(parent.path());
        assert!(!dir.exists(), "removed once its process is gone");
    }
}
