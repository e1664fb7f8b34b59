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
        /// The model's card: a README.md, its YAML front matter giving license, tags,
        /// datasets, metrics, base_model, library_name, intended_use.
        #[arg(long, value_name = "FILE")]
        card: Option<PathBuf>,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show a model's card.
    Card {
        /// `name` (latest) or `name@version`.
        model: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Show a model's lineage as a tree: the run that made it (modules, data sets, nodes),
    /// the model it was built from, and the models built from it, and from those.
    Lineage {
        /// `name` (latest) or `name@version`.
        model: String,
        /// How many generations of models built from it to follow.
        #[arg(long, default_value_t = 3)]
        depth: u32,
        /// Print JSON (this model's lineage only).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Download a model file, verified by digest.
    Pull {
        /// `name` (latest) or `name@version`.
        model: String,
        /// Where to write it (default: <name>-<version>.<format>, the format from the
        /// model's `format` metadata when it is a known one, such as safetensors or onnx;
        /// `bin` otherwise).
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
        /// Text in the name or description.
        #[arg(long, short)]
        query: Option<String>,
        /// Tag (metadata `tags` or card).
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        search: crate::SearchArgs,
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
        #[arg(long = "meta", value_name = "KEY=VALUE", required_unless_present = "card")]
        meta: Vec<String>,
        /// Replace the metadata instead of merging into it.
        #[arg(long)]
        replace: bool,
        /// A new card (a README.md with YAML front matter).
        #[arg(long, value_name = "FILE")]
        card: Option<PathBuf>,
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

/// Model formats whose name a pulled file takes as its extension: the common ones of
/// PyTorch, TensorFlow, ONNX, llama.cpp, scikit-learn and NumPy.
const FORMATS: [&str; 18] = [
    "safetensors",
    "onnx",
    "pt",
    "pth",
    "bin",
    "ckpt",
    "gguf",
    "ggml",
    "h5",
    "keras",
    "pb",
    "tflite",
    "pkl",
    "joblib",
    "npz",
    "npy",
    "msgpack",
    "json",
];

/// The extension of a pulled model's default file name: its `format` metadata (as
/// `model push --meta format=onnx` sets it), lowercased, when it is one of [`FORMATS`];
/// `bin` otherwise (none, or one a file should not be named after, such as `exe`).
fn file_extension(metadata: &Value) -> String {
    let format = metadata.get("format").and_then(Value::as_str).map(str::to_ascii_lowercase);
    match format {
        Some(f) if FORMATS.contains(&f.as_str()) => f,
        _ => "bin".to_owned(),
    }
}

/// `name@version`, exact.
fn exact(model: &str) -> anyhow::Result<(&str, &str)> {
    model.split_once('@').ok_or_else(|| anyhow!("expected NAME@VERSION, got {model:?}"))
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Push { model, file, meta, card, hub } => {
            let (name, version) = exact(&model)?;
            let mut metadata = Value::Object(Default::default());
            for m in &meta {
                apply_override(&mut metadata, m)?;
            }
            anyhow::ensure!(file.is_file(), "{} is not a file", file.display());
            let client = hub.signed_client()?;
            // The binary and its metadata go in one request: a refused push changes nothing.
            let card = read_card(card.as_deref())?;
            let upload = (!meta.is_empty() || card.is_some()).then_some(UploadMeta { metadata, lineage: None, card });
            let size = std::fs::metadata(&file)?.len();
            let (rec, created) = if size >= tessera_client::RESUMABLE_FROM {
                // In pieces: an interrupted push, run again, continues where it stopped.
                use std::sync::atomic::{AtomicU64, Ordering};
                // The last MiB count reported (u64::MAX: none yet), so a piece tried again,
                // or a last piece of less than a MiB, is not reported twice.
                let last = AtomicU64::new(u64::MAX);
                let progress = |have: u64, total: u64| {
                    let before = last.swap(have >> 20, Ordering::Relaxed);
                    if before == u64::MAX && have > 0 && have < total {
                        eprintln!("resuming at {} of {} MiB (the hub has the rest)", have >> 20, total >> 20);
                    } else if before != have >> 20 {
                        eprintln!("uploaded {} of {} MiB", have >> 20, total >> 20);
                    }
                };
                let pushed = client
                    .push_model_resumable(name, version, &file, upload.as_ref(), tessera_client::PIECE, &progress)
                    .await?;
                if last.load(Ordering::Relaxed) == u64::MAX {
                    eprintln!("the hub has these bytes already ({} MiB): nothing was sent", size >> 20);
                }
                pushed
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
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!("{checked_name}-{checked_version}.{}", file_extension(&rec.metadata)))
            });
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
        Command::Meta { model, meta, replace, card, hub } => {
            let (name, version) = exact(&model)?;
            let client = hub.signed_client()?;
            let mut metadata =
                if replace { Value::Object(Default::default()) } else { client.model(name, version).await?.metadata };
            for m in &meta {
                apply_override(&mut metadata, m)?;
            }
            let card = read_card(card.as_deref())?;
            let rec = client.update_model_meta_with_card(name, version, &metadata, None, card.as_deref()).await?;
            print_model(&rec);
            Ok(())
        }
        Command::Delete { model, hub } => {
            let (name, version) = exact(&model)?;
            let rec = hub.signed_client()?.delete_model(name, version).await?;
            eprintln!("deleted {}@{} (the version stays reserved for the same bytes)", rec.name, rec.version);
            Ok(())
        }
        Command::Card { model, json, hub } => {
            let (name, version) = split(&model);
            print_card(&hub.client()?.model_card(name, version).await?, json)
        }
        Command::Lineage { model, depth, json, hub } => {
            let (name, version) = split(&model);
            let client = hub.client()?;
            let l = client.model_lineage(name, version).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
                return Ok(());
            }
            print!("{}", lineage_tree(&client, &l, depth).await?);
            Ok(())
        }
        Command::List { prefix, query, tag, search, json, hub } => {
            let filters = tessera_client::ModelSearch {
                prefix,
                q: query,
                tag,
                license: search.license,
                library: search.library,
                signer: search.signer,
                offset: search.offset,
                limit: search.limit,
            };
            let list = hub.client()?.search_models(&filters).await?;
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

/// Reads a card file (a README.md), refusing one over the hub's limit before sending it.
fn read_card(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(p) = path else { return Ok(None) };
    let text = std::fs::read_to_string(p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    tessera_core::card::Card::parse(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    Ok(Some(text))
}

/// Prints a card: its facts, then its text.
pub fn print_card(card: &tessera_core::card::Card, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(card)?);
        return Ok(());
    }
    let facts = [
        ("license", card.license.clone()),
        ("tags", (!card.tags.is_empty()).then(|| card.tags.join(", "))),
        ("datasets", (!card.datasets.is_empty()).then(|| card.datasets.join(", "))),
        ("metrics", card.metrics.as_ref().map(ToString::to_string)),
        ("base model", card.base_model.clone()),
        ("library", card.library_name.clone()),
        ("intended use", card.intended_use.clone()),
    ];
    for (k, v) in facts {
        if let Some(v) = v {
            println!("{k:<13} {v}");
        }
    }
    println!();
    println!("{}", card.text);
    Ok(())
}

/// A model's lineage as a tree: what made it, what it came from, and the models built
/// from it (followed `depth` generations down).
async fn lineage_tree(
    client: &tessera_client::HubClient,
    l: &tessera_core::registry::ModelLineage,
    depth: u32,
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let digest = l.digest.map(|d| d.to_string()).unwrap_or_else(|| "(no binary)".into());
    writeln!(out, "{}  {digest}", l.model)?;
    let mut items: Vec<(String, Vec<String>)> = Vec::new();
    match &l.made_by {
        Some(run) => {
            let mut children = vec![format!("strategy: {}, {} rounds", run.strategy, run.rounds)];
            children
                .extend(run.modules.iter().map(|m| format!("module: {} ({}) {}", m.module, m.role, m.digest.short())));
            if !run.datasets.is_empty() {
                children.push(format!("data: {}", run.datasets.join(", ")));
            }
            if !run.nodes.is_empty() {
                children.push(format!("nodes: {}", run.nodes.join(", ")));
            }
            items.push((format!("made by run {}", run.session), children));
        }
        None => items.push(("made by: no recorded run".into(), Vec::new())),
    }
    if let Some(b) = &l.base_model {
        items.push((format!("built from {b}"), Vec::new()));
    }
    let mut derived = Vec::new();
    if depth > 0 {
        let mut queue: Vec<(String, u32)> = l.derived.iter().rev().map(|d| (d.clone(), 1)).collect();
        let mut seen = std::collections::BTreeSet::new();
        while let Some((m, level)) = queue.pop() {
            if !seen.insert(m.clone()) {
                continue;
            }
            derived.push(format!("{}{m}", "  ".repeat(level as usize - 1)));
            if level < depth {
                let (n, v) = m.split_once('@').unwrap_or((&m, "latest"));
                if let Ok(next) = client.model_lineage(n, v).await {
                    queue.extend(next.derived.into_iter().rev().map(|d| (d, level + 1)));
                }
            }
        }
    }
    items
        .push((if derived.is_empty() { "built from it: nothing yet".into() } else { "built from it".into() }, derived));
    let n = items.len();
    for (i, (head, children)) in items.into_iter().enumerate() {
        let (branch, pad) = if i + 1 == n { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        writeln!(out, "{branch}{head}")?;
        let m = children.len();
        for (j, c) in children.into_iter().enumerate() {
            let b = if j + 1 == m { "└─ " } else { "├─ " };
            writeln!(out, "{pad}{b}{c}")?;
        }
    }
    Ok(out)
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
    println!("  downloads: {}", m.downloads);
    if let Some(c) = &m.card {
        println!("  card:     {} (tessera model card {}@{})", c.description, m.name, m.version);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pulled model's default extension is its format when that is a known one, and
    /// `bin` for anything else, paths, dots and executables included.
    #[test]
    fn a_pulled_model_is_named_after_its_format() {
        let ext = |v: Value| file_extension(&v);
        assert_eq!(ext(serde_json::json!({"format": "safetensors"})), "safetensors");
        assert_eq!(ext(serde_json::json!({"format": "ONNX"})), "onnx");
        assert_eq!(ext(serde_json::json!({"format": "gguf", "library": "x"})), "gguf");
        for bad in [
            serde_json::json!({}),
            serde_json::json!(null),
            serde_json::json!({"format": ""}),
            serde_json::json!({"format": "../../etc/passwd"}),
            serde_json::json!({"format": "tar.gz"}),
            serde_json::json!({"format": "a/b"}),
            serde_json::json!({"format": "x".repeat(17)}),
            serde_json::json!({"format": "exe"}),
            serde_json::json!({"format": "safetensors "}),
            serde_json::json!({"format": "é"}),
            serde_json::json!({"format": 7}),
        ] {
            assert_eq!(ext(bad.clone()), "bin", "{bad}");
        }
    }
}
