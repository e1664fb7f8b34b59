//! The `tessera` binary as a user runs it.

#[path = "support/hub.rs"]
mod hub_process;
use hub_process::spawn_hub;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_HUB").env_remove("RUST_LOG");
    c
}

fn run(args: &[&str], cwd: &Path, hub: Option<&str>) -> Output {
    let mut c = tessera();
    c.args(args).current_dir(cwd).env("TESSERA_HOME", cwd.join(".tessera-home"));
    if let Some(h) = hub {
        c.env("TESSERA_HUB", h);
    }
    c.output().unwrap()
}

fn ok(args: &[&str], cwd: &Path, hub: Option<&str>) -> String {
    let out = run(args, cwd, hub);
    assert!(
        out.status.success(),
        "tessera {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], cwd: &Path, hub: Option<&str>) -> String {
    let out = run(args, cwd, hub);
    assert!(!out.status.success(), "tessera {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn quickstart_reaches_90_percent_and_publishes_the_model() {
    let home = tempfile::tempdir().unwrap();
    let out = ok(&["quickstart", "--home", home.path().to_str().unwrap()], home.path(), None);
    let acc: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("final test accuracy: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in:\n{out}"));
    assert!(acc >= 0.90, "accuracy {acc}\n{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("round ")).count(), 20, "{out}");
    let model_line = out.lines().find(|l| l.starts_with("model: digits.softmax@0.1.0 b3:")).expect("model id");
    let digest = model_line.rsplit(' ').next().unwrap();
    // The model is in the hub with its lineage.
    let hub = tessera_hub::HubStore::open(home.path().join("hub")).unwrap();
    let m = hub.model("digits.softmax", "0.1.0").unwrap();
    assert_eq!(m.digest.unwrap().to_string(), digest);
    let lineage = m.lineage.unwrap();
    assert_eq!(lineage.rounds, 20);
    assert_eq!(lineage.nodes.len(), 4);
    assert_eq!(lineage.modules[0].module, "fl.softmax.worker@0.1.2");
    assert!((m.metadata["test_accuracy"].as_f64().unwrap() - acc).abs() < 1e-3);
    // A second run in the same home publishes the next version.
    let out = ok(&["quickstart", "--home", home.path().to_str().unwrap(), "--rounds", "2"], home.path(), None);
    assert!(out.contains("model: digits.softmax@0.1.1 b3:"), "{out}");
}

struct Hub {
    child: Child,
    url: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hub(data: &Path) -> Hub {
    let mut serve = tessera();
    serve.args(["hub", "serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()]);
    let (child, url) = spawn_hub(serve);
    Hub { child, url }
}

/// A plain HTTP GET, to look at what a browser would.
fn http_get(url: &str, path: &str) -> (u16, String) {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, resp)
}

#[test]
fn hub_walkthrough_publish_list_show_pull_and_models() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let hub = start_hub(&w.join("hub-data"));
    let url = Some(hub.url.as_str());

    ok(&["module", "new", "hello", "--runtime", "builtin", "--name", "demo.hello"], w, None);
    std::fs::write(w.join("hello/README.md"), "---\nlicense: mit\ntags: [greeting]\n---\n# Hello\n\nSays hello.\n")
        .unwrap();
    let digest = ok(&["module", "publish", "hello"], w, url).trim().to_owned();
    assert!(digest.starts_with("b3:"), "{digest}");
    // Publishing again is a no-op; a changed module under the same version is refused.
    assert_eq!(ok(&["module", "publish", "hello"], w, url).trim(), digest);
    std::fs::write(w.join("hello/extra.txt"), "changed").unwrap();
    let err = fails(&["module", "publish", "hello"], w, url);
    assert!(err.contains("409") && err.contains("immutable"), "{err}");
    std::fs::remove_file(w.join("hello/extra.txt")).unwrap();

    let list = ok(&["module", "list"], w, url);
    assert!(list.contains("demo.hello") && list.contains("0.1.0"), "{list}");
    let show = ok(&["module", "show", "demo.hello@latest"], w, url);
    assert!(show.contains(&digest) && show.contains("builtin"), "{show}");
    let pulled = ok(&["module", "pull", "demo.hello@0.1.0", "--out", "pulled"], w, url);
    assert_eq!(pulled.trim(), "pulled");
    assert_eq!(
        std::fs::read(w.join("pulled/module.yaml")).unwrap(),
        std::fs::read(w.join("hello/module.yaml")).unwrap()
    );
    ok(&["module", "pull", &digest, "--archive", "hello.tpkg"], w, url);
    assert!(w.join("hello.tpkg").exists());
    let err = fails(&["module", "show", "demo.absent"], w, url);
    assert!(err.contains("404"), "{err}");

    std::fs::write(w.join("weights.safetensors"), b"not really weights").unwrap();
    ok(
        &[
            "model",
            "push",
            "demo.model@1.0.0",
            "weights.safetensors",
            "--meta",
            "library=tessera",
            "--meta",
            "accuracy=0.9",
        ],
        w,
        url,
    );
    let out = ok(&["model", "pull", "demo.model", "--out", "back.bin"], w, url);
    assert_eq!(out.trim(), "back.bin");
    assert_eq!(std::fs::read(w.join("back.bin")).unwrap(), b"not really weights");
    // Without --out, the file is named after the model, its version and its format.
    let out = ok(&["model", "pull", "demo.model"], w, url);
    assert_eq!(out.trim(), "demo.model-1.0.0.bin", "a model without a format is a .bin");
    ok(&["model", "meta", "demo.model@1.0.0", "--meta", "format=ONNX"], w, url);
    let out = ok(&["model", "pull", "demo.model"], w, url);
    assert_eq!(out.trim(), "demo.model-1.0.0.onnx");
    assert_eq!(std::fs::read(w.join("demo.model-1.0.0.onnx")).unwrap(), b"not really weights");
    let models = ok(&["model", "list"], w, url);
    assert!(models.contains("demo.model") && models.contains("1.0.0"), "{models}");
    let shown = ok(&["model", "show", "demo.model@1.0.0"], w, url);
    assert!(shown.contains("\"library\":\"tessera\"") && shown.contains("\"accuracy\":0.9"), "{shown}");

    // Cards, search and lineage.
    let card = ok(&["module", "card", "demo.hello"], w, url);
    assert!(card.contains("mit") && card.contains("Says hello."), "{card}");
    assert!(ok(&["module", "list", "--license", "MIT"], w, url).contains("demo.hello"));
    assert_eq!(ok(&["module", "list", "--license", "gpl-3.0"], w, url), "");
    std::fs::write(w.join("tuned.md"), "---\nbase_model: demo.model@1.0.0\nlicense: mit\n---\nTuned further.\n")
        .unwrap();
    std::fs::write(w.join("tuned.safetensors"), b"tuned weights").unwrap();
    ok(&["model", "push", "demo.tuned@1.0.0", "tuned.safetensors", "--card", "tuned.md"], w, url);
    let tree = ok(&["model", "lineage", "demo.model@1.0.0"], w, url);
    assert!(tree.contains("built from it") && tree.contains("demo.tuned@1.0.0"), "{tree}");
    let tree = ok(&["model", "lineage", "demo.tuned"], w, url);
    assert!(tree.contains("built from demo.model@1.0.0"), "{tree}");
    assert!(ok(&["model", "card", "demo.tuned"], w, url).contains("Tuned further."));
    let mit = ok(&["model", "list", "--license", "mit"], w, url);
    assert!(mit.contains("demo.tuned") && !mit.contains("demo.model "), "{mit}");
    std::fs::write(w.join("bad.md"), "---\nlicense: {a: b}\n---\n").unwrap();
    let err = fails(&["model", "meta", "demo.tuned@1.0.0", "--card", "bad.md"], w, url);
    assert!(err.contains("bad.md"), "{err}");

    // The docs page and the OpenAPI document, as a browser sees them.
    let (status, page) = http_get(&hub.url, "/docs/");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("swagger-ui"));
    let (status, doc) = http_get(&hub.url, "/openapi.json");
    assert_eq!(status, 200);
    assert!(doc.contains("/api/v1/packages/{name}/{version}/download"));

    // Dump the running hub and restore it elsewhere: the same models and packages.
    let data = w.join("hub-data");
    ok(&["hub", "dump", "hub.dump", "--data", data.to_str().unwrap()], w, None);
    ok(&["hub", "restore", "hub.dump", "--data", w.join("restored").to_str().unwrap()], w, None);
    let (a, b) =
        (tessera_hub::HubStore::open(&data).unwrap(), tessera_hub::HubStore::open(w.join("restored")).unwrap());
    let names =
        |s: &tessera_hub::HubStore| s.models(None).unwrap().into_iter().map(|m| (m.name, m.digest)).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    assert!(!names(&b).is_empty());
    let err = fails(&["hub", "restore", "hub.dump", "--data", w.join("restored").to_str().unwrap()], w, None);
    assert!(err.contains("is not empty"), "{err}");
    // A cache bound without a shared store would bound the only copy.
    let err = fails(&["hub", "dump", "again.dump", "--data", data.to_str().unwrap(), "--cache-size", "1GiB"], w, None);
    assert!(err.contains("--cache-size") && err.contains("only copy"), "{err}");
    assert!(!w.join("again.dump").exists());

    // A hub that is not there gets a clear error.
    let err = fails(&["module", "list"], w, Some("http://127.0.0.1:9"));
    assert!(err.contains("cannot reach the hub"), "{err}");
}

#[test]
fn packing_is_deterministic_and_manifests_are_checked() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    ok(&["module", "new", "m", "--runtime", "builtin", "--name", "demo.m"], w, None);
    let a = ok(&["module", "pack", "m", "-o", "a.tpkg"], w, None);
    let b = ok(&["module", "pack", "m", "-o", "b.tpkg"], w, None);
    assert_eq!(a, b);
    assert_eq!(std::fs::read(w.join("a.tpkg")).unwrap(), std::fs::read(w.join("b.tpkg")).unwrap());

    let yaml = std::fs::read_to_string(w.join("m/module.yaml")).unwrap();
    std::fs::write(w.join("m/module.yaml"), yaml.replace("kind: task", "kind: gadget")).unwrap();
    let err = fails(&["module", "check", "m"], w, None);
    assert!(err.contains("module.yaml:3") && err.contains("field `kind`"), "{err}");
    std::fs::write(w.join("m/module.yaml"), yaml.replace("version: 0.1.0", "version: 1")).unwrap();
    let err = fails(&["module", "pack", "m"], w, None);
    assert!(err.contains("field `version`"), "{err}");
    std::fs::write(w.join("m/module.yaml"), &yaml).unwrap();

    let out = ok(&["module", "run", "m", "--set", "greeting=hi"], w, None);
    assert!(out.contains("\"greeting\":\"hi\""), "{out}");
    let err = fails(&["module", "run", "m", "--set", "greeting"], w, None);
    assert!(err.contains("key.path=value"), "{err}");
    let err = fails(&["module", "new", "m", "--runtime", "builtin"], w, None);
    assert!(err.contains("not empty"), "{err}");
    let err = fails(&["module", "new", "Bad Name", "--runtime", "builtin"], w, None);
    assert!(err.contains("invalid module path"), "{err}");
}

fn target_dir() -> PathBuf {
    // <target>/debug/tessera -> <target>
    PathBuf::from(env!("CARGO_BIN_EXE_tessera")).parent().unwrap().parent().unwrap().to_owned()
}

#[test]
fn a_new_wasm_module_builds_and_runs() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    ok(&["module", "new", "hello-wasm"], w, None);
    // Share the guest build directory with the project's own modules (same dependencies).
    let out = tessera()
        .args(["module", "build", "hello-wasm"])
        .current_dir(w)
        .env("TESSERA_HOME", w.join(".tessera-home"))
        .env("CARGO_TARGET_DIR", target_dir().join("wasm-modules"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(w.join("hello-wasm/module.wasm").exists());
    std::fs::write(w.join("in.txt"), "payload").unwrap();
    let out = ok(&["module", "run", "hello-wasm", "--set", "greeting=hi", "--input", "data=in.txt"], w, None);
    assert!(out.contains("message: hi from local"), "{out}");
    assert!(out.contains("data: payload"), "{out}");
    let digest = ok(&["module", "pack", "hello-wasm", "-o", "h.tpkg"], w, None);
    assert!(digest.starts_with("b3:"));
}

#[test]
fn keys_and_namespace_ownership() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Keys: made, listed, shown, exported and imported.
    let alice = ok(&["key", "new", "alice"], w, None).trim().to_owned();
    assert!(alice.starts_with("ed25519:"), "{alice}");
    let eth = run(&["key", "new", "eth", "--type", "secp256k1"], w, None);
    assert!(String::from_utf8_lossy(&eth.stderr).contains("address: 0x"));
    let list = ok(&["key", "list"], w, None);
    assert!(list.contains("alice") && list.contains("eth") && list.contains(&alice), "{list}");
    assert_eq!(ok(&["key", "show", "alice"], w, None).trim(), alice);
    let secret = ok(&["key", "export", "alice", "--secret"], w, None);
    assert!(secret.starts_with("tessera-secret:ed25519:"));
    std::fs::write(w.join("alice.secret"), &secret).unwrap();
    assert_eq!(ok(&["key", "import", "alice2", "--from", "alice.secret"], w, None).trim(), alice);
    let err = fails(&["key", "new", "alice"], w, None);
    assert!(err.contains("exists"), "{err}");
    let mut c = tessera();
    c.args(["key", "new", "locked", "--encrypt"])
        .current_dir(w)
        .env("TESSERA_HOME", w.join(".tessera-home"))
        .env("TESSERA_PASSPHRASE", "pw");
    assert!(c.output().unwrap().status.success());
    let keyfile = std::fs::read_to_string(w.join(".tessera-home/keys/locked.json")).unwrap();
    assert!(keyfile.contains("argon2id"), "{keyfile}");

    // A signed hub: the first key to publish under `demo` owns it.
    let hub = start_hub(&w.join("hub-data"));
    let url = Some(hub.url.as_str());
    ok(&["module", "new", "m", "--runtime", "builtin", "--name", "demo.m"], w, None);
    let mut as_alice = tessera();
    as_alice
        .args(["module", "publish", "m"])
        .current_dir(w)
        .env("TESSERA_HOME", w.join(".tessera-home"))
        .env("TESSERA_HUB", &hub.url)
        .env("TESSERA_KEY", "alice");
    assert!(as_alice.output().unwrap().status.success());
    let owners = ok(&["namespace", "show", "demo"], w, url);
    assert_eq!(owners.trim(), alice);
    // Someone else's key is refused.
    std::fs::write(w.join("m/extra.txt"), "x").unwrap();
    let yaml = std::fs::read_to_string(w.join("m/module.yaml")).unwrap().replace("0.1.0", "0.2.0");
    std::fs::write(w.join("m/module.yaml"), yaml).unwrap();
    let err = fails(&["module", "publish", "m", "--key", "eth"], w, url);
    assert!(err.contains("403") && err.contains("belongs to"), "{err}");
    // Until an owner adds it.
    let eth_key = ok(&["key", "show", "eth"], w, None).trim().to_owned();
    ok(&["namespace", "add-owner", "demo", &eth_key, "--key", "alice"], w, url);
    ok(&["module", "publish", "m", "--key", "eth"], w, url);
    let shown = ok(&["module", "show", "demo.m@0.2.0"], w, url);
    assert!(shown.contains("0.2.0"), "{shown}");
}

/// Error texts read once, name the cause and, where there is one, the fix.
#[test]
fn error_texts_read_once_and_say_what_to_do() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let once = |err: &str| {
        // No part of the message is said twice in a row ("x: x").
        let parts: Vec<&str> = err.trim().trim_start_matches("error: ").split(": ").collect();
        for pair in parts.windows(2) {
            assert_ne!(pair[0], pair[1], "repeated: {err}");
        }
    };
    // A hub that is not there: the cause and where to point instead.
    let err = fails(&["module", "list"], w, Some("http://127.0.0.1:9"));
    assert!(err.contains("Connection refused") && err.contains("TESSERA_HUB"), "{err}");
    once(&err);
    // A manifest with a key twice: the key and the line, no library advice.
    ok(&["module", "new", "m", "--runtime", "builtin", "--name", "demo.m"], w, None);
    let yaml = std::fs::read_to_string(w.join("m/module.yaml")).unwrap();
    std::fs::write(w.join("m/module.yaml"), format!("{yaml}name: demo.other\n")).unwrap();
    let err = fails(&["module", "check", "m"], w, None);
    assert!(err.contains("duplicate key `name`") && !err.contains("DuplicateKeyPolicy"), "{err}");
    std::fs::write(w.join("m/module.yaml"), yaml.replace("entry: echo", "entry: nosuch")).unwrap();
    let err = fails(&["module", "check", "m"], w, None);
    assert!(err.contains("no builtin named \"nosuch\"") && err.contains("echo"), "{err}");
    std::fs::write(w.join("m/module.yaml"), &yaml).unwrap();
    // An input the module does not declare.
    std::fs::write(w.join("in.bin"), b"x").unwrap();
    let err = fails(&["module", "run", "m", "--input", "nosuch=in.bin"], w, None);
    assert!(err.contains("declares no input named \"nosuch\""), "{err}");
    // Numbers JSON cannot hold.
    let err = fails(&["quickstart", "--lr", "nan"], w, None);
    assert!(err.contains("nan is not a finite number") && err.matches("finite").count() == 1, "{err}");
    // Runtimes are named as module.yaml spells them.
    let out = ok(&["module", "new", "p", "--runtime", "python", "--name", "demo.p"], w, None);
    assert!(out.contains("python runtime") && !out.contains("Python,"), "{out}");
    // Unpacking over an existing folder: the cause once.
    let hub = start_hub(&w.join("hub-data"));
    ok(&["module", "publish", "m"], w, Some(&hub.url));
    let err = fails(&["module", "pull", "demo.m@0.1.0", "--out", "m"], w, Some(&hub.url));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.matches("already exists").count(), 1, "{err}");
    once(&err);
    // A hub whose shared blob store cannot be reached: refused before it makes anything.
    let fresh = w.join("fresh-hub");
    let err = fails(
        &[
            "hub",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--blobs",
            "nats://127.0.0.1:9",
            "--data",
            fresh.to_str().unwrap(),
        ],
        w,
        None,
    );
    assert!(err.contains("--blobs: cannot connect to NATS at nats://127.0.0.1:9") && !err.contains("--nats"), "{err}");
    once(&err);
    assert!(!fresh.exists(), "a refused hub serve leaves no data directory");
}

#[test]
fn bad_swarm_files_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("w")).unwrap();
    std::fs::write(d.join("w/module.yaml"), "name: t.w\nversion: 1.0.0\nkind: task\nruntime: python\nentry: w.py\n")
        .unwrap();
    std::fs::write(d.join("w/w.py"), "import tessera\nclass W(tessera.Task):\n    def run(self):\n        return 1\n")
        .unwrap();
    let head = "tasks:\n  w:\n    module: ./w\n  a:\n    module: ./w\n    method: any\n";
    let cases = [
        // (file body, what the error names)
        (format!("{head}flow: [w -> a -> b]\n"), "line 7", "unknown task `b`"),
        (format!("{head}flow: [w -> a, a -> w]\n"), "line 7", "cycle"),
        (format!("{head}    maximum: 1.5\nflow: [w -> a]\n"), "line 7", "maximum"),
        (
            "tasks:\n  w:\n    module: t.w\n    versions: {1.0.0: 0.8, 1.1.0: 0.3}\nflow: [w]\n".to_string(),
            "line 4",
            "sum",
        ),
        (format!("{head}  s:\n    module: ./nothing-here\nflow: [w -> a -> s]\n"), "line 8", "no module folder"),
        ("tasks:\n  w:\n    module: t.unknown@1.0.0\nflow: [w]\n".to_string(), "line 3", "t.unknown@1.0.0"),
    ];
    for (i, (body, line, what)) in cases.iter().enumerate() {
        let file = d.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, body).unwrap();
        // Nothing listens on port 9: a module the hub would give cannot be fetched.
        let err = fails(
            &["swarm", "run", file.to_str().unwrap(), "--embedded", "--node", "n0"],
            d,
            Some("http://127.0.0.1:9"),
        );
        assert!(err.contains(&format!("bad-{i}.yaml {line}")), "case {i}: {err}");
        assert!(err.contains(what), "case {i}: {err}");
    }
}

#[test]
fn flow_files_are_checked_and_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let calc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/dataflows/calc.yaml");
    let calc = calc.to_str().unwrap();
    let out = ok(&["flow", "check", calc], dir.path(), None);
    assert!(out.contains("5 definitions, 3 operations; inputs: calc_string"), "{out}");
    let mermaid = ok(&["flow", "graph", calc], dir.path(), None);
    assert!(mermaid.contains("parse -->|is_add?| add"), "{mermaid}");
    let dot = ok(&["flow", "graph", "--format", "dot", calc], dir.path(), None);
    assert!(dot.starts_with("digraph dataflow {"), "{dot}");
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(calc)
        .unwrap()
        .replace("inputs: {numbers: numbers}\n    outputs: {sum", "inputs: {numbers: numberz}\n    outputs: {sum");
    std::fs::write(&bad, text).unwrap();
    let err = fails(&["flow", "check", bad.to_str().unwrap()], dir.path(), None);
    assert!(err.contains("bad.yaml line 18") && err.contains("add"), "{err}");
    std::fs::write(&bad, vec![b'#'; 300_000]).unwrap();
    let err = fails(&["flow", "check", bad.to_str().unwrap()], dir.path(), None);
    assert!(err.contains("at most"), "{err}");
    // The Python form of the calculator is the same flow.
    let calc_py = calc.replace("calc.yaml", "calc.py");
    assert_eq!(ok(&["flow", "graph", &calc_py], dir.path(), None), mermaid);
    let out = ok(&["flow", "check", &calc_py], dir.path(), None);
    assert!(out.contains("5 definitions, 3 operations; inputs: calc_string"), "{out}");
    // Its errors name the Python file's line.
    let py = std::fs::read_to_string(&calc_py)
        .unwrap()
        .replace("mult = Operation(\"mult\", module=MODULE,", "mult = Operation(\"mult\", module=\"../calc\",");
    let bad_py = dir.path().join("bad_calc.py");
    std::fs::write(&bad_py, py).unwrap();
    let err = fails(&["flow", "check", bad_py.to_str().unwrap()], dir.path(), None);
    assert!(err.contains("bad_calc.py line 20") && err.contains("operations.mult.module"), "{err}");
    // A Python flow running a subflow, named by a path relative to the working folder.
    let pyflow = dir.path().join("pyflow");
    std::fs::create_dir_all(&pyflow).unwrap();
    std::fs::write(
        pyflow.join("inner.yaml"),
        "definitions:\n  n: {type: int}\n  m: {type: int}\noperations:\n  \
         inc: {module: t.ops@1.0.0, function: inc, inputs: {n: n}, outputs: {m: m}}\ninputs: [n]\noutput: {get_single: [m]}\n",
    )
    .unwrap();
    std::fs::write(
        pyflow.join("outer.py"),
        "from tessera.dataflow import DataFlow, Definition, GetSingle, Operation\n\
         n = Definition('n', 'int')\nm = Definition('m', 'int')\n\
         flow = DataFlow(Operation('sub', subflow='inner.yaml', inputs={'n': n}, outputs={'m': m}), inputs=[n], output=GetSingle(m))\n",
    )
    .unwrap();
    let out = ok(&["flow", "check", "pyflow/outer.py"], dir.path(), None);
    assert!(out.contains("2 definitions, 1 operations"), "{out}");
    // The ML example and its model subflow; an error inside the subflow names its file.
    let ml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/dataflows/ml");
    let out = ok(&["flow", "check", ml.join("flow.yaml").to_str().unwrap()], dir.path(), None);
    assert!(out.contains("6 definitions, 4 operations; inputs: dataset"), "{out}");
    let mermaid = ok(&["flow", "graph", ml.join("flow.yaml").to_str().unwrap()], dir.path(), None);
    assert!(
        mermaid.contains("model[\"model<br/>subflow\"]") && mermaid.contains("scale -->|scaled| model"),
        "{mermaid}"
    );
    let copy = dir.path().join("ml");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(ml.join("flow.yaml"), copy.join("flow.yaml")).unwrap();
    let model = std::fs::read_to_string(ml.join("model.yaml")).unwrap();
    std::fs::write(copy.join("model.yaml"), model.replace("function: score", "function: score\n    retries: 2"))
        .unwrap();
    let err = fails(&["flow", "check", copy.join("flow.yaml").to_str().unwrap()], dir.path(), None);
    assert!(err.contains("model.yaml line") && err.contains("unknown field"), "{err}");
}

#[test]
fn node_doctor_says_what_the_machine_enforces() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&["node", "doctor"], dir.path(), None);
    for line in ["landlock:   on: ABI", "seccomp:    on", "cgroup:     on", "filesystem: enforced (required)"] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert!(out.contains("requirements are met"), "{out}");
    // A policy requiring every protection: this machine has them all.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "sandbox:\n  require: [filesystem, network, memory, processes]\n").unwrap();
    let out = ok(&["node", "doctor", "--policy", policy.to_str().unwrap()], dir.path(), None);
    assert!(out.contains("memory:     enforced (required)"), "{out}");
    // A protection nobody knows is named.
    std::fs::write(&policy, "sandbox:\n  require: [gpu]\n").unwrap();
    let e = fails(&["node", "doctor", "--policy", policy.to_str().unwrap()], dir.path(), None);
    assert!(e.contains("unknown variant `gpu`") && e.contains("line 2"), "{e}");
}
