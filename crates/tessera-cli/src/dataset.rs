//! `tessera dataset`.

use std::path::PathBuf;

use clap::Subcommand;
use tessera_cluster::digits;

#[derive(Subcommand)]
pub enum Command {
    /// Write the digits data set as node shards and a held-out test split (safetensors,
    /// `x` [n, 64] scaled to [0, 1], `y` [n]): DIR/node-<k>/digits.safetensors and
    /// DIR/coordinator/digits-test.safetensors.
    Digits {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of training shards (one per node).
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// Fraction held out for testing.
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Shuffle seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Digits { out, shards, test_fraction, seed } => {
            anyhow::ensure!((1..=1000).contains(&shards), "--shards must be between 1 and 1000");
            anyhow::ensure!((0.0..1.0).contains(&test_fraction), "--test-fraction must be in [0, 1)");
            let p = digits::prepare(&out, shards, test_fraction, seed)?;
            for s in &p.shards {
                println!("{}", s.display());
            }
            println!("{}", p.test.display());
            eprintln!("{} training rows in {} shards, {} test rows", p.train_rows, p.shards.len(), p.test_rows);
            Ok(())
        }
    }
}
