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
//! `.lock`, so a directory being made is never taken for an abandoned one. Only the
//! directories of the same user are swept, and the directory is made with mode 0700.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name every scratch directory begins with.
pub(crate) const PREFIX: &str = "tessera-round-";

/// The lock file's name inside a scratch directory.
const LOCK: &str = ".lock";

/// A round's scratch directory (mode 0700: the updates it holds are nobody else's to
/// read), removed on drop.
pub(crate) struct Scratch {
    path: PathBuf,
    /// `None` where the file system has no `flock` (the directory is then never swept).
    lock: Option<File>,
}

impl Scratch {
    /// Makes a scratch directory in `parent` (the system's temporary directory in a
    /// round), after removing the abandoned ones there. Blocking: it lists `parent` and
    /// may delete a dead round's updates.
    ///
    /// # Errors
    /// The I/O error of making the directory or its lock file.
    pub(crate) fn new_in(parent: &Path) -> std::io::Result<Scratch> {
        use std::os::unix::fs::PermissionsExt;
        remove_abandoned(parent);
        let path = tempfile::Builder::new()
            .prefix(PREFIX)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)?
            .keep();
        let mut scratch = Scratch { path, lock: None };
        let making = scratch.path.join(".lock.making");
        let lock = File::create(&making)?;
        match lock.lock() {
            Ok(()) => {
                std::fs::rename(&making, scratch.path.join(LOCK))?;
                scratch.lock = Some(lock);
            }
            // No locks here: carry on unswept (a sweeper cannot lock it either).
            Err(e) => tracing::debug!("locking {}: {e}; a crash would leave it", making.display()),
        }
        Ok(scratch)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    /// Removes the directory, the updates first and the lock file last (so a coordinator
    /// killed meanwhile leaves a directory the next sweep still recognises), then lets the
    /// lock go; on a blocking thread when on a Tokio runtime (it may be gigabytes of
    /// updates), at once otherwise.
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        let lock = self.lock.take();
        let remove = move || {
            remove_lock_last(&path);
            drop(lock);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Removes scratch directory `dir`: everything but `.lock`, then the rest.
fn remove_lock_last(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name() != LOCK {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

/// Removes the scratch directories in `parent` whose owner is gone (their `.lock` can be
/// locked). Only directories of this process's effective user are looked at, and `.lock`
/// only when it is a regular file (opened without following a link or waiting on a
/// FIFO); a directory without `.lock` (being made, or not one of ours) is left alone, as
/// is anything that is not a directory. Failures are logged, never returned: a leftover
/// costs disk space, not correctness.
pub(crate) fn remove_abandoned(parent: &Path) {
    remove_abandoned_of(parent, rustix::process::geteuid().as_raw());
}

/// [`remove_abandoned`] for the directories of user `me`.
fn remove_abandoned_of(parent: &Path, me: u32) {
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
        let dir: PathBuf = entry.path();
        // Not followed: a symbolic link named like a scratch directory is not ours.
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == me => {}
            _ => continue,
        }
        let Some(lock) = open_lock(&dir.join(LOCK)) else { continue };
        match lock.try_lock() {
            Ok(()) => {
                // The lock is on the file now at `.lock`, not one that replaced it.
                let same = match (lock.metadata(), std::fs::symlink_metadata(dir.join(LOCK))) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                };
                if !same {
                    continue;
                }
                tracing::info!("removing {}, a round's scratch its coordinator left", dir.display());
                remove_lock_last(&dir);
            }
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => tracing::debug!("locking {}: {e}", dir.display()),
        }
    }
}

/// `path` opened for reading if it is a regular file: not through a link, and without
/// blocking on a FIFO.
fn open_lock(path: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    let fd =
        rustix::fs::open(path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
            .ok()?;
    let file = File::from(fd);
    file.metadata().ok().filter(|m| m.is_file()).map(|_| file)
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
        // A `.lock` that is a FIFO (opening it would wait for a writer) or a link: left
        // alone, without waiting.
        let fifo = parent.path().join(format!("{PREFIX}fifo"));
        std::fs::create_dir(&fifo).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, fifo.join(LOCK), rustix::fs::FileType::Fifo, 0o600.into(), 0).unwrap();
        let linked = parent.path().join(format!("{PREFIX}linked"));
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(target.path().join(LOCK), linked.join(LOCK)).unwrap();
        // Swept as another user would: nothing of ours is touched.
        let me = rustix::process::geteuid().as_raw();
        remove_abandoned_of(parent.path(), me.wrapping_add(1));
        assert!(dead.exists(), "another user's sweep leaves our directories alone");

        // The next round's scratch sweeps.
        let next = Scratch::new_in(parent.path()).unwrap();
        assert!(!dead.exists(), "an abandoned scratch directory is removed");
        assert!(live.path().join("0").exists(), "a live round's scratch is kept");
        assert!(making.exists() && file.exists() && link.exists() && other.exists());
        assert!(fifo.exists() && linked.exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(next.path()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700, "the updates are nobody else's to read");
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
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let stdout = child.stdout.take().unwrap();
        let child = Kill(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        remove_abandoned(parent.path());
        assert!(dir.exists(), "kept while its process lives");
        drop(child);
        remove_abandoned(parent.path());
        assert!(!dir.exists(), "removed once its process is gone");
    }
}
