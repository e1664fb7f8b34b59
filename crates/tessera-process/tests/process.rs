//! The process runtime: executables in another language speak the protocol, and children
//! sending garbage, exiting early or hanging give clear errors and never block the node.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tessera_ports::{Instance, Invocation, Runtime, RuntimeError};
use tessera_process::{ProcessLimits, ProcessRuntime};

/// Shell helpers: `frame JSON` writes a frame without blobs; `read_frame` reads one
/// (header only) into `$hdr`, exiting 0 at the end of input.
const SH_PRELUDE: &str = r#"#!/bin/sh
frame() {
    n=$(printf %s "$1" | wc -c)
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((n >> 24 & 255)) $((n >> 16 & 255)) $((n >> 8 & 255)) $((n & 255)))"
    printf %s "$1"
}
read_frame() {
    set -- $(dd bs=1 count=4 2>/dev/null | od -An -tu1)
    [ $# -eq 4 ] || exit 0
    hdr=$(dd bs=1 count=$(( ($1 << 24) + ($2 << 16) + ($3 << 8) + $4 )) 2>/dev/null)
}
"#;

/// A protocol speaker in sh: echoes the function name of each call as a JSON string.
const SH_ECHO: &str = r#"
frame '{"type":"hello","protocol":1,"functions":["anything"],"hooks":[]}'
while read_frame; do
    case "$hdr" in
        *'"type":"shutdown"'*) echo "bye" >&2; exit 0 ;;
    esac
    id=$(printf %s "$hdr" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
    fn=$(printf %s "$hdr" | sed -n 's/.*"function":"\([a-z_]*\)".*/\1/p')
    body="\"sh:$fn\""
    echo "answering $fn" >&2
    frame "{\"type\":\"result\",\"id\":$id,\"blobs\":[{\"name\":\"result\",\"len\":${#body},\"kind\":\"json\"}]}"
    printf %s "$body"
done
"#;

fn sh_module(body: &str) -> Module {
    let script = format!("{SH_PRELUDE}{body}");
    module("process", "main.sh", &[("main.sh", &script, true)], "")
}

fn limits() -> ProcessLimits {
    ProcessLimits { start_timeout: Duration::from_secs(20), ..ProcessLimits::default() }
}

fn short(function: &str) -> Invocation {
    // A safety net only: the assertions check the error, so a hang would fail them.
    Invocation { config: json!({"function": function}), inputs: Vec::new(), timeout: Some(Duration::from_secs(20)) }
}

#[tokio::test]
async fn a_shell_script_speaks_the_protocol() {
    let rt = ProcessRuntime::process(limits());
    assert_eq!(rt.kind(), tessera_core::RuntimeKind::Process);
    let m = sh_module(SH_ECHO);
    let ctx = Ctx::new();
    let mut inst = rt.spawn(&m.image, ctx.clone()).await.unwrap();
    assert_eq!(inst.functions(), ["anything".to_string()]);
    assert_eq!(result_json(&inst.call(short("first")).await), json!("sh:first"));
    assert_eq!(result_json(&inst.call(short("second")).await), json!("sh:second"));
    assert!(inst.healthy());
    inst.shutdown().await;
    assert!(ctx.has_log(tessera_ports::LogLevel::Info, "answering second"));
    // A one-shot run.
    let r = rt.run(&m.image, short("once"), Ctx::new()).await;
    assert_eq!(result_json(&r), json!("sh:once"));
}

#[tokio::test]
async fn a_python_script_without_the_sdk_speaks_the_protocol() {
    // The system's python3, on the fixed PATH a module process gets: its sandbox lets it
    // run system programs, not other folders' (a virtual environment's, pyenv's).
    let script = format!(
        "#!/usr/bin/env python3\n{}",
        r#"
import json, struct, sys
rd, wr = sys.stdin.buffer, sys.stdout.buffer

def send(h, blobs=()):
    h = dict(h, blobs=[{"name": n, "len": len(b), "kind": "bytes"} for n, b in blobs])
    t = json.dumps(h).encode()
    wr.write(struct.pack(">I", len(t)) + t + b"".join(b for _, b in blobs)); wr.flush()

def recv():
    n = rd.read(4)
    if len(n) < 4: sys.exit(0)
    h = json.loads(rd.read(struct.unpack(">I", n)[0]))
    return h, [rd.read(b["len"]) for b in h.get("blobs", [])]

send({"type": "hello", "protocol": 1, "functions": ["reverse"], "hooks": []})
while True:
    h, blobs = recv()
    if h["type"] == "shutdown": sys.exit(0)
    send({"type": "ctx", "id": 1, "op": "globals_set", "key": "seen"}, [("value", b"yes")])
    reply, _ = recv()
    assert reply["type"] == "ctx_reply" and reply["ok"], reply
    send({"type": "result", "id": h["id"]}, [("reversed", blobs[0][::-1])])
"#
    );
    let m = module("process", "bin/rev", &[], "");
    std::fs::create_dir(m.dir.path().join("bin")).unwrap();
    let path = m.dir.path().join("bin/rev");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = ProcessRuntime::process(limits());
    let ctx = Ctx::new();
    let mut inv = short("reverse");
    inv.inputs = vec![("text".into(), bytes::Bytes::from_static(b"abc"))];
    let out = rt.run(&m.image, inv, ctx.clone()).await.unwrap();
    assert_eq!(out, vec![("reversed".to_string(), bytes::Bytes::from_static(b"cba"))]);
    assert_eq!(ctx.globals.lock().unwrap().get("seen").unwrap().as_ref(), b"yes");
}

#[tokio::test]
async fn a_non_executable_entry_is_a_load_error() {
    let m = module("process", "main.sh", &[("main.sh", "#!/bin/sh\n", false)], "");
    let err = ProcessRuntime::process(limits()).spawn(&m.image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref msg) if msg.contains("main.sh is not executable")), "{err:?}");
    let m = module("process", "missing", &[], "");
    let err = ProcessRuntime::process(limits()).spawn(&m.image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref msg) if msg.contains("missing")), "{err:?}");
    // And a module of another runtime is refused.
    let m = module("python", "model.py", &[("model.py", "", true)], "");
    let err = ProcessRuntime::process(limits()).spawn(&m.image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref msg) if msg.contains("python module")), "{err:?}");
}

#[tokio::test]
async fn hostile_hellos_are_load_errors() {
    let cases: &[(&str, &str)] = &[
        ("printf '\\377\\377\\377\\377'\nexec sleep 1000", "exceeds the limit"),
        ("frame 'not json at all'\nexec sleep 1000", "invalid JSON"),
        ("frame '{\"protocol\":1}'\nexec sleep 1000", "no \"type\""),
        ("frame '{\"type\":\"result\",\"id\":1}'\nexec sleep 1000", "expected a hello"),
        ("frame '{\"type\":\"hello\",\"protocol\":2}'\nexec sleep 1000", "speaks protocol 2"),
        ("frame '{\"type\":\"hello\",\"protocol\":1,\"hooks\":[\"x\"]}'\nexec sleep 1000", "unknown hook"),
        ("echo 'cannot start: missing thing' >&2\nexit 3", "process exited with exit status: 3"),
        ("printf '\\000\\000\\000\\144{\"type\"'\nexit 4", "process exited with exit status: 4"),
    ];
    let rt = ProcessRuntime::process(limits());
    for (body, want) in cases {
        let m = sh_module(body);
        let err = rt.spawn(&m.image, Ctx::new()).await.unwrap_err();
        let RuntimeError::Load(msg) = &err else { panic!("{body}: expected a load error, got {err:?}") };
        assert!(msg.contains(want), "{body}: {msg}");
    }
    let m = sh_module("echo 'cannot start: missing thing' >&2\nexit 3");
    let err = rt.spawn(&m.image, Ctx::new()).await.unwrap_err();
    assert!(err.to_string().contains("last stderr lines:\ncannot start: missing thing"), "{err}");
}

#[tokio::test]
async fn a_silent_child_times_out_at_start() {
    let rt = ProcessRuntime::process(ProcessLimits { start_timeout: Duration::from_millis(300), ..limits() });
    let m = sh_module("exec sleep 1000");
    let err = rt.spawn(&m.image, Ctx::new()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Load(ref msg) if msg.contains("sent no hello within 300 ms")), "{err:?}");
}

/// A child that says hello, waits for the first bytes of a call, then runs `then`.
fn after_call(then: &str) -> Module {
    sh_module(&format!(
        "frame '{{\"type\":\"hello\",\"protocol\":1,\"functions\":[\"run\"]}}'\ndd bs=1 count=4 >/dev/null 2>&1\n{then}"
    ))
}

#[tokio::test]
async fn hostile_answers_are_traps() {
    let cases: &[(&str, &str)] = &[
        ("printf '\\377\\377\\377\\377'\nexec sleep 1000", "protocol: a frame header of 4294967295 bytes exceeds"),
        ("frame 'not json'\nexec sleep 1000", "protocol: invalid JSON"),
        ("frame '[1,2,3]'\nexec sleep 1000", "protocol: invalid frame header: the header is not a JSON object"),
        ("frame '{\"id\":1}'\nexec sleep 1000", "protocol: invalid frame header: the header has no \"type\""),
        ("frame '{\"type\":\"hello\",\"protocol\":1}'\nexec sleep 1000", "protocol: unexpected message \"hello\""),
        ("frame '{\"type\":\"result\",\"id\":99}'\nexec sleep 1000", "protocol: a result for call 99 during call 1"),
        (
            "frame '{\"type\":\"result\",\"id\":1,\"blobs\":[{\"name\":\"x\",\"len\":99999999999}]}'\nexec sleep 1000",
            "protocol: blob \"x\" of 99999999999 bytes exceeds",
        ),
        ("frame '{\"type\":\"ctx\",\"op\":\"datasets\"}'\nexec sleep 1000", "protocol: a ctx request without an id"),
        ("echo 'fatal: out of cheese' >&2\nexit 3", "process exited with exit status: 3"),
        ("printf '\\000\\000\\000\\144{\"type\"'\nexit 4", "process exited with exit status: 4"),
        ("exec 1>&-\nexec sleep 1000", "closed its output without exiting"),
    ];
    let rt = ProcessRuntime::process(limits());
    for (then, want) in cases {
        let m = after_call(then);
        let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
        let r = inst.call(short("run")).await;
        let Err(RuntimeError::Trap(msg)) = &r else { panic!("{then}: expected a trap, got {r:?}") };
        assert!(msg.contains(want), "{then}: {msg}");
        assert!(!inst.healthy(), "{then}");
        // The instance refuses further calls at once.
        let again = inst.call(short("run")).await;
        assert!(matches!(again, Err(RuntimeError::Trap(_))), "{then}: {again:?}");
    }
    let m = after_call("echo 'fatal: out of cheese' >&2\nexit 3");
    let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
    let err = inst.call(short("run")).await.unwrap_err();
    assert!(err.to_string().contains("last stderr lines:\nfatal: out of cheese"), "{err}");
}

#[tokio::test]
async fn a_child_stuck_inside_a_frame_hits_the_time_limit() {
    let m = after_call("printf '\\000\\000\\000\\144{\"type\"'\nexec sleep 1000");
    let rt = ProcessRuntime::process(limits());
    let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
    let mut inv = short("run");
    inv.timeout = Some(Duration::from_millis(300));
    assert_eq!(inst.call(inv).await, Err(RuntimeError::TimeLimit { limit_ms: 300 }));
    assert!(!inst.healthy());
}

#[tokio::test]
async fn context_errors_reach_the_child_and_unknown_ops_are_refused() {
    // Asks for an unknown op and a missing dataset, then answers with what it got.
    let body = r#"
frame '{"type":"hello","protocol":1,"functions":["run"]}'
read_frame
frame '{"type":"ctx","id":5,"op":"teleport"}'
read_frame
a=$hdr
frame '{"type":"ctx","id":6,"op":"dataset_size","name":"nope"}'
read_frame
b=$hdr
frame '{"type":"ctx","id":7,"op":"log","level":"error","message":"from sh"}'
body="[$a,$b]"
frame "{\"type\":\"result\",\"id\":1,\"blobs\":[{\"name\":\"result\",\"len\":${#body},\"kind\":\"json\"}]}"
printf %s "$body"
read_frame
"#;
    let m = sh_module(body);
    let ctx = Ctx::new();
    let rt = ProcessRuntime::process(limits());
    let v = result_json(&rt.run(&m.image, short("run"), ctx.clone()).await);
    assert_eq!(
        v[0],
        json!({"type": "ctx_reply", "id": 5, "ok": false, "error": "unknown context operation \"teleport\""})
    );
    assert_eq!(v[1]["ok"], json!(false));
    assert_eq!(v[1]["id"], json!(6));
    assert!(v[1]["error"].as_str().unwrap().contains("no dataset \"nope\""), "{v}");
    assert!(ctx.has_log(tessera_ports::LogLevel::Error, "from sh"));
}

#[tokio::test]
async fn an_instance_dropped_mid_call_is_not_reused() {
    let m = after_call("exec sleep 1000");
    let rt = ProcessRuntime::process(limits());
    let mut inst = rt.spawn(&m.image, Ctx::new()).await.unwrap();
    // Abandon a call half-way (the caller's future is dropped).
    let r = tokio::time::timeout(Duration::from_millis(200), inst.call(short("run"))).await;
    assert!(r.is_err());
    assert!(!inst.healthy());
    let again = inst.call(short("run")).await;
    assert!(matches!(again, Err(RuntimeError::Trap(ref m)) if m.contains("interrupted")), "{again:?}");
}
