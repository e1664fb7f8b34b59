//! `tessera model`.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::Value;
use tessera_client::{ModelSource, UploadMeta};
use tessera_core::config::apply_override;
use tessera_core::registry::ModelRecord;

use crate::HubArg;

#[derive(Subcommand)]
pub enum Command {
    /// Upload a model file as NAME@VERSION (binaries are immutable; metadata can change).
    Push {
        /// `name@version`, e.g. digits.softmax@0.1.0.
        model: String,
        /// The model file (any format; safetensors is what Tessera's workers use).
        file: PathBuf,
        /// Metadata, `key=value` (repeatable), e.g. --meta library=tessera.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Download a model file, verified by digest.
    Pull {
        /// `name` (latest) or `name@version`.
        model: String,
        /// Where to write it (default: <name>-<version>.safetensors).
        #[arg(short, long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// The tensors of a model file (names, dtypes, shapes), read by the hub from the file's
    /// header without downloading it.
    Tensors {
        /// `name` (latest) or `name@version`.
        model: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// List models.
    List {
        /// Name prefix (by segments).
        #[arg(long)]
        prefix: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show a model's metadata, lineage and who signed what.
    Show {
        /// `name` (latest) or `name@version`.
        model: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Set a model version's metadata (`--meta key=value`, merged over what it has; with
    /// --replace, instead of it).
    Meta {
        /// `name@version`.
        model: String,
        /// Metadata, `key=value` (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE", required = true)]
        meta: Vec<String>,
        /// Replace the metadata instead of merging into it.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Delete a model version (its number stays reserved: only the same bytes can be pushed
    /// under it again).
    Delete {
        /// `name@version`.
        model: String,
        #[command(flatten)]
        hub: HubArg,
    },
}

fn split(model: &str) -> (&str, &str) {
    model.split_once('@').unwrap_or((model, "latest"))
}

/// `name@version`, exact.
fn exact(model: &str) -> anyhow::Result<(&str, &str)> {
    model.split_once('@').ok_or_else(|| anyhow!("expected NAME@VERSION, got {model:?}"))
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Push { model, file, meta, hub } => {
            let (name, version) = exact(&model)?;
            let mut metadata = Value::Object(Default::default());
            for m in &meta {
                apply_override(&mut metadata, m)?;
            }
            anyhow::ensure!(file.is_file(), "{} is not a file", file.display());
            let client = hub.signed_client()?;
            // The binary and its metadata go in one request: a refused push changes nothing.
            let upload = (!meta.is_empty()).then_some(UploadMeta { metadata, lineage: None });
            let size = std::fs::metadata(&file)?.len();
            let (rec, created) = if size >= tessera_client::RESUMABLE_FROM {
                // In pieces: an interrupted push, run again, continues where it stopped.
                let progress = |have: u64, total: u64| {
                    eprintln!("uploaded {} of {} MiB", have >> 20, total >> 20);
                };
                client
                    .push_model_resumable(name, version, &file, upload.as_ref(), tessera_client::PIECE, &progress)
                    .await?
            } else {
                client.push_model_from(name, version, ModelSource::File(file.clone()), upload.as_ref()).await?
            };
            println!("{}", rec.digest.map(|d| d.to_string()).unwrap_or_default());
            let what = match (created, upload.is_some()) {
                (true, _) => "pushed",
                (false, true) => "already stored (metadata set):",
                (false, false) => "already stored:",
            };
            eprintln!("{what} {}@{}", rec.name, rec.version);
            Ok(())
        }
        Command::Tensors { model, json, hub } => {
            let (name, version) = split(&model);
            let t = hub.client()?.model_tensors(name, version).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
                return Ok(());
            }
            println!("{} ({} bytes, {} tensors)", t.digest, t.size, t.tensors.len());
            for (k, v) in t.metadata.iter().flatten() {
                println!("  {k}: {v}");
            }
            for e in &t.tensors {
                let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
                println!("{:<48} {:<5} [{}]", e.name, e.dtype, shape.join(", "));
            }
            Ok(())
        }
        Command::Pull { model, out, hub } => {
            let (name, version) = split(&model);
            let client = hub.signed_client()?;
            let rec = client.model(name, version).await?;
            // The record's name and version become a file name only once they parse as a
            // module path and a version (neither holds `/` or `..`).
            let checked_name: tessera_core::ModulePath =
                rec.name.parse().map_err(|e| anyhow!("the hub's record names the model {:?}: {e}", rec.name))?;
            let checked_version = tessera_core::version::Version::parse(&rec.version)
                .map_err(|e| anyhow!("the hub's record has version {:?}: {e}", rec.version))?;
            anyhow::ensure!(
                checked_name.as_str() == name,
                "asked for model {name}, the hub answered with {checked_name}"
            );
            if let Ok(asked) = tessera_core::version::Version::parse(version) {
                anyhow::ensure!(
                    tessera_core::version::same_version(&asked, &checked_version),
                    "asked for {name}@{asked}, the hub answered with version {checked_version}"
                );
            }
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{checked_name}-{checked_version}.safetensors")));
            // The download is of the record checked here, not of another answer.
            let rec = client.pull_model_record(rec, &out).await?;
            println!("{}", out.display());
            eprintln!(
                "pulled {}@{} ({} bytes, {})",
                rec.name,
                rec.version,
                rec.size.unwrap_or(0),
                rec.digest.map(|d| d.to_string()).unwrap_or_default()
            );
            Ok(())
        }
        Command::Meta { model, meta, replace, hub } => {
            let (name, version) = exact(&model)?;
            let client = hub.signed_client()?;
            let mut metadata =
                if replace { Value::Object(Default::default()) } else { client.model(name, version).await?.metadata };
            for m in &meta {
                apply_override(&mut metadata, m)?;
            }
            let rec = client.update_model_meta(name, version, &metadata, None).await?;
            print_model(&rec);
            Ok(())
        }
        Command::Delete { model, hub } => {
            let (name, version) = exact(&model)?;
            let rec = hub.signed_client()?.delete_model(name, version).await?;
            eprintln!("deleted {}@{} (the version stays reserved for the same bytes)", rec.name, rec.version);
            Ok(())
        }
        Command::List { prefix, json, hub } => {
            let list = hub.client()?.models(prefix.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no models");
            } else {
                for m in &list {
                    let d = m.digest.map(|d| d.short()).unwrap_or_else(|| "(no binary)".into());
                    println!("{:<32} {:<10} {:<18} {}", m.name, m.version, d, m.created_at);
                }
            }
            Ok(())
        }
        Command::Show { model, json, hub } => {
            let (name, version) = split(&model);
            let rec = hub.client()?.model(name, version).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                print_model(&rec);
            }
            Ok(())
        }
    }
}

pub fn print_model(m: &ModelRecord) {
    println!("{}@{}", m.name, m.version);
    if let Some(d) = &m.digest {
        println!("  digest:   {d}");
    }
    if let Some(s) = m.size {
        println!("  size:     {s} bytes");
    }
    println!("  created:  {}", m.created_at);
    println!("  binary signed by:   {}", m.signer.as_deref().unwrap_or("nobody (unsigned upload)"));
    if let Some(k) = &m.meta_signer {
        println!("  metadata signed by: {k}");
    }
    println!("  metadata: {}", m.metadata);
    if let Some(l) = &m.lineage {
        println!(
            "  lineage:  session {}, {} rounds of {}, nodes {}",
            l.session,
            l.rounds,
            l.strategy,
            l.nodes.join(", ")
        );
        for u in &l.modules {
            println!("            {} {} ({})", u.role, u.module, u.digest);
        }
    }
}
