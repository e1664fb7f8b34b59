//! Compiles the modules under `modules/` (a workspace of its own) to `wasm32-wasip2` and
//! copies the `.wasm` files into OUT_DIR. Installs the target with rustup if it is missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const MODULES: [&str; 2] = ["fl_softmax_worker", "test_programs"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().parent().unwrap().to_owned();
    let modules = root.join("modules");
    println!("cargo:rerun-if-changed={}", modules.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", modules.join("Cargo.lock").display());
    for m in ["fl-softmax-worker", "test-programs"] {
        println!("cargo:rerun-if-changed={}", modules.join(m).join("src").display());
        println!("cargo:rerun-if-changed={}", modules.join(m).join("Cargo.toml").display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one guest build between
    // profiles under <target>/wasm-modules.
    let target_dir =
        out_dir.ancestors().nth(4).map(|t| t.join("wasm-modules")).unwrap_or_else(|| out_dir.join("wasm-modules"));

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_target();

    let mut cmd = Command::new(&cargo);
    cmd.env_clear();
    for keep in ["PATH", "HOME", "RUSTUP_HOME", "CARGO_HOME", "RUSTUP_TOOLCHAIN", "CARGO_NET_OFFLINE", "TMPDIR"] {
        if let Ok(v) = env::var(keep) {
            cmd.env(keep, v);
        }
    }
    // Reproducible bytes wherever the checkout and the cargo home are: panic messages
    // carry source paths, so map them to fixed prefixes.
    let mut flags = vec![format!("--remap-path-prefix={}=/tessera/modules", modules.display())];
    let cargo_home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    // WebAssembly SIMD (128-bit vectors, on in every engine Tessera runs): the workers'
    // loops over features become vector operations.
    flags.push("-Ctarget-feature=+simd128".into());
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    cmd.current_dir(&modules)
        .args(["build", "--release", "--locked", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    if !status.success() {
        panic!("building the WebAssembly modules in {} failed (see the output above)", modules.display());
    }
    for m in MODULES {
        let built = target_dir.join(TARGET).join("release").join(format!("{m}.wasm"));
        std::fs::copy(&built, out_dir.join(format!("{m}.wasm")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    }
}

/// Makes sure the standard library for wasm32-wasip2 is installed.
fn ensure_target() {
    let sysroot = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let installed =
        sysroot.is_some_and(|s| Path::new(&s).join("lib").join("rustlib").join(TARGET).join("lib").exists());
    if installed {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let ok = Command::new("rustup").args(["target", "add", TARGET]).status().is_ok_and(|s| s.success());
    if !ok {
        panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and build again");
    }
}
