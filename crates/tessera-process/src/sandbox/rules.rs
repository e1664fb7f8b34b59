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

/// The filter every module process gets, refusing with `EACCES`/`EPERM`:
/// - sockets: any without the network (a module talks to its node over pipes;
///   `socketpair(2)` stays), and with it any but TCP/UDP over IPv4 or IPv6 (no UNIX or
///   netlink sockets, which reach local services Landlock does not cover);
/// - io_uring (its operations bypass seccomp);
/// - changing files' modes, owners or extended attributes (Landlock does not cover them,
///   and every file a module may read belongs to the node's user);
/// - resource calls on another process (`prlimit64`, `setpriority`, `sched_setaffinity`,
///   `ioprio_set` with a pid other than 0: the node and other modules run as the same
///   user).
fn module_filter(network: bool) -> Result<BpfProgram, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule as Rule};
    let not_self = |arg: u8| -> Result<Vec<Rule>, seccompiler::BackendError> {
        Ok(vec![Rule::new(vec![Cond::new(arg, Len::Qword, Op::Ne, 0)?])?])
    };
    let mut rules: BTreeMap<i64, Vec<Rule>> = BTreeMap::new();
    let sockets = if network {
        let family = |f: i32| Cond::new(0, Len::Dword, Op::Ne, u64::try_from(f).unwrap_or_default());
        vec![Rule::new(vec![family(libc::AF_INET)?, family(libc::AF_INET6)?])?]
    } else {
        Vec::new()
    };
    rules.insert(libc::SYS_socket, sockets);
    for always in [
        libc::SYS_io_uring_setup,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_chown,
        libc::SYS_fchown,
        libc::SYS_lchown,
        libc::SYS_fchownat,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
    ] {
        rules.insert(always, Vec::new());
    }
    rules.insert(libc::SYS_prlimit64, not_self(0)?);
    rules.insert(libc::SYS_sched_setaffinity, not_self(0)?);
    rules.insert(libc::SYS_setpriority, not_self(1)?);
    rules.insert(libc::SYS_ioprio_set, not_self(1)?);
    let errno = u32::try_from(libc::EACCES).unwrap_or(13);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), std::env::consts::ARCH.try_into()?)?
        .try_into()
}

/// Installs [`module_filter`] on the calling thread.
pub(crate) fn apply_filter(network: bool) -> std::io::Result<()> {
    seccompiler::apply_filter(&module_filter(network).map_err(io)?).map_err(io)
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
            // ABI 3 (Linux 6.2) refuses truncating files opened read-only; before it a
            // module could empty the files it may only read.
            LandlockStatus::Available { effective_abi, .. } if (effective_abi as u8) < 3 => Err(format!(
                "Landlock ABI {} cannot refuse truncating read-only files (ABI 3, Linux 6.2, needed)",
                effective_abi as u8
            )),
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
        apply_filter(false).map_err(|e| e.to_string())?;
        match std::net::UdpSocket::bind("127.0.0.1:0") {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
            Err(e) => Err(format!("a filtered socket failed otherwise: {e}")),
            Ok(_) => Err("the filter did not refuse a socket".into()),
        }
    })?
}

/// The node's interpreter's folders (`sys.prefix`, `sys.base_prefix` and their exec
/// counterparts, asked with `-I -S`: no `site`, no `.pth` file runs), its virtual
/// environment's folder if it is in one, and its executable file, for module processes
/// to read. `/` is never one.
pub(crate) fn interpreter_dirs(interpreter: &Path) -> Vec<PathBuf> {
    const PREFIXES: &str =
        "import sys\nfor p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}: print(p)\n";
    let mut dirs: Vec<PathBuf> = std::process::Command::new(interpreter)
        .args(["-I", "-S", "-c", PREFIXES])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect())
        .unwrap_or_default();
    dirs.extend(std::fs::canonicalize(interpreter).ok());
    // A virtual environment is found by its `pyvenv.cfg` beside the executable or one
    // folder up (what `site` reads, which `-S` leaves out).
    let exe_dir = std::path::absolute(interpreter).ok().and_then(|p| p.parent().map(Path::to_owned));
    for dir in exe_dir.iter().flat_map(|d| [Some(d.clone()), d.parent().map(Path::to_owned)]).flatten() {
        if dir.join("pyvenv.cfg").is_file() {
            dirs.push(dir);
        }
    }
    dirs.retain(|d| d.is_absolute() && d != Path::new("/"));
    dirs.sort();
    dirs.dedup();
    dirs
}
