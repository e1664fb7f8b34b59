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
    /// A Python file with a `tessera.Task` subclass, run by the node's Python.
    Python,
}

impl Runtime {
    /// The name as `module.yaml` and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Builtin => "builtin",
            Runtime::Python => "python",
        }
    }
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
  storage: 0       # disk it needs; above 0, each run also gets a /scratch folder of its own
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
        Runtime::Python => {
            write(
                dir,
                "module.yaml",
                &format!(
                    "name: {name}
version: 0.1.0
kind: task
runtime: python
entry: module.py
description: A new Tessera module in Python. Greets, and measures its input.
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
    type: json
needs:
  cpu: 1
  memory: 256MiB
  libraries: []        # what the module imports beyond the standard library
"
                ),
            )?;
            write(
                dir,
                "module.py",
                &format!(
                    r#""""{name}: a Tessera module in Python.

`run` is the task entry point (`tessera module run .`); every other public method is a
function its actors answer (`tessera launch {name}`, `tessera call {name} greet Ada`).
`self.config` is the module's config with overrides, `self.local` its node (datasets,
resources, state), `self.world` the run's shared state, `self.log` its log.
"""

import tessera


class Module(tessera.Task):
    def setup(self):
        """Runs once, before the first call."""
        self.greeting = self.config.get("greeting", "hello")

    def greet(self, who="world"):
        """An actor function: `tessera call {name} greet Ada`."""
        return f"{{self.greeting}}, {{who}}!"

    def run(self, data=None):
        """The task: named outputs from the optional `data` input."""
        size = 0 if data is None else len(data)
        self.log.info(f"{{size}} bytes in")
        return {{"message": f"{{self.greeting}}: {{size}} bytes in"}}
"#
                ),
            )?;
            write(
                dir,
                "test_module.py",
                r#""""Tests of the module, without a node: `python -m unittest` in this folder."""

import unittest

from module import Module


class ModuleTest(unittest.TestCase):
    def setUp(self):
        self.module = Module()
        self.module.config = {"greeting": "hi"}
        self.module.setup()

    def test_greet(self):
        self.assertEqual(self.module.greet("Ada"), "hi, Ada!")

    def test_run_measures_its_input(self):
        self.assertEqual(self.module.run(b"12345"), {"message": "hi: 5 bytes in"})
        self.assertEqual(self.module.run(), {"message": "hi: 0 bytes in"})


if __name__ == "__main__":
    unittest.main()
"#,
            )?;
            write(
                dir,
                ".tesseraignore",
                "# Left out of the package (gitignore syntax).\n__pycache__/\n*.pyc\ntest_*.py\n",
            )?;
            write(
                dir,
                "README.md",
                &format!(
                    "# {name}

A Tessera module in Python (`runtime: python`). It needs the Tessera Python SDK where it
runs (`pip install ./sdk/python` from the Tessera repository); the node runs it with
`$TESSERA_PYTHON` (default `python3`).

    python -m unittest                  # its tests, without a node
    tessera module run . --set greeting=hi --input data=module.py
    tessera launch . --replace          # as an actor on a local node, from this folder
    tessera call {name} greet Ada
    tessera module publish .

`.tesseraignore` (gitignore syntax) says what stays out of the package.
"
                ),
            )?;
        }
    }
    Ok(())
}
