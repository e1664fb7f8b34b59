//! `tessera module`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::Subcommand;
use std::time::Duration;
use tessera_client::ListParams;
use tessera_core::config::apply_override;
use tessera_core::registry::PackageRecord;
use tessera_core::{ModulePath, PackageRef};
use tessera_hub::{HubStore, LocalHub};
use tessera_node::{NodeConfig, NodePorts};
use tessera_package::{EXTENSION, Limits, inspect, pack_dir, unpack, verify};

use tessera_ports::Backend;
use tessera_wasm::{WasmLimits, WasmRuntime};

use crate::HubArg;
use crate::scaffold::{Runtime as ScaffoldRuntime, scaffold};

#[derive(Subcommand)]
pub enum Command {
    /// Create a module folder that works as it is.
    New {
        /// The folder to create.
        path: PathBuf,
        /// How the module runs.
        #[arg(long, value_enum, default_value = "wasm")]
        runtime: ScaffoldRuntime,
        /// Its module path (default: from the folder name, e.g. my-model -> my-model).
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a module that ships inside the binary to a folder, ready to publish: the
    /// quickstart's federated worker `fl.softmax.worker`, and `tessera.fedavg-partial`
    /// (the hierarchy's region aggregator). Without a name, lists them.
    Example {
        /// The module's name.
        name: Option<String>,
        /// The folder to write (default: the name).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Compile a WebAssembly module's Rust crate to `module.wasm` (installs the
    /// wasm32-wasip2 target if it is missing).
    Build {
        /// The module folder.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Validate a module folder's manifest and list what a package of it would hold.
    Check {
        /// The module folder.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Pack a module folder into a deterministic package and print its digest.
    Pack {
        /// The module folder.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Where to write the package (default: <name>-<version>.tpkg here).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Publish a module folder or a .tpkg package to the hub, signed with your key.
    Publish {
        /// A module folder or a package file.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Publish it private: sealed so only the keys given with --to, and your own (an
        /// Ed25519 key), can read it (the hub stores ciphertext, and serves it only to its
        /// namespace's owners and to the keys given with --to, each granted for good;
        /// `module revoke` takes a grant away).
        #[arg(long, requires = "to")]
        private: bool,
        /// A recipient of a private package: a node's key (repeatable).
        #[arg(long = "to", value_name = "KEY")]
        to: Vec<String>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show who may read a private package (you must own its namespace).
    Grants {
        /// The module path.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Delete a published version (its number stays reserved: only the same bytes can be
    /// published under it again).
    Delete {
        /// `name@version`.
        reference: String,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Point an alias (such as `stable`) at a version; `latest` is computed and cannot be set.
    Alias {
        /// The module path.
        name: String,
        /// The alias.
        alias: String,
        /// The version it points at.
        #[arg(value_name = "VERSION")]
        target: String,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Let a key read a private package (it must be one the package was sealed for), until
    /// --expires if given.
    Grant {
        /// The module path.
        name: String,
        /// The key to grant (ed25519:…).
        grantee: String,
        /// When the grant ends (YYYY-MM-DDTHH:MM:SSZ).
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Take a key's right to read a private package away.
    Revoke {
        /// The module path.
        name: String,
        /// The key whose grant ends.
        grantee: String,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Download a package (verified by digest) and unpack it.
    Pull {
        /// `name`, `name@version`, `name@alias` or `b3:<digest>`.
        reference: String,
        /// Folder to unpack into (default: <name>-<version>).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Save the package file here instead of unpacking it.
        #[arg(long)]
        archive: Option<PathBuf>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// List packages in the hub (the latest version of each).
    List {
        /// Module-path prefix (by segments: `fl` matches `fl.softmax.worker`).
        #[arg(long)]
        prefix: Option<String>,
        /// Tag.
        #[arg(long)]
        tag: Option<String>,
        /// Kind: task, model, transformation, service, inferencer, dataset.
        #[arg(long)]
        kind: Option<String>,
        /// Text in the name or description.
        #[arg(long, short)]
        query: Option<String>,
        /// Every version, not only the latest.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        search: crate::SearchArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show a package's card: the facts and text of the README.md it holds.
    Card {
        /// `name` (latest) or `name@version` or `name@alias`.
        reference: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show a package's record and manifest.
    Show {
        /// `name`, `name@version`, `name@alias` or `b3:<digest>`.
        reference: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Run a module folder once on an embedded node, as a node would: packed, verified,
    /// unpacked, sandboxed.
    Run {
        /// The module folder.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Config override, `key.path=value` (types follow the default config).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// An input, `name=FILE`.
        #[arg(long = "input", value_name = "NAME=FILE")]
        input: Vec<String>,
        /// A dataset the node holds, `name=FILE`.
        #[arg(long = "dataset", value_name = "NAME=FILE")]
        dataset: Vec<String>,
        /// Write outputs as files in this folder.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Time limit in seconds (WebAssembly).
        #[arg(long, default_value = "300", value_parser = tessera_core::time::parse_seconds)]
        timeout: Duration,
        /// Memory limit (WebAssembly), e.g. 512MiB.
        #[arg(long, default_value = "1GiB")]
        memory: tessera_core::ByteSize,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::New { path, runtime, name } => new(&path, runtime, name),
        Command::Build { path } => build(&path),
        Command::Check { path } => check(&path),
        Command::Example { name, out } => example(name.as_deref(), out),
        Command::Pack { path, out } => pack(&path, out),
        Command::Publish { path, private, to, hub } => publish(&path, private, &to, &hub).await,
        Command::Grants { name, json, hub } => {
            let grants = hub.signed_client()?.grants(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&grants)?);
                return Ok(());
            }
            let list = grants.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                eprintln!("no grants of {name}");
            }
            for g in list {
                println!("{}", grant_line(&g));
            }
            Ok(())
        }
        Command::Grant { name, grantee, expires, hub } => {
            let key: tessera_identity::PublicKey = grantee.parse()?;
            let g = hub.signed_client()?.set_grant(&name, &key, expires.as_deref(), false).await?;
            println!("{}", grant_line(&g));
            Ok(())
        }
        Command::Revoke { name, grantee, hub } => {
            let key: tessera_identity::PublicKey = grantee.parse()?;
            let g = hub.signed_client()?.set_grant(&name, &key, None, true).await?;
            println!("{}", grant_line(&g));
            Ok(())
        }
        Command::Delete { reference, hub } => {
            let (name, version) =
                reference.split_once('@').ok_or_else(|| anyhow!("expected NAME@VERSION, got {reference:?}"))?;
            let rec = hub.signed_client()?.delete(name, version).await?;
            eprintln!("deleted {}@{} (the version stays reserved for the same bytes)", rec.name, rec.version);
            Ok(())
        }
        Command::Alias { name, alias, target, hub } => {
            let rec = hub.signed_client()?.set_alias(&name, &alias, &target).await?;
            println!("{name}@{alias} -> {} ({})", rec.version, rec.digest);
            Ok(())
        }
        Command::Pull { reference, out, archive, hub } => pull(&reference, out, archive, &hub).await,
        Command::Card { reference, json, hub } => {
            let (name, version) = reference.split_once('@').unwrap_or((&reference, "latest"));
            let card = hub.client()?.package_card(name, version).await?;
            crate::model::print_card(&card, json)
        }
        Command::List { prefix, tag, kind, query, all, search, json, hub } => {
            let params = ListParams {
                prefix,
                tag,
                kind,
                q: query,
                all,
                license: search.license,
                library: search.library,
                signer: search.signer,
                offset: search.offset,
                limit: search.limit,
            };
            let list = hub.client()?.list(&params).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no packages match");
            } else {
                for r in &list {
                    println!(
                        "{:<32} {:<10} {:<15} {:<8} {}",
                        r.name,
                        r.version,
                        r.kind.as_str(),
                        r.runtime,
                        r.digest.short()
                    );
                }
            }
            Ok(())
        }
        Command::Show { reference, json, hub } => {
            let r: PackageRef = reference.parse()?;
            let rec = hub.client()?.show(&r).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                print_record(&rec);
            }
            Ok(())
        }
        Command::Run { path, set, input, dataset, out, timeout, memory } => {
            run_local(&path, &set, &input, &dataset, out.as_deref(), timeout, memory.0).await
        }
    }
}

fn print_record(r: &PackageRecord) {
    let m = &r.manifest;
    println!("{}@{}", r.name, r.version);
    println!("  digest:      {}", r.digest);
    println!("  size:        {} bytes", r.size);
    println!("  kind:        {}", r.kind.as_str());
    println!("  runtime:     {} (entry {})", r.runtime, m.entry);
    println!("  published:   {}", r.published_at);
    match &r.signer {
        Some(k) => println!("  signed by:   {k}"),
        None => println!("  signed by:   (unsigned)"),
    }
    if r.private {
        println!("  private:     sealed for its recipients; the hub holds only ciphertext");
    }
    if !m.description.is_empty() {
        println!("  description: {}", m.description.trim());
    }
    if let Some(l) = &m.license {
        println!("  license:     {l}");
    }
    if !m.tags.is_empty() {
        println!("  tags:        {}", m.tags.join(", "));
    }
    for (label, ports) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
        if !ports.is_empty() {
            let names: Vec<String> = ports.iter().map(|p| format!("{} ({:?})", p.name, p.ty).to_lowercase()).collect();
            println!("  {label:<12} {}", names.join(", "));
        }
    }
    println!(
        "  needs:       cpu {}, memory {}, gpu {}, storage {}",
        m.needs.cpu, m.needs.memory, m.needs.gpu, m.needs.storage
    );
    if m.config.as_object().is_some_and(|o| !o.is_empty()) {
        println!("  config:      {}", m.config);
    }
}

fn new(path: &Path, runtime: ScaffoldRuntime, name: Option<String>) -> anyhow::Result<()> {
    let name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.to_lowercase().replace('_', "-"))
            .ok_or_else(|| anyhow!("cannot derive a module name from {}; pass --name", path.display()))?,
    };
    let _: ModulePath = name.parse().context("--name")?;
    scaffold(path, &name, runtime)?;
    println!("created {} ({name}, {} runtime)", path.display(), runtime.name());
    match runtime {
        ScaffoldRuntime::Wasm => println!("next: tessera module build {0} && tessera module run {0}", path.display()),
        ScaffoldRuntime::Builtin => println!("next: tessera module run {}", path.display()),
        ScaffoldRuntime::Python => println!(
            "next: (cd {0} && python -m unittest) && tessera module run {0}  (with the SDK installed in $TESSERA_PYTHON)",
            path.display()
        ),
    }
    Ok(())
}

const WASM_TARGET: &str = "wasm32-wasip2";

/// A grant as a line: the key, until when, and whether it was revoked.
fn grant_line(g: &serde_json::Value) -> String {
    let until = g["expires"].as_str().map_or("no end".to_owned(), |t| format!("until {t}"));
    let expired = g["expires_ms"].as_u64().is_some_and(|e| e <= tessera_identity::now_ms());
    let state = if g["revoked"].as_bool() == Some(true) {
        "revoked"
    } else if expired {
        "expired"
    } else {
        "live"
    };
    format!("{:<60} {state:<8} {until}", g["grantee"].as_str().unwrap_or("?"))
}

/// The modules the binary carries: name, what it is, and how to write its folder.
const EXAMPLES: [(&str, &str); 2] = [
    ("fl.softmax.worker", "the quickstart's federated worker: softmax regression on digits (WebAssembly)"),
    ("tessera.fedavg-partial", "a region aggregator for hierarchical FedAvg (the fedavg-partial builtin)"),
];

const FEDAVG_PARTIAL_MANIFEST: &str = "name: tessera.fedavg-partial\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: fedavg-partial\ndescription: A region aggregator's part of hierarchical FedAvg (the example-weighted sum of its region's updates).\nlicense: Apache-2.0\ntags: [fl, aggregation]\n";

fn example(name: Option<&str>, out: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(name) = name else {
        for (n, what) in EXAMPLES {
            println!("{n:<26} {what}");
        }
        return Ok(());
    };
    let dir = out.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!("{} exists already; choose another folder with --out", dir.display());
    }
    match name {
        "fl.softmax.worker" => tessera_modules::write_softmax_worker(&dir)?,
        "tessera.fedavg-partial" => {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("module.yaml"), FEDAVG_PARTIAL_MANIFEST)?;
        }
        other => bail!(
            "no module {other:?} ships with tessera (it has: {})",
            EXAMPLES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    }
    println!("{}", dir.display());
    eprintln!("wrote {name} to {} (publish it with: tessera module publish {})", dir.display(), dir.display());
    Ok(())
}

/// Installs the wasm32-wasip2 target when rustup knows it is missing.
fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Process::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(o) if String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == WASM_TARGET) => Ok(()),
        Ok(_) => {
            eprintln!("installing the {WASM_TARGET} target with rustup");
            let ok = Process::new("rustup").args(["target", "add", WASM_TARGET]).status()?.success();
            anyhow::ensure!(ok, "`rustup target add {WASM_TARGET}` failed");
            Ok(())
        }
        // No rustup: let cargo say what is missing.
        Err(_) => Ok(()),
    }
}

fn build(path: &Path) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(path.join("module.yaml"))
        .with_context(|| format!("{} has no module.yaml", path.display()))?;
    let manifest = tessera_core::Manifest::parse(&manifest)?;
    if manifest.runtime != tessera_core::RuntimeKind::Wasm {
        bail!("{} is a {} module: only wasm modules are built", manifest.name, manifest.runtime);
    }
    anyhow::ensure!(path.join("Cargo.toml").exists(), "{} has no Cargo.toml to build", path.display());
    ensure_wasm_target()?;
    let status = Process::new("cargo")
        .current_dir(path)
        .args(["build", "--release", "--target", WASM_TARGET])
        .status()
        .context("running cargo")?;
    anyhow::ensure!(status.success(), "cargo build failed");
    let meta =
        Process::new("cargo").current_dir(path).args(["metadata", "--no-deps", "--format-version", "1"]).output()?;
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).context("reading cargo metadata")?;
    let target_dir = PathBuf::from(
        meta["target_directory"].as_str().ok_or_else(|| anyhow!("cargo metadata has no target_directory"))?,
    );
    let lib = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .find(|t| t["crate_types"].as_array().is_some_and(|c| c.iter().any(|k| k == "cdylib")))
        .and_then(|t| t["name"].as_str())
        .ok_or_else(|| anyhow!("the crate has no cdylib target (add crate-type = [\"cdylib\"] under [lib])"))?
        .replace('-', "_");
    let built = target_dir.join(WASM_TARGET).join("release").join(format!("{lib}.wasm"));
    let dest = path.join(&manifest.entry);
    std::fs::copy(&built, &dest).with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    WasmRuntime::new(WasmLimits::default())?
        .validate(&std::fs::read(&dest)?)
        .map_err(|e| anyhow!("{} is not a Tessera module component: {e}", dest.display()))?;
    println!("built {} ({} bytes)", dest.display(), std::fs::metadata(&dest)?.len());
    Ok(())
}

/// Refuses a builtin module whose entry names no builtin of this tessera.
fn check_builtin(m: &tessera_core::Manifest) -> anyhow::Result<()> {
    if m.runtime != tessera_core::RuntimeKind::Builtin {
        return Ok(());
    }
    let known = tessera_node::BuiltinRuntime::new().names();
    if !known.iter().any(|n| n == &m.entry) {
        bail!(
            "module.yaml: field `entry`: no builtin named {:?} in this tessera (it has: {})",
            m.entry,
            known.join(", ")
        );
    }
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let packed = pack_dir(path, &Limits::default())?;
    let m = &packed.info.manifest;
    check_builtin(m)?;
    println!("{}@{} is valid ({} {}, entry {})", m.name, m.version, m.kind.as_str(), m.runtime, m.entry);
    for f in &packed.info.files {
        println!("  {:>10}  {}{}", f.size, f.path, if f.executable { " (executable)" } else { "" });
    }
    println!("package: {} bytes, {}", packed.bytes.len(), packed.digest);
    Ok(())
}

fn pack(path: &Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let packed = pack_dir(path, &Limits::default())?;
    let m = &packed.info.manifest;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.{EXTENSION}", m.name, m.version)));
    std::fs::write(&out, &packed.bytes).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", packed.digest);
    eprintln!(
        "packed {}@{} into {} ({} files, {} bytes)",
        m.name,
        m.version,
        out.display(),
        packed.info.files.len(),
        packed.bytes.len()
    );
    Ok(())
}

async fn publish(path: &Path, private: bool, to: &[String], hub: &HubArg) -> anyhow::Result<()> {
    if private {
        let packed = if path.is_dir() {
            pack_dir(path, &Limits::default())?
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let info = inspect(&bytes, &Limits::default())?;
            tessera_package::Packed { digest: info.digest, info, bytes }
        };
        // Nothing goes in unseen: every file of the sealed package is listed.
        eprintln!(
            "sealing {} file(s) ({} leaves out what .tesseraignore names):",
            packed.info.files.len(),
            path.display()
        );
        for f in &packed.info.files {
            eprintln!("  {} ({} bytes)", f.path, f.size);
        }
        let mut recipients = to.iter().map(|k| k.parse()).collect::<Result<Vec<tessera_identity::PublicKey>, _>>()?;
        let client = hub.signed_client()?;
        // Sealed for the publisher too (as gpg's encrypt-to-self), so the publisher can
        // read back what it published; an Ed25519 key only (what sealing takes).
        if let Some(me) = client.signer().map(|k| k.public().clone())
            && me.key_type() == tessera_identity::KeyType::Ed25519
            && !recipients.contains(&me)
        {
            recipients.push(me);
        }
        let sealed = tessera_identity::seal::seal(&packed.bytes, &recipients)?;
        let (rec, created) = client.publish_private(sealed, &packed.info.manifest).await?;
        println!("{}", rec.digest);
        eprintln!(
            "{} {}@{} private, readable by {} key(s)",
            if created { "published" } else { "already published:" },
            rec.name,
            rec.version,
            recipients.len()
        );
        return Ok(());
    }
    let bytes = if path.is_dir() {
        pack_dir(path, &Limits::default())?.bytes
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        inspect(&bytes, &Limits::default()).with_context(|| format!("{} is not a valid package", path.display()))?;
        bytes
    };
    let declared = inspect(&bytes, &Limits::default())?.manifest;
    let client = hub.signed_client()?;
    let (name, version) = (declared.name.to_string(), declared.version.to_string());
    let (rec, created) = client
        .publish_declared(bytes, Some((&name, &version)))
        .await
        .map_err(|e| if e.is_conflict() { anyhow!("{e}\nhint: bump `version` in module.yaml") } else { anyhow!(e) })?;
    println!("{}", rec.digest);
    if created {
        eprintln!("published {}@{} to {}", rec.name, rec.version, client.base());
    } else {
        eprintln!("{}@{} was already published with these exact bytes", rec.name, rec.version);
    }
    Ok(())
}

async fn pull(reference: &str, out: Option<PathBuf>, archive: Option<PathBuf>, hub: &HubArg) -> anyhow::Result<()> {
    let r: PackageRef = reference.parse()?;
    let client = hub.signed_client()?;
    // The record is checked against the reference (name, version, digest) by the client.
    let (rec, bytes) = client.download(&r).await?;
    verify(&bytes, &rec.digest)?;
    let sealed = tessera_identity::seal::is_sealed(&bytes);
    if sealed {
        // Even to keep the ciphertext, the package must be one this key can open.
        let key = client.signer().ok_or_else(|| anyhow!("{} is private: a key is needed", rec.name))?;
        let recipients = tessera_identity::seal::recipients(&bytes)?;
        if !recipients.contains(key.public()) {
            bail!(
                "{}@{} is private and not sealed for your key {}; its publisher can seal a version for it (tessera module publish DIR --private --to {})",
                rec.name,
                rec.version,
                key.public(),
                key.public()
            );
        }
    }
    let plain = if sealed {
        let key = client.signer().expect("checked above");
        bytes::Bytes::from(tessera_identity::seal::unseal(&bytes, key)?)
    } else {
        bytes.clone()
    };
    // The package's own manifest must be the module asked for, whatever the hub says.
    let info = inspect(&plain, &Limits::default())?;
    let m = &info.manifest;
    if m.name.as_str() != rec.name || m.version.to_string() != rec.version {
        bail!(
            "the hub serves {} as {}@{}, but the package's module.yaml says {}@{}: not saved",
            rec.digest,
            rec.name,
            rec.version,
            m.name,
            m.version
        );
    }
    if let Some(a) = archive {
        std::fs::write(&a, &bytes).with_context(|| format!("writing {}", a.display()))?;
        println!("{}", a.display());
        return Ok(());
    }
    // Checked names only: a module path and a semver version never hold `/` or `..`.
    let dest = out.unwrap_or_else(|| PathBuf::from(format!("{}-{}", m.name, m.version)));
    let info = unpack(&plain, &dest, &Limits::default())?;
    println!("{}", dest.display());
    eprintln!("pulled {}@{} ({}, {} files)", rec.name, rec.version, rec.digest, info.files.len());
    Ok(())
}

async fn run_local(
    path: &Path,
    set: &[String],
    input: &[String],
    dataset: &[String],
    out: Option<&Path>,
    timeout: Duration,
    memory: u64,
) -> anyhow::Result<()> {
    let packed = pack_dir(path, &Limits::default())?;
    let mut config = packed.info.manifest.config.clone();
    for s in set {
        apply_override(&mut config, s)?;
    }
    let tmp = tempfile::tempdir()?;
    let hub = Arc::new(HubStore::open(tmp.path().join("hub"))?);
    hub.publish(&packed.bytes, Some(packed.digest), None)?;
    let mut node_cfg = NodeConfig::new("local", tmp.path().join("cache"));
    node_cfg.datasets = crate::name_file_pairs(dataset, "dataset")?.into_iter().collect::<BTreeMap<_, _>>();
    // Every runtime a node offers: WebAssembly, builtin, Python ($TESSERA_PYTHON) and process.
    let limits = WasmLimits { max_memory: memory, max_time: timeout, ..WasmLimits::default() };
    let ports = NodePorts { backend: Backend::in_process(Duration::from_secs(60)), source: Arc::new(LocalHub(hub)) };
    // Your own machine, running your module: contained as far as it can be.
    let node =
        crate::node::build_node(node_cfg, ports, limits, crate::node::NodeOptions { degraded: true, prestart: None })?;
    let mut inputs = Vec::new();
    let declared: Vec<&str> = packed.info.manifest.inputs.iter().map(|p| p.name.as_str()).collect();
    for (name, file) in crate::name_file_pairs(input, "input")? {
        if !declared.contains(&name.as_str()) {
            let has = if declared.is_empty() { "none".to_owned() } else { declared.join(", ") };
            bail!("--input {name}: {} declares no input named {name:?} (its inputs: {has})", packed.info.manifest.name);
        }
        let bytes = std::fs::read(&file).with_context(|| format!("reading input {name} from {}", file.display()))?;
        inputs.push((name, Bytes::from(bytes)));
    }
    let started = std::time::Instant::now();
    let outputs = node.run(&packed.digest, &config, inputs, "local", "run").await?;
    eprintln!(
        "ran {}@{} in {:.3}s",
        packed.info.manifest.name,
        packed.info.manifest.version,
        started.elapsed().as_secs_f64()
    );
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
    }
    for (name, bytes) in outputs {
        let text = std::str::from_utf8(&bytes).ok().filter(|t| t.len() <= 4096 && !t.contains('\0'));
        match text {
            Some(t) => println!("{name}: {t}"),
            None => println!("{name}: {} bytes, {}", bytes.len(), tessera_core::Digest::of(&bytes)),
        }
        if let Some(dir) = out {
            tessera_core::name::check_ident("output name", &name)?;
            std::fs::write(dir.join(&name), &bytes)?;
        }
    }
    Ok(())
}
