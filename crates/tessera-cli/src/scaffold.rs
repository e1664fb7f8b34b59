//! Templates for `tessera module new`.

use std::path::Path;

use anyhow::{Context, bail};

/// What kind of module to scaffold.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Runtime {
    /// A Rust crate compiled to a WebAssembly component (wasm32-wasip2).
    Wasm,
    /// A module whose code is compiled into tessera (`entry` names the builtin).
    Builtin,
}

fn write(dir: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

/// Writes a new module folder at `dir` named `name`.
pub fn scaffold(dir: &Path, name: &str, runtime: Runtime) -> anyhow::Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty; pick a new folder", dir.display());
    }
    std::fs::create_dir_all(dir)?;
    match runtime {
        Runtime::Wasm => {
            let crate_name = name.replace(['.', '-'], "_");
            write(
                dir,
                "module.yaml",
                &format!(
                    "name: {name}
version: 0.1.0
kind: task
runtime: wasm
entry: module.wasm
description: A new Tessera module. Greets, and echoes its inputs.
license: Apache-2.0
tags: [example]
config:
  greeting: hello
inputs:
  - name: data
    type: bytes
    optional: true
outputs:
  - name: message
    type: text
needs:
  cpu: 1
  memory: 64MiB
"
                ),
            )?;
            write(
                dir,
                "Cargo.toml",
                &format!(
                    "[package]
name = \"{crate_name}\"
version = \"0.1.0\"
edition = \"2024\"
publish = false

[lib]
crate-type = [\"cdylib\"]

[dependencies]
wit-bindgen = {{ version = \"0.63\", default-features = false, features = [\"macros\", \"realloc\"] }}
serde_json = \"1\"

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = \"debuginfo\"

# Built on its own, not as part of an enclosing workspace.
[workspace]
"
                ),
            )?;
            write(
                dir,
                "src/lib.rs",
                r#"//! A Tessera module: `run` gets the config (JSON) and named inputs, returns named outputs.
//! Build it with `tessera module build .`, try it with `tessera module run .`.

wit_bindgen::generate!({ path: "wit", world: "module" });

use tessera::module::log::{Level, log};
use tessera::module::local;

struct Module;

impl Guest for Module {
    fn run(config: String, inputs: Vec<Blob>) -> Result<Vec<Blob>, String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let greeting = config["greeting"].as_str().unwrap_or("hello");
        let node = local::node();
        log(Level::Info, &format!("running on {node}"));
        let mut out = vec![Blob { name: "message".into(), data: format!("{greeting} from {node}").into_bytes() }];
        out.extend(inputs);
        Ok(out)
    }
}

export!(Module);
"#,
            )?;
            write(dir, "wit/tessera.wit", tessera_modules::WIT)?;
            write(dir, ".gitignore", "/target\n/module.wasm\n")?;
            write(
                dir,
                "README.md",
                &format!(
                    "# {name}

A Tessera module (WebAssembly).

    tessera module build .              # compile to module.wasm (wasm32-wasip2)
    tessera module run . --set greeting=hi
    tessera module pack .               # a deterministic package, named by its digest
    tessera module publish .            # to the hub at $TESSERA_HUB

`wit/tessera.wit` is the contract with Tessera: the module exports `run` and may import
its node's datasets, the run's world state and a log.
"
                ),
            )?;
        }
        Runtime::Builtin => {
            write(
                dir,
                "module.yaml",
                &format!(
                    "name: {name}
version: 0.1.0
kind: task
runtime: builtin
# The builtin that runs: `echo` returns its inputs (or its config when it has none).
entry: echo
description: A module running tessera's builtin echo.
license: Apache-2.0
tags: [example]
config:
  greeting: hello
"
                ),
            )?;
            write(
                dir,
                "README.md",
                &format!(
                    "# {name}

A Tessera module whose code is compiled into tessera (`runtime: builtin`).

    tessera module run . --set greeting=hi
    tessera module publish .
"
                ),
            )?;
        }
    }
    Ok(())
}
