//! `tessera model`.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use serde_json::Value;
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
    /// Show a model's metadata and lineage.
    Show {
        /// `name` (latest) or `name@version`.
        model: String,
        #[command(flatten)]
        hub: HubArg,
    },
}

fn split(model: &str) -> (&str, &str) {
    model.split_once('@').unwrap_or((model, "latest"))
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Push { model, file, meta, hub } => {
            let (name, version) =
                model.split_once('@').ok_or_else(|| anyhow!("expected NAME@VERSION, got {model:?}"))?;
            let mut metadata = Value::Object(Default::default());
            for m in &meta {
                apply_override(&mut metadata, m)?;
            }
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let client = hub.signed_client()?;
            if !meta.is_empty() {
                match client.create_model(name, version, &metadata, None).await {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {
                        client.update_model_meta(name, version, &metadata, None).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let (rec, created) = client.push_model(name, version, bytes).await?;
            println!("{}", rec.digest.map(|d| d.to_string()).unwrap_or_default());
            eprintln!("{} {}@{}", if created { "pushed" } else { "already stored:" }, rec.name, rec.version);
            Ok(())
        }
        Command::Pull { model, out, hub } => {
            let (name, version) = split(&model);
            let (rec, bytes) = hub.client()?.pull_model(name, version).await?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.safetensors", rec.name, rec.version)));
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            eprintln!(
                "pulled {}@{} ({} bytes, {})",
                rec.name,
                rec.version,
                bytes.len(),
                rec.digest.map(|d| d.to_string()).unwrap_or_default()
            );
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
        Command::Show { model, hub } => {
            let (name, version) = split(&model);
            let rec = hub.client()?.model(name, version).await?;
            print_model(&rec);
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
