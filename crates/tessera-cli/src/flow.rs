//! `tessera flow`: dataflow files checked, drawn and run (their operations on the nodes
//! that offer them, over NATS).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use tessera_dataflow::DataFlow;
use tessera_dataflow::graph::{Format, render};

#[derive(Subcommand)]
pub enum Command {
    /// Check a flow file: names, types of wired values, conditions, validation
    /// operations, inputs nothing gives, operations that can never run, and cycles no
    /// condition guards; errors name the line.
    Check {
        /// The flow file (YAML, or Python declaring a `tessera.dataflow.DataFlow`).
        file: PathBuf,
    },
    /// Run one context of a flow: its operations on the nodes that offer them
    /// (`tessera node run --ops ...`); prints the outputs as JSON.
    Run {
        /// The flow file (YAML, or Python declaring a `tessera.dataflow.DataFlow`).
        file: PathBuf,
        /// A value given to the context, `DEFINITION=VALUE` (repeatable); the text as it is
        /// for a `str` definition, else read as JSON.
        #[arg(long = "input", value_name = "DEFINITION=VALUE")]
        input: Vec<String>,
        /// The context's id, naming it in logs (default: a new one); each run is new even
        /// with an id used before. With `--records`, record k's context is `ID-k`.
        #[arg(long)]
        context: Option<String>,
        /// Input records, one context each (DFFML's one context per record): a JSON Lines
        /// file, each line an object `{"DEFINITION": value, ...}`. The contexts run at most
        /// 16 at once; one JSON object per record is printed, in the records' order.
        #[arg(long, conflicts_with = "input", value_name = "FILE")]
        records: Option<PathBuf>,
        /// Run operations marked `cache: true` even when their module, function and inputs
        /// were seen before (their results are still kept).
        #[arg(long)]
        no_cache: bool,
        /// Time one operation may take, in seconds.
        #[arg(long, default_value = "300", value_parser = tessera_core::time::parse_seconds)]
        timeout: std::time::Duration,
        #[command(flatten)]
        nats: crate::NatsArg,
        #[command(flatten)]
        hub: crate::HubArg,
    },
    /// Print a flow as a graph: Mermaid (default) or Graphviz text.
    Graph {
        /// The flow file (YAML, or Python declaring a `tessera.dataflow.DataFlow`).
        file: PathBuf,
        /// The text format.
        #[arg(long, value_enum, default_value = "mermaid")]
        format: GraphFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run { file, input, context, records, no_cache, timeout, nats, hub } => {
            let flow = read(&file)?;
            let backend = nats.backend().await?;
            let contexts = match &records {
                Some(path) => read_records(path)?,
                None => vec![parse_inputs(&flow, &input, &backend).await?],
            };
            let id = context.unwrap_or_else(tessera_coordinator::new_session_id);
            let client = hub.signed_client()?;
            let key = crate::key::load(&hub.key)?;
            let c =
                tessera_coordinator::Coordinator::new(backend, std::sync::Arc::new(client), None).with_identity(key);
            if records.is_none() {
                let inputs = contexts.into_iter().next().unwrap_or_default();
                let result = c.run_flow(&id, &flow, inputs, timeout, !no_cache).await?;
                println!("{}", serde_json::to_string_pretty(&summary(&id, &result))?);
                return Ok(());
            }
            // One context per record, at most 16 at once, printed in the records' order.
            let mut runs = futures::stream::iter(contexts.into_iter().enumerate())
                .map(|(k, inputs)| {
                    let (c, flow, id) = (&c, &flow, format!("{id}-{}", k + 1));
                    async move {
                        let r = c.run_flow(&id, flow, inputs, timeout, !no_cache).await;
                        (id, r)
                    }
                })
                .buffered(16);
            let mut failed = 0;
            while let Some((id, r)) = runs.next().await {
                let line = match r {
                    Ok(result) => summary(&id, &result),
                    Err(e) => {
                        failed += 1;
                        serde_json::json!({"context": id, "error": e.to_string()})
                    }
                };
                println!("{}", serde_json::to_string(&line)?);
            }
            if failed > 0 {
                return Err(anyhow!("{failed} context(s) failed"));
            }
            Ok(())
        }
        Command::Check { file } => {
            let flow = read(&file)?;
            println!(
                "{}: {} definitions, {} operations; inputs: {}",
                file.display(),
                flow.definitions.len(),
                flow.operations.len(),
                if flow.inputs.is_empty() { "none".to_owned() } else { flow.inputs.join(", ") }
            );
            Ok(())
        }
        Command::Graph { file, format } => {
            let flow = read(&file)?;
            let format = match format {
                GraphFormat::Mermaid => Format::Mermaid,
                GraphFormat::Dot => Format::Dot,
            };
            print!("{}", render(&flow, format));
            Ok(())
        }
    }
}

/// What a context gave, as printed.
fn summary(id: &str, result: &tessera_dataflow::ContextResult) -> serde_json::Value {
    serde_json::json!({
        "context": id,
        "get_single": result.single,
        "get_multi": result.multi,
        "runs": result.runs,
        "cached": result.cached,
    })
}

/// `--input DEFINITION=VALUE`s: the text as it is for a `str` definition; for a `tensor` or
/// `blob` definition, `@FILE` puts the file in the blob store and gives its digest; else
/// read as JSON (text that is not JSON stays text).
async fn parse_inputs(
    flow: &DataFlow,
    input: &[String],
    backend: &tessera_ports::Backend,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    use tessera_dataflow::Primitive;
    let mut inputs = Vec::new();
    for item in input {
        let (d, v) = item.split_once('=').ok_or_else(|| anyhow!("--input {item:?}: expected DEFINITION=VALUE"))?;
        let primitive = flow.definitions.get(d).map(|x| x.primitive);
        if matches!(primitive, Some(Primitive::Tensor | Primitive::Blob))
            && let Some(path) = v.strip_prefix('@')
        {
            let bytes = std::fs::read(path).map_err(|e| anyhow!("--input {d}=@{path}: {e}"))?;
            let digest = backend.blobs.put(bytes.into()).await.map_err(|e| anyhow!("--input {d}=@{path}: {e}"))?;
            inputs.push((d.to_owned(), serde_json::Value::String(digest.to_string())));
            continue;
        }
        let text = primitive == Some(Primitive::Str);
        let value = if text {
            serde_json::Value::String(v.to_owned())
        } else {
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()))
        };
        inputs.push((d.to_owned(), value));
    }
    Ok(inputs)
}

/// Largest records file read, in bytes.
const MAX_RECORDS_BYTES: u64 = 64 * 1024 * 1024;
/// Most records in one run.
const MAX_RECORDS: usize = 100_000;

/// A JSON Lines file of records (blank lines skipped); errors name the line.
fn read_records(path: &Path) -> anyhow::Result<Vec<Vec<(String, serde_json::Value)>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_RECORDS_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_RECORDS_BYTES {
        return Err(anyhow!("{}: a records file is at most {MAX_RECORDS_BYTES} bytes", path.display()));
    }
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if out.len() == MAX_RECORDS {
            return Err(anyhow!("{}: at most {MAX_RECORDS} records", path.display()));
        }
        let record: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .map_err(|e| anyhow!("{} line {}: a record is a JSON object: {e}", path.display(), n + 1))?;
        out.push(record.into_iter().collect());
    }
    if out.is_empty() {
        return Err(anyhow!("{}: no records", path.display()));
    }
    Ok(out)
}

/// Reads a flow file (YAML, or Python declaring a `tessera.dataflow.DataFlow`) and its
/// subflows (each at most [`tessera_dataflow::spec::MAX_FLOW_BYTES`]); errors name the
/// file and the line.
fn read(file: &Path) -> anyhow::Result<DataFlow> {
    if file.extension().is_some_and(|e| e == "py") {
        let text = crate::swarm::python_spec(file, "tessera.dataflow")?;
        let base = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return DataFlow::from_yaml_in(&text, base).map_err(|e| anyhow!("{e}"));
    }
    DataFlow::from_file(file).map_err(|e| anyhow!("{e}"))
}
