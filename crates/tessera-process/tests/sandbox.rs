//! Escape attempts from a module's process, on the `python` runtime (with the SDK) and
//! the `process` runtime (a bare executable speaking the protocol). Each attempt must
//! fail, its error must reach the caller, and the runtime must serve the next call.
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tessera_ports::{Instance, Runtime, RuntimeError};
use tessera_process::{ProcessLimits, ProcessRuntime, Protection};

/// The attempts, as functions of a class (the SDK's `Task`) or of a bare script.
const ATTEMPTS: &str = r#"
import os, socket, sys, time

def read(path):
    with open(path, "rb") as f:
        return len(f.read())

def list_dir(path):
    return os.listdir(path)

def write(path):
    with open(path, "w") as f:
        f.write("written")
    return path

def home():
    return os.environ["HOME"]

def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.close()
    return "connected"

def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"out", ("127.0.0.1", port))
    return "sent"

def fork_bomb():
    n = 0
    while True:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        n += 1
        if n > 100000:
            return n

def allocate(mib):
    block = b"x" * (mib << 20)
    return len(block)

def spin():
    while True:
        pass

def flood(gib):
    line = "x" * 65535 + "\n"
    for _ in range((gib << 30) // len(line)):
        sys.stderr.write(line)
    return "flooded"

def open_files(n):
    held = [open("/dev/null") for _ in range(n)]
    return len(held)

def chmod(path):
    os.chmod(path, 0o777)
    return "changed"

def renice_parent():
    os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)
    return "reniced"

def limit_parent():
    import resource
    resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (16, 16))
    return "limited"

def signal_parent():
    os.kill(os.getppid(), 0)
    return "signalled"

def unix_socket():
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return "made"

def ping():
    return "pong"
"#;

/// The attempts' names.
#[rustfmt::skip]
const FUNCTIONS: &[&str] = &[
    "read", "list_dir", "write", "home", "connect", "udp", "fork_bomb", "allocate", "spin", "flood", "open_files",
    "chmod", "renice_parent", "limit_parent", "signal_parent", "unix_socket", "ping",
];

/// The SDK form: the attempts as methods.
fn sdk_module(extra_yaml: &str) -> Module {
    let code = format!(
        "{ATTEMPTS}\nimport tessera\n\nclass Escape(tessera.Task):\n{}",
        FUNCTIONS.iter().map(|f| format!("    def {f}(self, *a):\n        return {f}(*a)\n")).collect::<String>()
    );
    module("python", "model.py", &[("model.py", &code, false)], extra_yaml)
}

/// The bare form: a script speaking the protocol itself, run by the system's python3.
fn bare_module(extra_yaml: &str) -> Module {
    let names = serde_json::to_string(FUNCTIONS).unwrap();
    let script = format!(
        "#!/usr/bin/env python3\n{ATTEMPTS}\nFUNCTIONS = {names}\n{}",
        r#"
import json, struct
rd, wr = sys.stdin.buffer, sys.stdout.buffer

def send(h, body=None):
    blobs = [] if body is None else [body]
    h = dict(h, blobs=[{"name": "result", "len": len(b), "kind": "json"} for b in blobs])
    t = json.dumps(h).encode()
    wr.write(struct.pack(">I", len(t)) + t + b"".join(blobs)); wr.flush()

def recv():
    n = rd.read(4)
    if len(n) < 4: sys.exit(0)
    h = json.loads(rd.read(struct.unpack(">I", n)[0]))
    for b in h.get("blobs", []): rd.read(b["len"])
    return h

send({"type": "hello", "protocol": 1, "functions": FUNCTIONS, "hooks": []})
while True:
    h = recv()
    if h["type"] == "shutdown": sys.exit(0)
    try:
        out = globals()[h["function"]](*h.get("args", []))
        send({"type": "result", "id": h["id"]}, json.dumps(out).encode())
    except Exception as e:
        send({"type": "error", "id": h["id"], "kind": "exception", "message": f"{type(e).__name__}: {e}"})
"#
    );
    module("process", "escape.py", &[("escape.py", &script, true)], extra_yaml)
}

/// One runtime under test.
struct Subject {
    runtime: ProcessRuntime,
    make: fn(&str) -> Module,
    _sdk: Option<tempfile::TempDir>,
}

fn limits() -> ProcessLimits {
    ProcessLimits { max_time: Duration::from_secs(20), ..ProcessLimits::default() }
}

fn subjects(limits: ProcessLimits) -> Vec<(&'static str, Subject)> {
    let py = python_runtime(limits.clone());
    vec![
        ("python", Subject { runtime: py.runtime, make: sdk_module, _sdk: Some(py._sdk) }),
        ("process", Subject { runtime: ProcessRuntime::process(limits), make: bare_module, _sdk: None }),
    ]
}

/// Calls `function(*args)` on `inst`.
async fn attempt(inst: &mut tessera_process::ProcessInstance, function: &str, args: Value) -> Result<Value, String> {
    match inst.call(call(function, args, json!({}))).await {
        Ok(out) => Ok(result_json(&Ok(out))),
        Err(e) => Err(e.to_string()),
    }
}

/// The attempt failed with `PermissionError` (the sandbox refused it), and the instance
/// still answers.
async fn refused(inst: &mut tessera_process::ProcessInstance, what: &str, function: &str, args: Value) {
    let e = attempt(inst, function, args.clone()).await.expect_err(&format!("{what}: {function}{args} succeeded"));
    assert!(e.contains("PermissionError") || e.contains("Permission denied"), "{what}: {function}{args}: {e}");
    assert_eq!(attempt(inst, "ping", json!([])).await, Ok(json!("pong")), "{what}: serves the next call");
}

#[tokio::test]
async fn the_machine_enforces_every_protection() {
    // This project's CI machines have Landlock, seccomp and cgroups: the escape tests below
    // rely on each.
    let support = tessera_process::Sandbox::new(tessera_process::SandboxPolicy::default()).support().clone();
    assert_eq!(support.enforced(), Protection::ALL.to_vec(), "{support:?}");
}

#[tokio::test]
async fn files_outside_the_module_and_its_scratch_are_closed() {
    // A node's home: its key file, and another module's unpacked package in its cache.
    let node_home = tempfile::tempdir().unwrap();
    let keys = node_home.path().join("nodes/node-a/keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("node.json"), r#"{"secret": "node key"}"#).unwrap();
    let other = node_home.path().join("cache/packages/acme.private/model.py");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::write(&other, "SECRET = 42").unwrap();
    let node_user_home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());

    for (name, s) in subjects(limits()) {
        let m = (s.make)("");
        let neighbour = (s.make)("");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        let mut next_door = s.runtime.spawn(&neighbour.image, Ctx::new()).await.unwrap();
        let their_scratch = attempt(&mut next_door, "home", json!([])).await.unwrap();
        let their_scratch = Path::new(their_scratch.as_str().unwrap()).to_owned();
        attempt(&mut next_door, "write", json!([their_scratch.join("notes")])).await.unwrap();

        // Its own code and scratch are its own.
        let entry = if name == "python" { "model.py" } else { "escape.py" };
        assert!(attempt(&mut inst, "read", json!([m.dir.path().join(entry)])).await.unwrap().as_u64().unwrap() > 0);
        let mine = attempt(&mut inst, "home", json!([])).await.unwrap();
        let note = Path::new(mine.as_str().unwrap()).join("note");
        attempt(&mut inst, "write", json!([note])).await.unwrap();

        refused(&mut inst, name, "read", json!(["/etc/passwd"])).await;
        refused(&mut inst, name, "read", json!([keys.join("node.json")])).await;
        refused(&mut inst, name, "read", json!([other])).await;
        refused(&mut inst, name, "read", json!([their_scratch.join("notes")])).await;
        refused(&mut inst, name, "list_dir", json!([their_scratch])).await;
        refused(&mut inst, name, "list_dir", json!([node_user_home])).await;
        refused(&mut inst, name, "list_dir", json!([node_home.path()])).await;
        refused(&mut inst, name, "write", json!([m.dir.path().join("planted.py")])).await;
        refused(&mut inst, name, "write", json!([node_home.path().join("planted")])).await;
        refused(&mut inst, name, "write", json!(["/tmp/tessera-escape"])).await;
        assert!(!m.dir.path().join("planted.py").exists() && !node_home.path().join("planted").exists());
        assert!(!Path::new("/tmp/tessera-escape").exists(), "{name}");
        inst.shutdown().await;
        next_door.shutdown().await;
    }
}

#[tokio::test]
async fn no_sockets_without_a_grant() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    for (name, s) in subjects(limits()) {
        let m = (s.make)("");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        refused(&mut inst, name, "connect", json!([port])).await;
        refused(&mut inst, name, "udp", json!([udp_port])).await;
        inst.shutdown().await;
    }
    assert!(listener.accept().is_err(), "nothing connected");
    assert!(udp.recv(&mut [0; 8]).is_err(), "nothing was sent");
}

#[tokio::test]
async fn a_module_asking_for_the_network_needs_a_grant() {
    for (name, s) in subjects(limits()) {
        let m = (s.make)("needs:\n  network: true\n");
        let e = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err().to_string();
        assert!(e.contains("needs the network") && e.contains("sandbox.network_modules"), "{name}: {e}");
        // Granted by name: it may open sockets.
        let policy = tessera_process::SandboxPolicy { network_modules: vec!["test.".into()], ..Default::default() };
        let rt = s.runtime.clone().with_sandbox(std::sync::Arc::new(tessera_process::Sandbox::new(policy)));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
        assert_eq!(attempt(&mut inst, "connect", json!([port])).await, Ok(json!("connected")), "{name}");
        // Its files stay closed, and only IP sockets open.
        refused(&mut inst, name, "read", json!(["/etc/passwd"])).await;
        refused(&mut inst, name, "unix_socket", json!([])).await;
        inst.shutdown().await;
    }
}

#[tokio::test]
async fn a_fork_bomb_hits_the_process_limit() {
    for (name, s) in subjects(limits()) {
        let m = (s.make)("");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        let e = attempt(&mut inst, "fork_bomb", json!([])).await.expect_err(name);
        assert!(e.contains("Resource temporarily unavailable") || e.contains("BlockingIOError"), "{name}: {e}");
        assert_eq!(attempt(&mut inst, "ping", json!([])).await, Ok(json!("pong")), "{name}");
        inst.shutdown().await;
    }
}

#[tokio::test]
async fn the_node_and_shared_files_are_out_of_reach() {
    for (name, s) in subjects(limits()) {
        let m = (s.make)("");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        let entry = if name == "python" { "model.py" } else { "escape.py" };
        let before = std::fs::metadata(m.dir.path().join(entry)).unwrap().permissions();
        refused(&mut inst, name, "chmod", json!([m.dir.path().join(entry)])).await;
        assert_eq!(std::fs::metadata(m.dir.path().join(entry)).unwrap().permissions(), before);
        refused(&mut inst, name, "renice_parent", json!([])).await;
        refused(&mut inst, name, "limit_parent", json!([])).await;
        refused(&mut inst, name, "signal_parent", json!([])).await;
        refused(&mut inst, name, "unix_socket", json!([])).await;
        inst.shutdown().await;
    }
}

#[tokio::test]
async fn open_files_are_bounded() {
    for (name, s) in subjects(limits()) {
        let m = (s.make)("");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        assert_eq!(attempt(&mut inst, "open_files", json!([100])).await, Ok(json!(100)), "{name}");
        let e = attempt(&mut inst, "open_files", json!([5000])).await.expect_err(name);
        assert!(e.contains("Too many open files"), "{name}: {e}");
        assert_eq!(attempt(&mut inst, "ping", json!([])).await, Ok(json!("pong")), "{name}");
        inst.shutdown().await;
    }
}

#[tokio::test]
async fn memory_past_the_declared_need_kills_the_process() {
    for (name, s) in subjects(limits()) {
        let m = (s.make)("needs:\n  memory: 96MiB\n");
        let mut inst = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        assert_eq!(attempt(&mut inst, "allocate", json!([16])).await, Ok(json!(16 << 20)), "{name}");
        let e = attempt(&mut inst, "allocate", json!([1024])).await.expect_err(name);
        assert!(e.contains("memory limit") || e.contains("MemoryError"), "{name}: {e}");
        // The runtime starts the next one.
        let mut next = s.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
        assert_eq!(attempt(&mut next, "ping", json!([])).await, Ok(json!("pong")), "{name}");
        next.shutdown().await;
    }
}

#[tokio::test]
async fn an_endless_loop_hits_the_time_limit() {
    for (name, s) in subjects(ProcessLimits { max_time: Duration::from_secs(2), ..limits() }) {
        let m = (s.make)("");
        let r = s.runtime.run(&m.image, call("spin", json!([]), json!({})), Ctx::new()).await;
        assert!(matches!(&r, Err(RuntimeError::TimeLimit { .. })), "{name}: {r:?}");
        let r = s.runtime.run(&m.image, call("ping", json!([]), json!({})), Ctx::new()).await;
        assert_eq!(result_json(&r), json!("pong"), "{name}");
    }
}

#[tokio::test]
async fn gigabytes_of_log_are_cut_off() {
    for (name, s) in subjects(ProcessLimits { max_log_bytes: 4 << 20, ..limits() }) {
        let m = (s.make)("");
        let ctx = Ctx::new();
        let r = s.runtime.run(&m.image, call("flood", json!([4]), json!({})), ctx.clone()).await;
        let e = r.expect_err(name).to_string();
        assert!(e.contains("to its log"), "{name}: {e}");
        let logged: usize = ctx.logs().iter().map(|(_, l)| l.len()).sum();
        // What came before the limit, and the one line saying why the rest did not.
        assert!(logged <= (4 << 20) + 200, "{name}: {logged} bytes logged");
        let r = s.runtime.run(&m.image, call("ping", json!([]), json!({})), Ctx::new()).await;
        assert_eq!(result_json(&r), json!("pong"), "{name}");
    }
}

/// Every child process is started by `Sandbox::spawn`: a `Command` spawned anywhere else
/// in the crate (`.spawn()` with no arguments is `Command::spawn`) would run uncontained.
/// The node's own tools run outside it, each named here: the node's interpreter asked
/// for its libraries and folders (`-I`, `-I -S`), and `uv` installing wheels only; a new
/// `.output()` or `.status()` fails this until it is added, after a look at what it runs.
#[test]
fn every_child_is_spawned_by_the_sandbox() {
    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut spawns = Vec::new();
    let mut tools = Vec::new();
    for path in files {
        let text: String = std::fs::read_to_string(&path).unwrap().split_whitespace().collect();
        let name = path.strip_prefix(&src).unwrap().display().to_string();
        for _ in 0..text.matches(".spawn()").count() {
            spawns.push(name.clone());
        }
        for _ in 0..text.matches(".output()").count() + text.matches(".status()").count() {
            tools.push(name.clone());
        }
    }
    assert_eq!(spawns, ["sandbox/mod.rs"], "start module processes with Sandbox::spawn");
    tools.sort();
    assert_eq!(
        tools,
        ["environments.rs", "lib.rs", "sandbox/rules.rs"],
        "a new tool the node runs outside the sandbox"
    );
}
