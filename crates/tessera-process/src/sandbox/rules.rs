//! The Landlock rules and the seccomp filter put on a spawning thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

use super::Plan;

/// The newest Landlock ABI these rules are written for; older kernels get what they have.
const ABI_WANTED: ABI = ABI::V6;

/// What every process may read and run: system libraries and programs, the dynamic
/// linker's cache, time zones, certificates, `/proc` and `/sys` (other processes' files
/// in `/proc` stay closed: Landlock refuses ptrace-style access outside the domain).
pub(crate) const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/pki",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/os-release",
    "/proc",
    "/sys",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];

/// What every process may write: the null device.
const SYSTEM_WRITE: &[&str] = &["/dev/null"];

fn existing(paths: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = paths.into_iter().filter(|p| p.exists()).collect();
    out.sort();
    out.dedup();
    out
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Restricts the calling thread (and what it starts) to `plan`'s files, and, unless the
/// plan grants the network, refuses TCP where Landlock can.
pub(crate) fn restrict_files(plan: &Plan) -> std::io::Result<()> {
    let read = existing(SYSTEM_READ.iter().map(PathBuf::from).chain(plan.read.iter().cloned()));
    let write = existing(SYSTEM_WRITE.iter().map(PathBuf::from).chain(plan.write.iter().cloned()));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_WANTED))
        .map_err(io)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(io)?;
    if !plan.network {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp).map_err(io)?;
    }
    let status = ruleset
        .create()
        .map_err(io)?
        .add_rules(path_beneath_rules(&read, AccessFs::from_read(ABI_WANTED)))
        .map_err(io)?
        .add_rules(path_beneath_rules(&write, AccessFs::from_all(ABI_WANTED)))
        .map_err(io)?
        .restrict_self()
        .map_err(io)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(io("Landlock rules were not enforced"));
    }
    Ok(())
}

/// The filter refusing new sockets (any family: a module talks to its node over pipes)
/// and io_uring (whose operations bypass seccomp) with `EACCES`.
fn no_sockets() -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_socket, Vec::new());
    rules.insert(libc::SYS_io_uring_setup, Vec::new());
    let errno = u32::try_from(libc::EACCES).unwrap_or(13);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), std::env::consts::ARCH.try_into()?)?
        .try_into()
}

/// Installs [`no_sockets`] on the calling thread.
pub(crate) fn refuse_sockets() -> std::io::Result<()> {
    seccompiler::apply_filter(&no_sockets().map_err(io)?).map_err(io)
}

/// Runs `f` on a thread of its own (its restrictions end with it).
fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    std::thread::Builder::new()
        .name("tessera-probe".into())
        .spawn(f)
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the probe panicked".to_owned())
}

/// The Landlock ABI this machine enforces, by restricting a throw-away thread.
pub(crate) fn probe_landlock() -> Result<u8, String> {
    on_a_thread(|| {
        let status = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI_WANTED))
            .and_then(|r| r.create())
            .and_then(|r| r.restrict_self())
            .map_err(|e| e.to_string())?;
        match status.landlock {
            LandlockStatus::Available { effective_abi, .. } if status.ruleset != RulesetStatus::NotEnforced => {
                Ok(effective_abi as u8)
            }
            LandlockStatus::NotEnabled => {
                Err("Landlock is built into the kernel but not enabled (lsm= boot option)".into())
            }
            LandlockStatus::NotImplemented => Err("the kernel has no Landlock (Linux 5.13 or later needed)".into()),
            LandlockStatus::Available { .. } => Err("Landlock rules were not enforced".into()),
        }
    })?
}

/// Whether a seccomp filter can be installed, by installing one on a throw-away thread
/// and checking that it refuses a socket.
pub(crate) fn probe_seccomp() -> Result<(), String> {
    on_a_thread(|| {
        refuse_sockets().map_err(|e| e.to_string())?;
        match std::net::UdpSocket::bind("127.0.0.1:0") {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
            Err(e) => Err(format!("a filtered socket failed otherwise: {e}")),
            Ok(_) => Err("the filter did not refuse a socket".into()),
        }
    })?
}

/// The interpreter's environment (`sys.prefix`, `sys.base_prefix` and their exec
/// counterparts) and its own folder, for its processes to read.
pub(crate) fn interpreter_dirs(interpreter: &Path) -> Vec<PathBuf> {
    const PREFIXES: &str =
        "import sys\nfor p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}: print(p)\n";
    let mut dirs: Vec<PathBuf> = std::process::Command::new(interpreter)
        .args(["-I", "-c", PREFIXES])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect())
        .unwrap_or_default();
    for exe in [Some(interpreter.to_owned()), std::fs::canonicalize(interpreter).ok()].into_iter().flatten() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_owned());
        }
    }
    dirs.retain(|d| d.is_absolute() && d != Path::new("/"));
    dirs.sort();
    dirs.dedup();
    dirs
}
