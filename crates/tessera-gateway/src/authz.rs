//! The one authorization step every gateway route takes, after authentication.
//!
//! On a node that checks grants (its policy requires signed tasks, or lists grants), a
//! signed caller needs a grant that covers what it touches:
//!
//! | route | needs |
//! |---|---|
//! | call | a grant for the actor's module, then the module's `access` role for the function |
//! | launch, kill, show an actor | a grant for the actor's module |
//! | list actors | nothing; the list holds only actors the caller has a grant for |
//! | queue put, get, len | `<actor>.in`/`<actor>.out`: a grant for the actor's module; any other name: a grant whose `queues` cover it |
//! | cancel a call | to be the key that made it, or the owner (signer) of the called module's package |
//! | blob | to be the key whose call produced it |
//!
//! Unsigned callers are refused by authentication on a node that requires signed tasks;
//! elsewhere they pass grants (as unsigned tasks do) but not `access` roles. An open node
//! (no policy) lets everyone do everything.

use tessera_core::PackageRef;
use tessera_identity::{PublicKey, now_ms};
use tessera_ports::ModuleImage;

use crate::api::{ApiError, Gateway};

/// Queue name prefixes Tessera uses itself (task queues of nodes, reply queues of
/// sessions): refused on every gateway route, whatever the grant.
pub const RESERVED_QUEUES: [&str; 2] = ["tessera.node.", "tessera.session."];

/// Who made a request: the verified signer, or `None` for an unsigned request. Set by the
/// authentication layer on every route.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<PublicKey>);

impl Caller {
    /// The signer, if any.
    pub fn key(&self) -> Option<&PublicKey> {
        self.0.as_ref()
    }

    /// The account a call or output belongs to (`""` for unsigned callers).
    pub fn account(&self) -> String {
        self.0.as_ref().map(ToString::to_string).unwrap_or_default()
    }
}

impl Gateway {
    /// True when this node checks grants.
    pub(crate) fn checks_grants(&self) -> bool {
        self.node.policy().checks_grants()
    }

    /// May `caller` launch, kill or see actors of `image`?
    pub(crate) fn authorize_module(&self, caller: &Caller, image: &ModuleImage) -> Result<(), ApiError> {
        self.node.authorize_launch(image, caller.key()).map_err(ApiError::from)
    }

    /// May `caller` call `function` of `image`? (grant, then the module's access role).
    pub(crate) async fn authorize_call(
        &self,
        caller: &Caller,
        image: &ModuleImage,
        function: &str,
    ) -> Result<(), ApiError> {
        self.node.authorize_call(image, function, caller.key()).await.map_err(ApiError::from)
    }

    /// May `caller` launch `image` with this priority and this many replicas? Within its
    /// grant's `max_priority` and `max_replicas` on a node that checks grants.
    pub(crate) fn authorize_launch(
        &self,
        caller: &Caller,
        image: &ModuleImage,
        priority: i32,
        replicas: usize,
    ) -> Result<(), ApiError> {
        self.authorize_module(caller, image)?;
        let policy = self.node.policy();
        let Some(k) = caller.key() else { return Ok(()) };
        if !policy.checks_grants() {
            return Ok(());
        }
        let g = policy.grant_for(k, image.manifest.name.as_str(), now_ms()).map_err(ApiError::refused)?;
        if priority > g.max_priority {
            return Err(ApiError::refused(format!(
                "priority {priority} is over what {k}'s grant allows on this node ({})",
                g.max_priority
            )));
        }
        if replicas > g.max_replicas {
            return Err(ApiError::refused(format!(
                "{replicas} replicas are over what {k}'s grant allows on this node ({})",
                g.max_replicas
            )));
        }
        Ok(())
    }

    /// May `caller` touch things of the module named `module` (by name, for actors whose
    /// package this node has not loaded)?
    pub(crate) fn authorize_module_name(&self, caller: &Caller, module: &str) -> Result<(), ApiError> {
        let policy = self.node.policy();
        match caller.key() {
            Some(k) if policy.checks_grants() => {
                policy.grant_for(k, module, now_ms()).map(drop).map_err(ApiError::refused)
            }
            _ => Ok(()),
        }
    }

    /// The module an actor runs (here, or on a live node of the cluster), if it runs.
    pub(crate) async fn module_of_actor(&self, actor: &str) -> Result<Option<String>, ApiError> {
        if let Some(image) = self.actors.image(actor).await {
            return Ok(Some(image.manifest.name.to_string()));
        }
        let Some(p) = self.actors.locate(actor).await? else { return Ok(None) };
        let record = self.node.resolve(&PackageRef::Digest(p.digest)).await?;
        Ok(Some(record.name))
    }

    /// May `caller` use `queue`? An actor's `<actor>.in` and `<actor>.out` go with the
    /// actor's module; other queues need a grant naming them.
    pub(crate) async fn authorize_queue(&self, caller: &Caller, queue: &str) -> Result<(), ApiError> {
        tessera_ports::bus::check_queue(queue)?;
        // The node's and sessions' own queues are never reached through the gateway.
        if RESERVED_QUEUES.iter().any(|p| queue.starts_with(p)) {
            return Err(ApiError::refused(format!(
                "{queue} is one of Tessera's own queues ({}…); the gateway serves other queues",
                RESERVED_QUEUES.join("…, ")
            )));
        }
        let Some(k) = caller.key() else { return Ok(()) };
        let policy = self.node.policy();
        if !policy.checks_grants() {
            return Ok(());
        }
        let actor = queue.strip_suffix(".in").or_else(|| queue.strip_suffix(".out"));
        if let Some(actor) = actor
            && let Some(module) = self.module_of_actor(actor).await?
        {
            return self.authorize_module_name(caller, &module);
        }
        policy.queue_grant_for(k, queue, now_ms()).map(drop).map_err(ApiError::refused)
    }
}
