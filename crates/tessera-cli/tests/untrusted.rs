//! The CLI treats every record from a hub as untrusted: a hub that lies (a name with `..`,
//! another module's name, a package whose own manifest says something else) gets an error,
//! and nothing is written outside the working directory, or at all.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{Value, json};
use tessera_core::Digest;
use tessera_package::{Limits, pack_dir};

/// A hub that answers from a table of canned responses (path -> body), one connection at a
/// time.
struct FakeHub {
    url: String,
}

fn fake_hub(routes: HashMap<String, Vec<u8>>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let routes = Arc::new(routes);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let (status, body) = match routes.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", br#"{"error":"not found"}"#.to_vec()),
            };
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(&body);
        }
    });
    FakeHub { url }
}

fn tessera(args: &[&str], cwd: &Path, hub: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(cwd)
        .env("TESSERA_HOME", cwd.join(".home"))
        .env("TESSERA_HUB", hub)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn package(dir: &Path, name: &str, version: &str) -> Vec<u8> {
    let m = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        format!("name: {name}\nversion: {version}\nkind: task\nruntime: builtin\nentry: echo\n"),
    )
    .unwrap();
    pack_dir(&m, &Limits::default()).unwrap().bytes
}

fn record(name: &str, version: &str, manifest_name: &str, bytes: &[u8]) -> Value {
    json!({
        "name": name, "version": version, "digest": Digest::of(bytes).to_string(), "size": bytes.len(),
        "kind": "task", "runtime": "builtin", "description": "", "tags": [], "published_at": "2026-01-01T00:00:00Z",
        "manifest": {"name": manifest_name, "version": version, "kind": "task", "runtime": "builtin", "entry": "echo",
                     "description": "", "tags": [], "config": {}, "inputs": [], "outputs": [],
                     "needs": {"cpu": 0.0, "memory": 0, "gpu": 0, "storage": 0, "libraries": []}},
        "private": false
    })
}

fn health() -> Vec<u8> {
    let key = tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519);
    json!({"status": "ok", "version": "0", "key": key.public().to_string(), "signatures_required": false})
        .to_string()
        .into_bytes()
}

/// Everything under `root`, relative paths.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// What a case does: its name, the command, the hub's canned answers, a word of the error.
type Case<'a> = (&'a str, Vec<&'a str>, HashMap<String, Vec<u8>>, &'a str);

#[test]
fn a_lying_hub_gets_an_error_and_nothing_is_written() {
    let top = tempfile::tempdir().unwrap();
    let work = top.path().join("a/b/work");
    std::fs::create_dir_all(&work).unwrap();
    let good = package(top.path(), "pk.good", "1.0.0");
    let evil = package(top.path(), "pk.evil", "1.0.0");
    let model = b"weights".to_vec();
    let model_record = |name: &str| {
        json!({"name": name, "version": "1.0.0", "digest": Digest::of(&model).to_string(), "size": model.len(),
               "metadata": {}, "lineage": null, "created_at": "2026-01-01T00:00:00Z"})
        .to_string()
        .into_bytes()
    };
    let blob = |b: &[u8]| (format!("/api/v1/blobs/{}", Digest::of(b)), b.to_vec());
    let cases: Vec<Case> = vec![
        (
            "a record naming the package ../../escaped-by-name",
            vec!["module", "pull", "pk.good@1.0.0"],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                (
                    "/api/v1/packages/pk.good/1.0.0".into(),
                    record("../../escaped-by-name", "1.0.0", "pk.good", &good).to_string().into_bytes(),
                ),
                blob(&good),
            ]),
            "",
        ),
        (
            "a record for another module",
            vec!["module", "pull", "pk.good@1.0.0"],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                (
                    "/api/v1/packages/pk.good/1.0.0".into(),
                    record("pk.evil", "1.0.0", "pk.evil", &evil).to_string().into_bytes(),
                ),
                blob(&evil),
            ]),
            "pk.evil",
        ),
        (
            "a package whose module.yaml names another module",
            vec!["module", "pull", "pk.good@1.0.0"],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                (
                    "/api/v1/packages/pk.good/1.0.0".into(),
                    record("pk.good", "1.0.0", "pk.good", &evil).to_string().into_bytes(),
                ),
                blob(&evil),
            ]),
            "module.yaml says pk.evil",
        ),
        (
            "the same, kept as an archive",
            vec!["module", "pull", "pk.good@1.0.0", "--archive", "x.tpkg"],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                (
                    "/api/v1/packages/pk.good/1.0.0".into(),
                    record("pk.good", "1.0.0", "pk.good", &evil).to_string().into_bytes(),
                ),
                blob(&evil),
            ]),
            "module.yaml says pk.evil",
        ),
        (
            "a digest pull answered with another package",
            vec!["module", "pull", &*Box::leak(Digest::of(&good).to_string().into_boxed_str())],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                (
                    format!("/api/v1/digests/{}", Digest::of(&good)),
                    record("pk.evil", "1.0.0", "pk.evil", &evil).to_string().into_bytes(),
                ),
                blob(&evil),
            ]),
            "asked for",
        ),
        (
            "a model record named ../../escaped",
            vec!["model", "pull", "team.model@1.0.0"],
            HashMap::from([
                ("/api/v1/health".into(), health()),
                ("/api/v1/models/team.model/1.0.0/meta".into(), model_record("../../escaped")),
                ("/api/v1/models/team.model/1.0.0".into(), model.clone()),
            ]),
            "",
        ),
    ];
    for (what, args, routes, word) in cases {
        let hub = fake_hub(routes);
        let before = tree(top.path());
        let out = tessera(&args, &work, &hub.url);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit 0\n{err}");
        assert!(err.contains(word), "{what}: {err}");
        let after: Vec<String> = tree(top.path()).into_iter().filter(|p| !p.contains(".home")).collect();
        let before: Vec<String> = before.into_iter().filter(|p| !p.contains(".home")).collect();
        assert_eq!(after, before, "{what} wrote something");
    }
}

/// Numbers from the command line that used to panic are refused with a clear error.
#[test]
fn huge_numbers_on_the_command_line_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["module", "new", "m", "--runtime", "builtin", "--name", "demo.m"])
        .current_dir(w)
        .output()
        .unwrap();
    assert!(out.status.success());
    for (flag, value) in [("--timeout", "1e300"), ("--timeout", "nan"), ("--timeout", "-1"), ("--timeout", "inf")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["module", "run", "m", &format!("{flag}={value}")])
            .current_dir(w)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{flag} {value}: {err}");
    }
}

/// A server that announces another hub's key gets nothing signed: it could pass on what is
/// signed for it to that hub.
#[test]
fn a_server_announcing_another_hubs_key_gets_nothing_signed() {
    let work = tempfile::tempdir().unwrap();
    let good = package(work.path(), "pk.good", "1.0.0");
    let health = health();
    let routes = || {
        HashMap::from([
            ("/api/v1/health".to_owned(), health.clone()),
            (
                "/api/v1/packages/pk.good/1.0.0".to_owned(),
                record("pk.good", "1.0.0", "pk.good", &good).to_string().into_bytes(),
            ),
            (format!("/api/v1/blobs/{}", Digest::of(&good)), good.clone()),
        ])
    };
    let real = fake_hub(routes());
    let out = tessera(&["module", "pull", "pk.good@1.0.0", "--out", "first"], work.path(), &real.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let relay = fake_hub(routes());
    let out = tessera(&["module", "pull", "pk.good@1.0.0", "--out", "second"], work.path(), &relay.url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("announces the key of the hub at"), "{err}");
    assert!(!work.path().join("second").exists());
}
