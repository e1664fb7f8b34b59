//! Namespaces and their owners: the one ownership rule every write goes through.

use super::db::{Conn, OptionalExtension, params};
use tessera_identity::PublicKey;

use super::{HubError, HubStore, keys_json, namespace_of};

/// The owners of a namespace (`None`: nobody has claimed it).
pub(super) fn owners_in(conn: &Conn, namespace: &str) -> Result<Option<Vec<PublicKey>>, HubError> {
    let text: Option<String> = conn
        .query_row("SELECT owners FROM namespaces WHERE namespace = ?1", params![namespace], |r| r.get(0))
        .optional()?;
    let Some(t) = text else { return Ok(None) };
    let keys: Vec<String> = serde_json::from_str(&t).map_err(|e| HubError::Storage(e.to_string()))?;
    let keys = keys
        .iter()
        .map(|k| k.parse())
        .collect::<Result<Vec<PublicKey>, _>>()
        .map_err(|e| HubError::Storage(e.to_string()))?;
    Ok(Some(keys))
}

/// The tables whose rows live under a namespace, with the column naming them (a dotted
/// name, or a component's `name/...` key): what a hub that starts requiring signatures
/// hands to its own key when unowned. A table added to the schema with a `name` or `key`
/// column must be listed here (a test checks).
pub(crate) const NAMED_TABLES: &[(&str, &str)] = &[
    ("packages", "name"),
    ("models", "name"),
    ("components", "key"),
    ("component_revisions", "key"),
    ("aliases", "name"),
    ("grants", "name"),
];

/// Reads every namespace's owners back (a restore's check that the hub can read what it
/// restored).
pub(super) fn check_rows(conn: &Conn) -> Result<(), HubError> {
    let names: Vec<String> = conn.query_all("SELECT namespace FROM namespaces", params![], |r| r.get(0))?;
    for ns in names {
        bare_namespace(&ns)?;
        owners_in(conn, &ns).map_err(|e| HubError::BadRequest(format!("namespace {ns}: {e}")))?;
    }
    Ok(())
}

/// Refuses what is not a bare namespace: every route and call naming a namespace (not a
/// module or model name, whose namespace is its first segment) goes through here, so that
/// `a.b` or `a..b` is never read as another namespace.
fn bare_namespace(namespace: &str) -> Result<(), HubError> {
    tessera_core::name::check_ident("namespace", namespace).map_err(|e| HubError::BadRequest(e.to_string()))
}

/// The namespace rule, inside a write's transaction: owners may write; in an unowned
/// namespace, a signed write claims it for its signer and an unsigned one (open hubs only)
/// claims nothing.
pub(super) fn check_write(tx: &Conn, namespace: &str, actor: Option<&PublicKey>) -> Result<(), HubError> {
    tessera_core::name::check_ident("namespace", namespace).map_err(|e| HubError::BadRequest(e.to_string()))?;
    match (owners_in(tx, namespace)?, actor) {
        (Some(owners), Some(a)) if owners.contains(a) => Ok(()),
        (Some(_), None) => Err(HubError::Unauthorized(format!(
            "namespace {namespace:?} is owned: sign the request with an owner's key"
        ))),
        (Some(owners), Some(a)) => Err(HubError::Forbidden(format!(
            "namespace {namespace:?} belongs to {}; {a} is not one of its owners",
            owners.iter().map(PublicKey::to_string).collect::<Vec<_>>().join(", ")
        ))),
        (None, Some(a)) => {
            tx.execute(
                "INSERT INTO namespaces (namespace, owners) VALUES (?1, ?2)",
                params![namespace, keys_json(std::slice::from_ref(a))],
            )?;
            tracing::info!(%namespace, owner = %a, "namespace claimed");
            Ok(())
        }
        (None, None) => Ok(()),
    }
}

impl HubStore {
    /// The owners of a namespace (`None`: nobody has claimed it).
    ///
    /// # Errors
    /// [`HubError::BadRequest`] when `namespace` is not a bare namespace (a name's first
    /// segment: no dots, no path).
    pub fn owners(&self, namespace: &str) -> Result<Option<Vec<PublicKey>>, HubError> {
        bare_namespace(namespace)?;
        owners_in(&self.db(), namespace)
    }

    /// True when `key` owns the namespace of `name`.
    pub fn is_owner(&self, name: &str, key: &PublicKey) -> Result<bool, HubError> {
        Ok(self.owners(namespace_of(name))?.is_some_and(|o| o.contains(key)))
    }

    /// Refuses unless `actor` owns the namespace of `name` (for reads of owners' things,
    /// such as grants): owning is never claimed by reading.
    pub fn check_owner(&self, name: &str, actor: &PublicKey) -> Result<(), HubError> {
        let ns = namespace_of(name);
        if self.is_owner(name, actor)? {
            return Ok(());
        }
        Err(HubError::Forbidden(format!("{actor} is not an owner of namespace {ns:?}")))
    }

    /// The namespace rule, checked without writing anything: `Ok` when `actor` could write
    /// under `name` now. Routes call it from the headers, before reading an upload; the
    /// write itself checks again in its transaction.
    pub fn may_write(&self, name: &str, actor: Option<&PublicKey>) -> Result<(), HubError> {
        let ns = namespace_of(name);
        match (self.owners(ns)?, actor) {
            (None, _) => Ok(()),
            (Some(owners), Some(a)) if owners.contains(a) => Ok(()),
            (Some(_), None) => {
                Err(HubError::Unauthorized(format!("namespace {ns:?} is owned: sign the request with an owner's key")))
            }
            (Some(owners), Some(a)) => Err(HubError::Forbidden(format!(
                "namespace {ns:?} belongs to {}; {a} is not one of its owners",
                owners.iter().map(PublicKey::to_string).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Adds `key` to a namespace's owners, signed by `actor`: an owner, or the claimer of
    /// an unowned namespace (the write claims it for `actor` first, like any write).
    pub fn add_owner(&self, namespace: &str, actor: &PublicKey, key: &PublicKey) -> Result<Vec<PublicKey>, HubError> {
        bare_namespace(namespace)?;
        self.write(namespace, Some(actor), |tx| {
            let mut owners = owners_in(tx, namespace)?.unwrap_or_default();
            if !owners.contains(key) {
                owners.push(key.clone());
            }
            tx.execute(
                "UPDATE namespaces SET owners = ?2 WHERE namespace = ?1",
                params![namespace, keys_json(&owners)],
            )?;
            Ok(owners)
        })
    }

    /// Removes `key` from a namespace's owners, signed by an owner; the last owner stays.
    pub fn remove_owner(
        &self,
        namespace: &str,
        actor: &PublicKey,
        key: &PublicKey,
    ) -> Result<Vec<PublicKey>, HubError> {
        if self.owners(namespace)?.is_none() {
            return Err(HubError::NotFound(format!("namespace {namespace:?} has no owners")));
        }
        self.write(namespace, Some(actor), |tx| {
            let mut owners = owners_in(tx, namespace)?.unwrap_or_default();
            owners.retain(|k| k != key);
            if owners.is_empty() {
                return Err(HubError::BadRequest("a namespace keeps at least one owner".into()));
            }
            tx.execute(
                "UPDATE namespaces SET owners = ?2 WHERE namespace = ?1",
                params![namespace, keys_json(&owners)],
            )?;
            Ok(owners)
        })
    }

    /// Namespaces that hold anything ([`NAMED_TABLES`]) but have no owner (written
    /// unsigned on an open hub).
    pub fn unowned_namespaces(&self) -> Result<Vec<String>, HubError> {
        let db = self.db();
        let query = NAMED_TABLES
            .iter()
            .map(|(table, column)| format!("SELECT {column} FROM {table}"))
            .collect::<Vec<_>>()
            .join(" UNION ");
        let names: Vec<String> = db.prepare(&query)?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut out: Vec<String> = Vec::new();
        for n in names {
            // A component's key is `name/...`; its namespace is its name's.
            let ns = namespace_of(n.split('/').next().unwrap_or_default()).to_owned();
            if !out.contains(&ns) && owners_in(&db, &ns)?.is_none() {
                out.push(ns);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Gives every namespace that holds things but has no owner to the hub's own key, so a
    /// hub that starts requiring signatures has no namespace that any key could claim by
    /// writing first. The operator hands them on with [`HubStore::assign_owners`]
    /// (`tessera hub owners NS KEY --data DIR`). Returns the namespaces adopted.
    pub fn adopt_unowned(&self) -> Result<Vec<String>, HubError> {
        let unowned = self.unowned_namespaces()?;
        let hub = self.key.public().clone();
        for ns in &unowned {
            self.db().execute(
                "INSERT INTO namespaces (namespace, owners) VALUES (?1, ?2) ON CONFLICT(namespace) DO NOTHING",
                params![ns, keys_json(std::slice::from_ref(&hub))],
            )?;
            tracing::warn!(namespace = %ns, "namespace had no owner: it now belongs to the hub's key");
        }
        Ok(unowned)
    }

    /// Sets a namespace's owners outright: the operator's override, for whoever has the
    /// hub's data directory (not reachable over HTTP).
    pub fn assign_owners(&self, namespace: &str, owners: &[PublicKey]) -> Result<(), HubError> {
        tessera_core::name::check_ident("namespace", namespace).map_err(|e| HubError::BadRequest(e.to_string()))?;
        if owners.is_empty() {
            return Err(HubError::BadRequest("a namespace keeps at least one owner".into()));
        }
        self.db().execute(
            "INSERT INTO namespaces (namespace, owners) VALUES (?1, ?2)
             ON CONFLICT(namespace) DO UPDATE SET owners = excluded.owners",
            params![namespace, keys_json(owners)],
        )?;
        Ok(())
    }
}
