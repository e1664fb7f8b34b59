//! A large model through the `tessera` binary and a hub process: the push is interrupted
//! and resumes, the pull is interrupted and resumes with a range request, the digest holds
//! end to end, the same bytes again take no space, and neither process grows with the
//! model. The size is `TESSERA_LARGE_MODEL_MIB` (256 by default; docs/benchmarks.md has a
//! run at 2048).

#[path = "support/hub.rs"]
mod hub_process;
use hub_process::spawn_hub;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_core::{Digest, DigestWriter};

/// Memory each process may reach, in bytes.
const BOUND: u64 = 100 << 20;

fn tessera(home: &Path, hub: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("RUST_LOG").env("TESSERA_HOME", home).env("TESSERA_HUB", hub).current_dir(home);
    c
}

#[path = "support/peak.rs"]
mod peak;
use peak::peak_rss;

/// Runs a child to its end, sampling its peak memory; `stop` may end it early (returns
/// true to kill). Returns whether it succeeded, its stderr and its peak memory.
fn watch(mut child: Child, mut stop: impl FnMut() -> bool) -> (bool, String, u64) {
    let pid = child.id();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut peak = 0;
    let ok = loop {
        if let Some(p) = peak_rss(pid) {
            peak = peak.max(p);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if stop() {
            child.kill().unwrap();
            child.wait().unwrap();
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (ok, reader.join().unwrap(), peak)
}

fn file_digest(path: &Path) -> Digest {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = DigestWriter::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.update(&buf[..n]);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        total += if p.is_dir() { dir_bytes(&p) } else { e.metadata().unwrap().len() };
    }
    total
}

/// The largest file under `dir`, in bytes.
fn largest_file(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().map(|e| e.metadata().map_or(0, |m| m.len())).max().unwrap_or(0))
}

/// Writes a safetensors file of one F32 tensor of `mib` MiB, streamed.
fn write_model(path: &PathBuf, mib: u64) {
    let floats = (mib << 20) / 4;
    let mut header = format!(r#"{{"weight":{{"dtype":"F32","shape":[{floats}],"data_offsets":[0,{}]}}}}"#, floats * 4);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 18).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    for i in 0..mib {
        let mut c = chunk.clone();
        c[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&c).unwrap();
    }
    f.flush().unwrap();
}

#[test]
fn a_large_model_resumes_both_ways_in_bounded_memory() {
    let mib: u64 = std::env::var("TESSERA_LARGE_MODEL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    assert!(mib >= 128, "the push must have more than one piece of 64 MiB");
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("model.safetensors");
    write_model(&model, mib);
    let digest = file_digest(&model);

    let data = home.path().join("hub");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tessera"));
    serve.args(["hub", "serve", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()]).env_remove("RUST_LOG");
    let (hub, url) = spawn_hub(serve);
    let hub_pid = hub.id();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _hub = Kill(hub);

    // The push, cut off once the hub holds its first piece.
    let uploads = data.join("blobs/uploads");
    let push = || {
        tessera(home.path(), &url)
            .args(["model", "push", "big.model@1.0.0", "model.safetensors", "--meta", "library=test"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ok, err, peak_first) = watch(push(), || largest_file(&uploads) >= 64 << 20);
    assert!(!ok, "the first push was cut off: {err}");
    let (ok, err, peak_second) = watch(push(), || false);
    assert!(ok, "the resumed push: {err}");
    let first = err.lines().find(|l| l.starts_with("uploaded ") || l.starts_with("resuming ")).unwrap_or_default();
    assert!(
        first.starts_with("resuming at ") && !first.starts_with("resuming at 0 "),
        "the second push resumed: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("uploaded ")).collect();
    let mut unique = lines.clone();
    unique.dedup();
    assert_eq!(lines, unique, "each offset is reported once: {err}");
    let hub_blobs = dir_bytes(&data.join("blobs"));
    assert!(hub_blobs < (mib << 20) + (1 << 20), "one copy of the model, no leftovers: {hub_blobs} bytes");

    // Tensor metadata without a download.
    let out = tessera(home.path(), &url).args(["model", "tensors", "big.model"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&digest.to_string()) && text.contains("weight") && text.contains("F32"), "{text}");

    // The pull, cut off midway, then resumed: the file is whole and right.
    let part = home.path().join(format!(".back.safetensors.{}.part", &digest.hex()[..16]));
    let pull = || {
        tessera(home.path(), &url)
            .args(["model", "pull", "big.model@1.0.0", "--out", "back.safetensors"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let half = (mib << 20) / 2;
    let (ok, _, peak_pull_first) = watch(pull(), || std::fs::metadata(&part).map_or(0, |m| m.len()) >= half);
    if !ok {
        assert!(part.exists(), "an interrupted pull leaves its part");
    }
    let (ok, err, peak_pull) = watch(pull(), || false);
    assert!(ok, "the resumed pull: {err}");
    assert_eq!(file_digest(&home.path().join("back.safetensors")), digest);

    // The same bytes again: no piece sent, no new space.
    let started = Instant::now();
    let out =
        tessera(home.path(), &url).args(["model", "push", "big.model@2.0.0", "model.safetensors"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.lines().any(|l| l.starts_with("uploaded ")), "{err}");
    assert!(err.contains("the hub has these bytes already") && err.contains("nothing was sent"), "{err}");
    assert_eq!(dir_bytes(&data.join("blobs")), hub_blobs, "no new space");
    eprintln!("second push of the same bytes: {:.1} s (hashing the file)", started.elapsed().as_secs_f64());

    let hub_peak = peak_rss(hub_pid).unwrap();
    eprintln!(
        "{mib} MiB model; peak memory: hub {} MiB, push {} / {} MiB, pull {} / {} MiB",
        hub_peak >> 20,
        peak_first >> 20,
        peak_second >> 20,
        peak_pull_first >> 20,
        peak_pull >> 20
    );
    for (what, peak) in [
        ("hub", hub_peak),
        ("interrupted push", peak_first),
        ("push", peak_second),
        ("interrupted pull", peak_pull_first),
        ("pull", peak_pull),
    ] {
        assert!(peak < BOUND, "{what} reached {} MiB", peak >> 20);
    }
}
