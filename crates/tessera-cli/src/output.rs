//! Machine-readable output: every command that lists or shows something takes `--json`
//! and prints one JSON document (or, for `swarm logs`, one JSON object per line). The
//! fields each command prints are documented in `docs/json.md`; they are stable: new
//! fields may be added, documented ones are not renamed or removed.

use serde::Serialize;

/// `--json`, for commands that list or show.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct JsonArg {
    /// Print JSON (its fields: docs/json.md).
    #[arg(long)]
    pub json: bool,
}

/// Prints `value` as indented JSON on standard output.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON when `json` is set, else as `text` writes it.
pub fn show<T: Serialize + ?Sized>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if json { print_json(value) } else { text(value) }
}
