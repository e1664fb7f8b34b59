//! `tessera key`: the user's key pairs.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use tessera_identity::keystore::{KeyInfo, Keystore, KeystoreError, export_secret, import_secret};
use tessera_identity::{KeyPair, KeyType};

#[derive(Subcommand)]
pub enum Command {
    /// Make a new key pair (Ed25519 unless --type secp256k1).
    New {
        /// Its name.
        #[arg(default_value = "default")]
        name: String,
        /// Key type.
        #[arg(long = "type", value_enum, default_value = "ed25519")]
        ty: TypeArg,
        /// Encrypt the secret with a passphrase (TESSERA_PASSPHRASE, or asked for).
        #[arg(long)]
        encrypt: bool,
    },
    /// List the keys.
    List {
        #[command(flatten)]
        out: crate::output::JsonArg,
    },
    /// Show a key's public key (and Ethereum-style address for secp256k1).
    Show {
        /// Its name.
        #[arg(default_value = "default")]
        name: String,
        #[command(flatten)]
        out: crate::output::JsonArg,
    },
    /// Print a key: its public key, or with --secret the secret to import elsewhere.
    Export {
        /// Its name.
        #[arg(default_value = "default")]
        name: String,
        /// Print the secret (keep it private).
        #[arg(long)]
        secret: bool,
    },
    /// Import a secret exported with `tessera key export --secret` (read from FILE or stdin).
    Import {
        /// The name to store it under.
        name: String,
        /// A file holding the secret (default: standard input).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Encrypt it with a passphrase.
        #[arg(long)]
        encrypt: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TypeArg {
    /// Ed25519.
    Ed25519,
    /// ECDSA secp256k1 (Ethereum-style).
    Secp256k1,
}

impl From<TypeArg> for KeyType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::Ed25519 => KeyType::Ed25519,
            TypeArg::Secp256k1 => KeyType::Secp256k1,
        }
    }
}

/// The user's keystore: `$TESSERA_HOME/keys`.
pub fn keystore() -> anyhow::Result<Keystore> {
    Ok(Keystore::open(crate::tessera_home().join("keys"))?)
}

fn passphrase(prompt: &str) -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("TESSERA_PASSPHRASE") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(prompt).context("reading the passphrase");
    }
    bail!("a passphrase is needed: set TESSERA_PASSPHRASE")
}

/// Loads a key by name; the `default` key is made on first use.
pub fn load(name: &str) -> anyhow::Result<Arc<KeyPair>> {
    let ks = keystore()?;
    match ks.info(name) {
        Err(KeystoreError::NotFound(_)) if name == "default" => {
            let info = ks.create(name, KeyType::Ed25519, None)?;
            eprintln!(
                "made your key \"default\" ({}) in {}; `tessera key new NAME --encrypt` makes a passphrase-protected one",
                info.public,
                ks.dir().display()
            );
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let pw = if ks.is_encrypted(name)? { Some(passphrase(&format!("passphrase for key {name}: "))?) } else { None };
    Ok(Arc::new(ks.load(name, pw.as_deref())?))
}

/// A key as `--json` prints it.
fn key_json(info: &KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "public": info.public.to_string(),
        "type": info.public.key_type().to_string(),
        "encrypted": info.encrypted,
        "address": info.public.eth_address(),
    })
}

fn print(info: &KeyInfo) {
    println!("{}", info.public);
    eprintln!("key {}: {}{}", info.name, info.public.key_type(), if info.encrypted { ", encrypted" } else { "" });
    if let Some(addr) = info.public.eth_address() {
        eprintln!("address: {addr}");
    }
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let ks = keystore()?;
    match cmd {
        Command::New { name, ty, encrypt } => {
            let pw = if encrypt { Some(passphrase("new passphrase: ")?) } else { None };
            let info = ks.create(&name, ty.into(), pw.as_deref())?;
            print(&info);
            Ok(())
        }
        Command::List { out } => {
            let keys = ks.list()?;
            if out.json {
                return crate::output::print_json(&keys.iter().map(key_json).collect::<Vec<_>>());
            }
            if keys.is_empty() {
                eprintln!("no keys in {} (tessera key new makes one)", ks.dir().display());
            }
            for k in keys {
                println!("{:<16} {}{}", k.name, k.public, if k.encrypted { "  (encrypted)" } else { "" });
            }
            Ok(())
        }
        Command::Show { name, out } => {
            let info = ks.info(&name)?;
            if out.json {
                return crate::output::print_json(&key_json(&info));
            }
            print(&info);
            Ok(())
        }
        Command::Export { name, secret } => {
            if !secret {
                println!("{}", ks.info(&name)?.public);
                return Ok(());
            }
            let pair = load(&name)?;
            println!("{}", export_secret(&pair).as_str());
            Ok(())
        }
        Command::Import { name, from, encrypt } => {
            let mut text = String::new();
            match from {
                Some(p) => text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                None => {
                    std::io::stdin().read_to_string(&mut text)?;
                }
            }
            let pair = import_secret(&text).map_err(|e| anyhow!("not an exported secret: {e}"))?;
            let pw = if encrypt { Some(passphrase("new passphrase: ")?) } else { None };
            let info = ks.store(&name, &pair, pw.as_deref())?;
            print(&info);
            Ok(())
        }
    }
}
