//! `tessera flow`: dataflow files checked, drawn and run (their operations on the nodes
//! that offer them, over NATS).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::{Subcommand, ValueEnum};
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
        /// with an id used before.
        #[arg(long)]
        context: Option<String>,
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
        Command::Run { file, input, context, no_cache, timeout, nats, hub } => {
            let flow = read(&file)?;
            let mut inputs = Vec::new();
            for item in &input {
                let (d, v) =
                    item.split_once('=').ok_or_else(|| anyhow!("--input {item:?}: expected DEFINITION=VALUE"))?;
                // A string definition takes the text as it is; others read it as JSON.
                let text = flow.definitions.get(d).is_some_and(|x| x.primitive == tessera_dataflow::Primitive::Str);
                let value = if text {
                    serde_json::Value::String(v.to_owned())
                } else {
                    serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()))
                };
                inputs.push((d.to_owned(), value));
            }
            let id = context.unwrap_or_else(tessera_coordinator::new_session_id);
            let backend = nats.backend().await?;
            let client = hub.signed_client()?;
            let key = crate::key::load(&hub.key)?;
            let c =
                tessera_coordinator::Coordinator::new(backend, std::sync::Arc::new(client), None).with_identity(key);
            let result = c.run_flow(&id, &flow, inputs, timeout, !no_cache).await?;
            let out = serde_json::json!({
                "context": id,
                "get_single": result.single,
                "get_multi": result.multi,
                "runs": result.runs,
                "cached": result.cached,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
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
