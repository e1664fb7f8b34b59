//! What a node lets run, for whom, on which data.
//!
//! ```yaml
//! require_signed_packages: true
//! trusted_publishers:            # namespace prefix -> keys whose packages may run
//!   fl: [ed25519:…]
//! require_signed_tasks: true
//! grants:                        # who may compute on which datasets, with which modules
//!   - to: ed25519:…
//!     modules: [fl.softmax]      # module-path prefixes ("" or "*": any)
//!     datasets: [digits]
//!     queues: [jobs]             # free-named gateway queues, by prefix (an actor's
//!                                # <actor>.in/.out need a grant for its module)
//!     max_priority: 0            # highest launch priority (default 0)
//!     max_replicas: 4            # most replicas per actor (default 4)
//!     expires: 2027-01-01T00:00:00Z
//! quotas:
//!   "ed25519:…": {compute_seconds: 3600, tasks: 10000}
//! ```
//!
//! A node with no policy runs anything (the embedded default); `tessera node run` asks for
//! a policy or an explicit `--open`.

use std::collections::BTreeMap;

use serde::Deserialize;
use tessera_core::registry::PackageRecord;
use tessera_core::time::parse_rfc3339;
use tessera_core::{Digest, ModulePath};
use tessera_identity::{PackageSignature, PublicKey, Signature};

/// A node's policy.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePolicy {
    /// Run only packages signed by a trusted publisher of their namespace.
    #[serde(default)]
    pub require_signed_packages: bool,
    /// Namespace prefix -> keys whose signed packages may run (`""` or `"*"`: any namespace).
    #[serde(default)]
    pub trusted_publishers: BTreeMap<String, Vec<PublicKey>>,
    /// Run only tasks signed by a key with a grant.
    #[serde(default)]
    pub require_signed_tasks: bool,
    /// Who may compute on which datasets.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Per-account limits (key text -> quota).
    #[serde(default)]
    pub quotas: BTreeMap<String, Quota>,
    /// How old a signed task may be when it arrives, in seconds (tasks can wait in a queue).
    #[serde(default = "default_window")]
    pub task_window_secs: u64,
    /// How module processes are contained: the protections the node requires, which
    /// modules may use the network, process and memory limits.
    #[serde(default)]
    pub sandbox: tessera_process::SandboxPolicy,
}

fn default_window() -> u64 {
    3600
}

fn default_max_replicas() -> usize {
    4
}

/// The right to run modules on datasets of this node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Who.
    pub to: PublicKey,
    /// Module-path prefixes (`""` or `"*"`: any module).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Datasets the tasks may read (nothing else is visible to them).
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Queues outside any actor (`jobs`, `jobs.urgent`) the key may use through the
    /// gateway, by prefix (`""` or `"*"`: any). An actor's `<actor>.in` and `<actor>.out`
    /// are covered by a grant for its module instead.
    #[serde(default)]
    pub queues: Vec<String>,
    /// The highest priority the key may launch actors with (default 0: it never evicts
    /// actors that matter more than the default).
    #[serde(default)]
    pub max_priority: i32,
    /// The most replicas one of its actors may have (default 4).
    #[serde(default = "default_max_replicas")]
    pub max_replicas: usize,
    /// When the grant ends (`YYYY-MM-DDTHH:MM:SSZ`), if ever.
    #[serde(default)]
    pub expires: Option<String>,
}

/// Limits for one account.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Compute seconds in all.
    #[serde(default)]
    pub compute_seconds: Option<f64>,
    /// Tasks in all.
    #[serde(default)]
    pub tasks: Option<u64>,
}

fn covers(prefixes: &[String], name: &str) -> bool {
    let path: Result<ModulePath, _> = name.parse();
    prefixes.iter().any(|p| p.is_empty() || p == "*" || path.as_ref().is_ok_and(|n| n.has_prefix(p)))
}

impl NodePolicy {
    /// Runs anything for anyone.
    pub fn open() -> Self {
        NodePolicy { task_window_secs: default_window(), ..NodePolicy::default() }
    }

    /// Reads a policy file. Errors name the line.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let p: NodePolicy = serde_saphyr::from_str_with_options(text, tessera_core::yaml::options()).map_err(|e| {
            let msg = tessera_core::yaml::message(&e);
            match tessera_core::yaml::location(&e) {
                Some((line, _)) => format!("line {line}: {msg}"),
                None => msg,
            }
        })?;
        for g in &p.grants {
            if let Some(e) = &g.expires {
                parse_rfc3339(e).map_err(|why| format!("grant to {}: expires: {why}", g.to))?;
            }
        }
        for k in p.quotas.keys() {
            k.parse::<PublicKey>().map_err(|e| format!("quotas: {e}"))?;
        }
        Ok(p)
    }

    /// True when tasks are checked against grants.
    pub fn checks_grants(&self) -> bool {
        self.require_signed_tasks || !self.grants.is_empty()
    }

    /// Checks a package's signature and publisher before anything of it runs.
    pub fn check_package(&self, record: &PackageRecord, digest: &Digest) -> Result<(), String> {
        if !self.require_signed_packages {
            return Ok(());
        }
        let (Some(signer), Some(sig)) = (&record.signer, &record.signature) else {
            return Err(format!(
                "package {}@{} ({digest}) is unsigned; this node runs only signed packages",
                record.name, record.version
            ));
        };
        let key: PublicKey = signer.parse().map_err(|e| format!("package signer: {e}"))?;
        let sig = Signature::from_text(sig).ok_or("malformed package signature")?;
        PackageSignature { key: key.clone(), sig }.verify(digest).map_err(|e| {
            format!("package {}@{} ({digest}): the signature does not verify: {e}", record.name, record.version)
        })?;
        let trusted = self
            .trusted_publishers
            .iter()
            .filter(|(prefix, _)| covers(std::slice::from_ref(prefix), &record.name))
            .any(|(_, keys)| keys.contains(&key));
        if !trusted {
            return Err(format!(
                "package {}@{} is signed by {key}, who is not a trusted publisher of its namespace on this node (unknown signer)",
                record.name, record.version
            ));
        }
        Ok(())
    }

    /// The grant that lets `signer` run `module` now (`now_ms`), or why none does.
    pub fn grant_for(&self, signer: &PublicKey, module: &str, now_ms: u64) -> Result<&Grant, String> {
        let mut expired = false;
        for g in self.grants.iter().filter(|g| &g.to == signer && covers(&g.modules, module)) {
            match &g.expires {
                Some(e) if parse_rfc3339(e).unwrap_or(0).saturating_mul(1000) <= now_ms => expired = true,
                _ => return Ok(g),
            }
        }
        if expired {
            return Err(format!("the grant to {signer} for {module} has expired"));
        }
        Err(format!("{signer} has no grant to run {module} on this node"))
    }

    /// The grant that lets `signer` use the free-named queue `queue` now, or why none does.
    pub fn queue_grant_for(&self, signer: &PublicKey, queue: &str, now_ms: u64) -> Result<&Grant, String> {
        let mut expired = false;
        for g in self.grants.iter().filter(|g| &g.to == signer && covers(&g.queues, queue)) {
            match &g.expires {
                Some(e) if parse_rfc3339(e).unwrap_or(0).saturating_mul(1000) <= now_ms => expired = true,
                _ => return Ok(g),
            }
        }
        if expired {
            return Err(format!("the grant to {signer} for queue {queue} has expired"));
        }
        Err(format!("{signer} has no grant to use queue {queue} on this node"))
    }

    /// The quota of an account, if any.
    pub fn quota(&self, account: &PublicKey) -> Option<Quota> {
        self.quotas.get(&account.to_string()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_identity::{KeyPair, KeyType};

    #[test]
    fn reads_policies_and_refuses_bad_ones() {
        let k = KeyPair::generate(KeyType::Ed25519);
        let text = format!(
            "require_signed_packages: true\ntrusted_publishers:\n  fl: [{k}]\nrequire_signed_tasks: true\ngrants:\n  - to: {k}\n    modules: [fl]\n    datasets: [digits]\n    expires: 2030-01-01T00:00:00Z\nquotas:\n  \"{k}\": {{compute_seconds: 10}}\n",
            k = k.public()
        );
        let p = NodePolicy::from_yaml(&text).unwrap();
        assert!(p.checks_grants());
        assert_eq!(p.grant_for(k.public(), "fl.softmax.worker", 0).unwrap().datasets, ["digits"]);
        assert!(p.grant_for(k.public(), "flow.x", 0).unwrap_err().contains("no grant"));
        assert!(p.grant_for(k.public(), "fl.x", 1_900_000_000_000).unwrap_err().contains("expired"));
        assert_eq!(p.quota(k.public()).unwrap().compute_seconds, Some(10.0));
        for (bad, word) in [
            ("grants:\n  - to: rsa:AAAA\n", "rsa"),
            ("grants:\n  - to: ed25519:AAAA\n", "valid"),
            ("unknown: 1\n", "unknown"),
            (&*format!("grants:\n  - to: {}\n    expires: tomorrow\n", k.public()), "expires"),
            ("quotas:\n  nobody: {tasks: 1}\n", "quotas"),
        ] {
            let e = NodePolicy::from_yaml(bad).unwrap_err();
            assert!(e.contains(word), "{bad:?}: {e}");
        }
    }
}
