//! A control group per module process tree: its memory, process count and CPU share are
//! bounded by the kernel, and everything in it is killed at once, however it was started
//! (a `setsid` child leaves the process group, never its cgroup).
//!
//! Both hierarchies are supported: cgroup v2 (one tree with `memory`, `pids` and `cpu`
//! enabled where the node runs, as under a systemd unit with `Delegate=yes` or as root at
//! the top) and cgroup v1 (a tree per controller, as on this project's CI machines). A
//! node's groups live in `<its own cgroup>/tessera-<node pid>/<instance>` in each
//! hierarchy, inside whatever limits the node itself has.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The controllers a node uses, in the hierarchy it found.
#[derive(Clone, Debug)]
pub(crate) enum Controllers {
    /// cgroup v2: one folder per group, every controller in it.
    V2 { base: PathBuf },
    /// cgroup v1: a folder per controller (`cpu` optional).
    V1 { memory: PathBuf, pids: PathBuf, cpu: Option<PathBuf> },
}

/// Where a node makes its groups, once it found it can.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    controllers: Controllers,
    next: AtomicU64,
}

/// A module's group: created before its process starts, emptied and removed when
/// dropped (whatever happened in between, a failed start included).
#[derive(Debug)]
pub(crate) struct Cgroup {
    /// The group's folder in each hierarchy; the first holds `pids` (where processes are
    /// listed for killing).
    dirs: Vec<PathBuf>,
    /// The `memory` folder and whether it is v2.
    memory: (PathBuf, bool),
}

/// Limits of one group.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GroupLimits {
    /// Bytes of memory (RAM, swap not allowed where the kernel accounts it).
    pub memory: Option<u64>,
    /// Processes and threads at once.
    pub processes: Option<u64>,
    /// CPU cores' worth of time (a fraction allowed), enforced as a CFS quota.
    pub cpu: Option<f64>,
}

const CFS_PERIOD_US: u64 = 100_000;

/// This process's cgroup path in the hierarchy named `key` in `/proc/self/cgroup`
/// (`""` for v2's `0::`, else a controller such as `memory`).
fn own_path(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if key.is_empty() { controllers.is_empty() } else { controllers.split(',').any(|c| c == key) };
        hit.then(|| path.trim_start_matches('/').to_owned())
    })
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
}

/// Makes `dir` (and its parents) unless present.
fn make(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

impl CgroupRoot {
    /// Finds a hierarchy this process may make groups in, making its own folder there;
    /// `Err` says why none could be used.
    pub(crate) fn detect() -> Result<CgroupRoot, String> {
        let node = format!("tessera-{}", std::process::id());
        let mount = Path::new("/sys/fs/cgroup");
        let v1 = |c: &str| {
            let top = mount.join(c);
            top.join("cgroup.procs").exists().then(|| top.join(own_path(c).unwrap_or_default()).join(&node))
        };
        let controllers = if let (Some(memory), Some(pids)) = (v1("memory"), v1("pids")) {
            for dir in [&memory, &pids] {
                if let Some(parent) = dir.parent() {
                    remove_stale(parent);
                }
                make(dir).map_err(|e| format!("cgroup v1: cannot make {}: {e}", dir.display()))?;
            }
            let cpu = v1("cpu").filter(|d| {
                if let Some(parent) = d.parent() {
                    remove_stale(parent);
                }
                make(d).is_ok()
            });
            Controllers::V1 { memory, pids, cpu }
        } else {
            let available = std::fs::read_to_string(mount.join("cgroup.controllers"))
                .map_err(|_| "no cgroup v1 memory and pids controllers, and no cgroup v2 hierarchy".to_owned())?;
            for needed in ["memory", "pids"] {
                if !available.split_whitespace().any(|c| c == needed) {
                    return Err(format!("cgroup v2: the {needed} controller is not available"));
                }
            }
            let parent = mount.join(own_path("").unwrap_or_default());
            let base = parent.join(&node);
            remove_stale(&parent);
            // Controllers are handed down through each level's subtree_control; a group
            // with processes of its own (other than the top) cannot hand them down.
            let wanted: Vec<&str> = ["memory", "pids", "cpu"]
                .into_iter()
                .filter(|c| available.split_whitespace().any(|a| a == *c))
                .collect();
            let enable = wanted.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
            write(&parent.join("cgroup.subtree_control"), &enable).map_err(|e| {
                format!(
                    "cgroup v2: cannot enable {} below {} ({e}); run the node in a delegated cgroup",
                    enable,
                    parent.display()
                )
            })?;
            make(&base).map_err(|e| format!("cgroup v2: cannot make {}: {e}", base.display()))?;
            write(&base.join("cgroup.subtree_control"), &enable)
                .map_err(|e| format!("cgroup v2: cannot enable {enable} in {}: {e}", base.display()))?;
            Controllers::V2 { base }
        };
        Ok(CgroupRoot { controllers, next: AtomicU64::new(0) })
    }

    /// `"v1"` or `"v2"`, and the controllers in use.
    pub(crate) fn describe(&self) -> String {
        match &self.controllers {
            Controllers::V2 { base } => format!("cgroup v2 (memory, pids, cpu) under {}", base.display()),
            Controllers::V1 { memory, cpu, .. } => format!(
                "cgroup v1 (memory, pids{}) under {}",
                if cpu.is_some() { ", cpu" } else { "" },
                memory.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
            ),
        }
    }

    /// Makes a new, empty group with `limits`.
    pub(crate) fn create(&self, limits: GroupLimits) -> std::io::Result<Cgroup> {
        let name = format!("i{}", self.next.fetch_add(1, Ordering::Relaxed));
        let group = match &self.controllers {
            Controllers::V2 { base } => {
                let dir = base.join(&name);
                make(&dir)?;
                Cgroup { dirs: vec![dir.clone()], memory: (dir, true) }
            }
            Controllers::V1 { memory, pids, cpu } => {
                let mut dirs = vec![pids.join(&name), memory.join(&name)];
                if let Some(cpu) = cpu {
                    dirs.push(cpu.join(&name));
                }
                for d in &dirs {
                    make(d)?;
                }
                Cgroup { memory: (dirs[1].clone(), false), dirs }
            }
        };
        // A failure from here on drops the group, which removes its folders.
        group.limit(&self.controllers, limits)?;
        Ok(group)
    }
}

impl Cgroup {
    fn limit(&self, controllers: &Controllers, limits: GroupLimits) -> std::io::Result<()> {
        let v2 = matches!(controllers, Controllers::V2 { .. });
        let (memory_dir, _) = &self.memory;
        if let Some(bytes) = limits.memory {
            if v2 {
                write(&memory_dir.join("memory.max"), &bytes.to_string())?;
                // Not every kernel accounts swap; where it does, none is allowed.
                let _ = write(&memory_dir.join("memory.swap.max"), "0");
            } else {
                write(&memory_dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                let _ = write(&memory_dir.join("memory.memsw.limit_in_bytes"), &bytes.to_string());
            }
        }
        if let Some(n) = limits.processes {
            write(&self.dirs[0].join("pids.max"), &n.max(1).to_string())?;
        }
        if let Some(cores) = limits.cpu.filter(|c| *c > 0.0 && c.is_finite()) {
            // At least 1 ms of each 100 ms period, at most 1024 cores.
            let quota = ((cores.min(1024.0) * CFS_PERIOD_US as f64) as u64).max(1000);
            match controllers {
                Controllers::V2 { .. } => write(&self.dirs[0].join("cpu.max"), &format!("{quota} {CFS_PERIOD_US}"))?,
                Controllers::V1 { cpu: Some(_), .. } => {
                    let dir = &self.dirs[2];
                    write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Controllers::V1 { cpu: None, .. } => {}
            }
        }
        Ok(())
    }

    /// cgroup v1's per-thread `tasks` files, one per hierarchy: a thread written there
    /// moves alone, and what it starts is born in the group. `None` on v2, where only
    /// whole processes move.
    pub(crate) fn thread_files(&self) -> Option<Vec<PathBuf>> {
        (!self.memory.1).then(|| self.dirs.iter().map(|d| d.join("tasks")).collect())
    }

    /// Moves process `pid` (and so all it starts from now on) into the group.
    pub(crate) fn add(&self, pid: u32) -> std::io::Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Kills every process in the group (v2's `cgroup.kill` where the kernel has it,
    /// else each listed process, again until none is left or a few rounds passed: a
    /// process forking meanwhile is bounded by `pids.max`).
    pub(crate) fn kill(&self) {
        let Some(dir) = self.dirs.first() else { return };
        if self.memory.1 && write(&dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        kill_listed(dir);
    }

    /// True once the kernel's out-of-memory killer has killed something in the group.
    pub(crate) fn oom_killed(&self) -> bool {
        let (dir, v2) = &self.memory;
        let file = if *v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(dir.join(file)).ok().is_some_and(|t| {
            t.lines()
                .any(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()).is_some_and(|n| n > 0))
        })
    }
}

/// Moves the calling thread into the groups whose `tasks` files are `files` (cgroup v1;
/// `0` names the writer).
pub(crate) fn join_this_thread(files: &[PathBuf]) -> std::io::Result<()> {
    for f in files {
        write(f, "0")?;
    }
    Ok(())
}

/// Kills every process listed in `dir`'s `cgroup.procs`, again until none is left or a
/// few rounds passed. Never this process: on cgroup v1 the thread that spawned a child
/// is in the child's group until it ends, which lists this process there.
fn kill_listed(dir: &Path) {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    for _ in 0..16 {
        let procs: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).filter(|p| *p != me).collect())
            .unwrap_or_default();
        if procs.is_empty() {
            return;
        }
        for pid in procs.into_iter().filter_map(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Cgroup {
    /// Kills what is left and removes the group's folders, in the background: a folder
    /// goes only once the kernel has reaped every process that was in it.
    fn drop(&mut self) {
        self.kill();
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
        let attempt = move || {
            for _ in 0..200 {
                if dirs.iter().all(|d| std::fs::remove_dir(d).is_ok() || !d.exists()) {
                    return;
                }
                kill_listed(&dirs[0]);
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            tracing::warn!("module cgroup {} could not be removed", dirs[0].display());
        };
        let _ = std::thread::Builder::new().name("tessera-cgroup-rm".into()).spawn(attempt);
    }
}

/// Removes the groups of nodes that are gone (`tessera-<pid>` with no such process),
/// their empty instance groups first.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("tessera-")) else { continue };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(groups) = std::fs::read_dir(entry.path()) {
            for g in groups.flatten().filter(|g| g.path().is_dir()) {
                // What a node that died left running goes with its group.
                kill_listed(&g.path());
                let _ = std::fs::remove_dir(g.path());
            }
        }
        let _ = std::fs::remove_dir(entry.path());
    }
}
