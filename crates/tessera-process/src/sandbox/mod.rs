//! Containment of module processes: what a child of the `python` and `process` runtimes
//! may read, write, reach and use.
//!
//! Each protection uses the kernel's own mechanism through a maintained crate:
//!
//! | protection | mechanism | what it stops |
//! |---|---|---|
//! | `filesystem` | Landlock (`landlock` crate, ABI 1+) | reading or writing anything but the module's code, its interpreter's environment, system libraries, and its own scratch folder (writable) |
//! | `network` | seccomp (`seccompiler`): `socket(2)` and `io_uring_setup(2)` fail with `EACCES` (with a grant, only IPv4 and IPv6 sockets are allowed); Landlock ABI 4+ also refuses TCP `bind`/`connect` | any socket but the pipes to the node (`socketpair(2)` stays) |
//! | (with `network`) | the same filter: `chmod`/`chown`/`*xattr` calls, and `prlimit64`, `setpriority`, `sched_setaffinity`, `ioprio_set` on another process, fail | changing the modes or owners of shared files (the SDK, environments), throttling the node |
//! | `signals` | Landlock ABI 6+ scopes | signalling processes outside the module's own tree, connecting to abstract UNIX sockets |
//! | `memory`, `processes` | a cgroup per process tree (v1 or v2): `memory.max`, `pids.max`, `cpu.max` | using more memory than declared, fork bombs, more CPU than declared |
//! | (always) | `prlimit(2)`: `RLIMIT_NOFILE`, `RLIMIT_CORE` 0, `RLIMIT_CPU` when the policy sets it | exhausting file descriptors, core dumps of module memory on disk |
//!
//! The restrictions are put on a fresh thread that then spawns the child (Landlock
//! domains, seccomp filters and `no_new_privs` belong to a thread and pass to the
//! processes it starts); the thread ends right after, so the node itself is never
//! restricted. Datasets are not in the file-system rules: modules read them through the
//! node (`dataset_read`), which checks grants.

mod cgroup;
mod rules;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tessera_core::ByteSize;
use tokio::process::{Child, Command};

pub(crate) use cgroup::Cgroup;
use cgroup::{CgroupRoot, GroupLimits};
pub(crate) use rules::interpreter_dirs;

/// One protection a node can put around a module's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// Landlock file-system rules.
    Filesystem,
    /// No sockets without a grant (seccomp).
    Network,
    /// A memory limit (cgroup).
    Memory,
    /// A process-count limit, and killing a whole tree however it detached (cgroup).
    Processes,
}

impl Protection {
    /// Every protection.
    pub const ALL: [Protection; 4] =
        [Protection::Filesystem, Protection::Network, Protection::Memory, Protection::Processes];
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protection::Filesystem => "filesystem",
            Protection::Network => "network",
            Protection::Memory => "memory",
            Protection::Processes => "processes",
        })
    }
}

fn default_require() -> Vec<Protection> {
    vec![Protection::Filesystem, Protection::Network]
}
fn default_max_processes() -> u64 {
    256
}
fn default_memory() -> ByteSize {
    ByteSize(4 << 30)
}
fn default_max_open_files() -> u64 {
    1024
}

/// What a node asks of its module processes' containment: the `sandbox:` section of its
/// policy file. Every protection the machine supports is always applied; `require` says
/// which ones the node refuses to start without (unless run `--degraded`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPolicy {
    /// Protections the node must be able to enforce to start. Default: `filesystem`
    /// and `network` (Landlock and seccomp, on any Linux since 5.13).
    #[serde(default = "default_require")]
    pub require: Vec<Protection>,
    /// Modules whose processes may use the network: names, name prefixes ending in `.`
    /// (`acme.fetch`, `acme.`), or `*` for any. A module asking for it
    /// (`needs.network: true`) that is not listed is refused at launch.
    #[serde(default)]
    pub network_modules: Vec<String>,
    /// Processes and threads one module instance may have at once (cgroup `pids.max`).
    #[serde(default = "default_max_processes")]
    pub max_processes: u64,
    /// Memory of a module that declares none (`needs.memory`). Default 4 GiB.
    #[serde(default = "default_memory")]
    pub default_memory: ByteSize,
    /// Files (and sockets, pipes) one module process may have open at once
    /// (`RLIMIT_NOFILE`).
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u64,
    /// CPU seconds one module process may use in its life (`RLIMIT_CPU`; past it the
    /// kernel kills it). None by default: calls have wall-time limits, and an actor lives
    /// across many calls.
    #[serde(default)]
    pub max_cpu_seconds: Option<u64>,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            require: default_require(),
            network_modules: Vec::new(),
            max_processes: default_max_processes(),
            default_memory: default_memory(),
            max_open_files: default_max_open_files(),
            max_cpu_seconds: None,
        }
    }
}

impl SandboxPolicy {
    /// Whether `module`'s processes may use the network.
    pub fn allows_network(&self, module: &str) -> bool {
        self.network_modules
            .iter()
            .any(|p| if p.ends_with('.') { module.starts_with(p.as_str()) } else { module == p || p == "*" })
    }
}

/// What this machine can enforce, found once per process by trying each mechanism.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Support {
    /// The Landlock ABI in effect (the kernel's, up to what the crate knows), or why none.
    pub landlock: Result<u8, String>,
    /// Whether a seccomp filter could be installed, or why not.
    pub seccomp: Result<(), String>,
    /// The cgroup hierarchy in use, or why none could be used.
    pub cgroup: Result<String, String>,
}

impl Support {
    /// Whether `p` can be enforced here.
    pub fn enforces(&self, p: Protection) -> bool {
        match p {
            Protection::Filesystem => self.landlock.is_ok(),
            Protection::Network => self.seccomp.is_ok(),
            Protection::Memory | Protection::Processes => self.cgroup.is_ok(),
        }
    }

    /// The protections enforced here.
    pub fn enforced(&self) -> Vec<Protection> {
        Protection::ALL.into_iter().filter(|p| self.enforces(*p)).collect()
    }

    /// Lines for `tessera node doctor`: each mechanism, whether it is on, and why not.
    pub fn report(&self) -> Vec<(String, String)> {
        let line = |r: Result<String, String>| match r {
            Ok(s) => format!("on: {s}"),
            Err(e) => format!("off: {e}"),
        };
        vec![
            (
                "landlock".into(),
                line(self.landlock.clone().map(|abi| {
                    let extra = match abi {
                        1..=3 => "files",
                        4 | 5 => "files, TCP bind/connect",
                        _ => "files, TCP bind/connect, signal and abstract-socket scopes",
                    };
                    format!("ABI {abi} ({extra})")
                })),
            ),
            (
                "seccomp".into(),
                line(self.seccomp.clone().map(|()| {
                    "sockets refused without a grant, io_uring, chmod/chown/xattr and resource calls on other \
                     processes refused"
                        .into()
                })),
            ),
            ("cgroup".into(), line(self.cgroup.clone())),
        ]
    }
}

/// The node's sandbox: its policy and what the machine offers.
#[derive(Debug)]
pub struct Sandbox {
    policy: SandboxPolicy,
    support: Support,
    cgroups: Option<Arc<CgroupRoot>>,
    /// Paths no module may read, nor any folder holding them (the node's home and keys,
    /// its cache, its dataset files).
    protected: Vec<PathBuf>,
}

/// What the machine offers, tried once per process.
fn machine() -> &'static (Support, Option<Arc<CgroupRoot>>) {
    static MACHINE: OnceLock<(Support, Option<Arc<CgroupRoot>>)> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let cgroups = CgroupRoot::detect();
        let support = Support {
            landlock: rules::probe_landlock(),
            seccomp: rules::probe_seccomp(),
            cgroup: cgroups.as_ref().map(|c| c.describe()).map_err(Clone::clone),
        };
        (support, cgroups.ok().map(Arc::new))
    })
}

/// Why a node cannot contain its modules as its policy requires.
#[derive(Debug, thiserror::Error)]
#[error("this machine cannot enforce the sandbox protection(s) the node's policy requires: {}", .missing.iter().map(|(p, why)| format!("{p} ({why})")).collect::<Vec<_>>().join("; "))]
pub struct Unenforceable {
    /// Each missing protection and why.
    pub missing: Vec<(Protection, String)>,
}

impl Sandbox {
    /// The sandbox for `policy` on this machine: every protection the machine supports.
    pub fn new(policy: SandboxPolicy) -> Self {
        let (support, cgroups) = machine().clone();
        Sandbox { policy, support, cgroups, protected: Vec::new() }
    }

    /// The same sandbox, never opening to a module a folder that holds one of `paths`
    /// (a read folder the runtime asks for that does is left out, with a warning).
    #[must_use]
    pub fn with_protected(mut self, paths: impl IntoIterator<Item = PathBuf>) -> Self {
        self.protected.extend(paths.into_iter().map(|p| std::path::absolute(&p).unwrap_or(p)));
        self
    }

    /// No containment at all (modules run as the node's user, with its files and
    /// network): for trusted code on machines without the kernel features.
    pub fn off() -> Self {
        let none = || Err("turned off".to_owned());
        Sandbox {
            policy: SandboxPolicy { require: Vec::new(), ..SandboxPolicy::default() },
            support: Support { landlock: Err("turned off".into()), seccomp: none(), cgroup: Err("turned off".into()) },
            cgroups: None,
            protected: Vec::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &SandboxPolicy {
        &self.policy
    }

    /// What is enforced.
    pub fn support(&self) -> &Support {
        &self.support
    }

    /// `Err` naming every protection the policy requires that this machine cannot
    /// enforce.
    pub fn check(&self) -> Result<(), Unenforceable> {
        let why = |p: Protection| match p {
            Protection::Filesystem => self.support.landlock.clone().err(),
            Protection::Network => self.support.seccomp.clone().err(),
            Protection::Memory | Protection::Processes => self.support.cgroup.clone().err(),
        };
        let missing: Vec<_> = self.policy.require.iter().filter_map(|p| why(*p).map(|w| (*p, w))).collect();
        if missing.is_empty() { Ok(()) } else { Err(Unenforceable { missing }) }
    }

    /// Spawns `cmd` contained by `plan`: on a fresh thread that joins the child's cgroup
    /// (cgroup v1 moves a thread; on v2 the child is moved right after it starts) and
    /// takes on the Landlock rules and the seccomp filter, then spawns the child, which
    /// inherits all three before it runs an instruction of its own.
    pub(crate) async fn spawn(&self, mut cmd: Command, mut plan: Plan) -> std::io::Result<(Child, Option<Cgroup>)> {
        plan.read = self.open_to_modules(std::mem::take(&mut plan.read));
        let limits = GroupLimits {
            memory: Some(plan.memory.unwrap_or(self.policy.default_memory.0)),
            processes: Some(self.policy.max_processes),
            cpu: plan.cpu,
        };
        let group = self.cgroups.as_ref().map(|root| root.create(limits)).transpose()?;
        let thread_join = group.as_ref().and_then(Cgroup::thread_files);
        let landlock = self.support.landlock.is_ok();
        let seccomp = self.support.seccomp.is_ok();
        let network = plan.network;
        let handle = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("tessera-spawn".into()).spawn(move || {
            let spawned = (|| {
                if let Some(files) = &thread_join {
                    cgroup::join_this_thread(files)?;
                }
                if landlock {
                    rules::restrict_files(&plan)?;
                }
                if seccomp {
                    rules::apply_filter(network)?;
                }
                let _runtime = handle.enter();
                cmd.spawn()
            })();
            let _ = tx.send(spawned);
        })?;
        let child = rx.await.map_err(|_| std::io::Error::other("the spawning thread ended without a child"))??;
        // Gone before the child runs on its own: on cgroup v1 the thread sits in the
        // child's group (counted by its limits, listed among its processes) until it ends.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Some(pid) = child.id() {
            self.limit(pid)?;
            if let Some(group) = &group
                && group.thread_files().is_none()
            {
                group.add(pid)?;
            }
        }
        Ok((child, group))
    }

    /// `read` without the folders holding a protected path (each left out with a warning).
    fn open_to_modules(&self, mut read: Vec<PathBuf>) -> Vec<PathBuf> {
        read.retain(|dir| {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            let holds = self.protected.iter().find(|p| p.starts_with(&dir));
            if let Some(p) = holds {
                tracing::warn!("not opening {} to a module: it holds {}", dir.display(), p.display());
            }
            holds.is_none()
        });
        read
    }

    /// Sets a child's open-file and CPU-time limits (`prlimit(2)`).
    fn limit(&self, pid: u32) -> std::io::Result<()> {
        use rustix::process::{Pid, Resource, Rlimit, prlimit};
        // `None` would mean this process: a child without a valid pid is refused instead.
        let pid = Some(
            i32::try_from(pid)
                .ok()
                .and_then(Pid::from_raw)
                .ok_or_else(|| std::io::Error::other(format!("the child has no valid pid ({pid})")))?,
        );
        let files = self.policy.max_open_files.max(16);
        prlimit(pid, Resource::Nofile, Rlimit { current: Some(files), maximum: Some(files) })?;
        prlimit(pid, Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })?;
        if let Some(secs) = self.policy.max_cpu_seconds {
            prlimit(pid, Resource::Cpu, Rlimit { current: Some(secs), maximum: Some(secs.saturating_add(1)) })?;
        }
        Ok(())
    }
}

/// What one module process may use.
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    /// Read (and execute) only.
    pub read: Vec<PathBuf>,
    /// Read and write.
    pub write: Vec<PathBuf>,
    /// Whether it may use the network.
    pub network: bool,
    /// Its memory (`needs.memory`), when declared.
    pub memory: Option<u64>,
    /// Its CPU cores (`needs.cpu`), when declared.
    pub cpu: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(policy: SandboxPolicy, cgroup: Result<String, String>) -> Sandbox {
        Sandbox {
            policy,
            support: Support { landlock: Ok(6), seccomp: Ok(()), cgroup },
            cgroups: None,
            protected: Vec::new(),
        }
    }

    #[test]
    fn a_missing_required_protection_is_named_with_why() {
        let all = SandboxPolicy { require: Protection::ALL.to_vec(), ..SandboxPolicy::default() };
        let e = sandbox(all.clone(), Err("no cgroup v1 memory".into())).check().unwrap_err();
        assert_eq!(e.missing.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [Protection::Memory, Protection::Processes]);
        assert!(e.to_string().contains("memory (no cgroup v1 memory)"), "{e}");
        // Not required: the node starts, without it.
        let s = sandbox(SandboxPolicy::default(), Err("none".into()));
        assert!(s.check().is_ok());
        assert_eq!(s.support().enforced(), [Protection::Filesystem, Protection::Network]);
        assert!(sandbox(all, Ok("v2".into())).check().is_ok());
        // Turned off: nothing is enforced, nothing required.
        assert!(Sandbox::off().support().enforced().is_empty());
        assert!(Sandbox::off().check().is_ok());
    }

    #[test]
    fn folders_holding_protected_paths_are_not_opened() {
        let s =
            Sandbox::off().with_protected([PathBuf::from("/home/node/.tessera"), PathBuf::from("/data/digits.csv")]);
        let read = ["/home/node", "/home/node/.tessera", "/home/node/.tessera/nodes/n/cache/pkg", "/data", "/usr", "/"];
        let kept = s.open_to_modules(read.iter().map(PathBuf::from).collect());
        assert_eq!(kept, [PathBuf::from("/home/node/.tessera/nodes/n/cache/pkg"), PathBuf::from("/usr")]);
    }

    #[test]
    fn network_grants_match_names_and_prefixes() {
        let p = SandboxPolicy { network_modules: vec!["acme.fetch".into(), "weather.".into()], ..Default::default() };
        assert!(p.allows_network("acme.fetch"));
        assert!(!p.allows_network("acme.fetcher"), "a name is not a prefix");
        assert!(p.allows_network("weather.radar"));
        assert!(!p.allows_network("weatherman.x"));
        assert!(!SandboxPolicy::default().allows_network("acme.fetch"));
    }

    #[test]
    fn the_policy_section_parses_and_refuses_unknown_fields() {
        let p: SandboxPolicy = serde_json::from_str(r#"{"require": ["memory"], "default_memory": "1GiB"}"#).unwrap();
        assert_eq!(p.require, [Protection::Memory]);
        assert_eq!(p.default_memory, ByteSize(1 << 30));
        assert_eq!(p.max_processes, 256);
        assert!(serde_json::from_str::<SandboxPolicy>(r#"{"requires": []}"#).is_err());
    }
}
