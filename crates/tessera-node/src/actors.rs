//! Actors: modules launched once and kept running, answering calls.
//!
//! An actor is named `<path>` or `<path>-<tag>` (`model.transformer-1`) and has one or more
//! replicas (a pool). Launching is get-or-create: launching a name that runs gives the
//! running actor. A call goes to the least busy replica and runs there alone; a replica
//! that crashed, broke a limit or timed out is replaced at the next call. A module with
//! state hooks (functions `save_state`, giving a `state` output, and `restore_state`,
//! taking it) has its state saved after every call and restored into a new replica, so it
//! comes back after a crash or a relaunch.
//!
//! The node's capacity is shared by reservations (each actor reserves its manifest's
//! `needs` per replica); an actor that does not fit evicts others by priority then age
//! (FIFO), or is refused with the reason ([`tessera_core::manager`]).
//!
//! Names are cluster-wide: a launch claims `names/<actor>` in world state with a
//! compare-and-set, so two nodes launching one name make one actor; a name held by a live
//! node is answered with [`ActorError::Elsewhere`] (the caller forwards there), and a name
//! whose node has left the membership is taken over. State saved by the hooks is kept
//! under the actor's name (`actor-state/<actor>/<module>`), so an actor relaunched on another node
//! comes back with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tessera_core::config::deep_merge;
use tessera_core::manager::{Admission, Running, admit};
use tessera_core::manifest::Needs;
use tessera_core::name::check_ident;
use tessera_core::wire::Resources;
use tessera_core::{Digest, ModulePath};
use tessera_ports::{Instance, Invocation, ModuleImage, Outputs, RuntimeError, Stateless};

use crate::context::NodeContext;
use crate::node::{Node, NodeError};

/// Why an actor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// No actor of that name.
    #[error("no actor named {0:?} (tessera actors lists them)")]
    NotFound(String),
    /// The node has no room, even after evicting what it may.
    #[error("cannot launch {name}: {why}")]
    NoRoom {
        /// The actor.
        name: String,
        /// Why.
        why: String,
    },
    /// The call took longer than its time-out (the replica is replaced).
    #[error("the call to {name}.{function} timed out after {ms} ms")]
    Timeout {
        /// The actor.
        name: String,
        /// The function.
        function: String,
        /// The time-out.
        ms: u64,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A launch names a running actor with another config than it was launched with.
    #[error(
        "{name} runs with the config {running}; a launch asking for {asked} would not get it: kill it first (tessera kill {name}), or launch under another name (--tag)"
    )]
    ConfigConflict {
        /// The actor.
        name: String,
        /// The overrides it runs with (JSON).
        running: String,
        /// The overrides asked for (JSON).
        asked: String,
    },
    /// A launch names an actor that runs another package.
    #[error(
        "{name} runs {running}; to replace it with {asked}, kill it first (tessera kill {name}), or launch {asked} under another name (--tag)"
    )]
    Running {
        /// The actor.
        name: String,
        /// `name@version` of what runs.
        running: String,
        /// `name@version` of what the launch asked for.
        asked: String,
    },
    /// The module failed, crashed or broke a limit.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The node failed (package, blobs, world state).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The actor runs on another node (calls and kills go there).
    #[error("{name} runs on node {}", placement.node)]
    Elsewhere {
        /// The actor.
        name: String,
        /// Where it runs.
        placement: Placement,
    },
}

/// Where an actor runs, recorded cluster-wide under `names/<actor>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The node.
    pub node: String,
    /// The node's HTTP gateway, when it has one.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The package.
    pub digest: Digest,
}

fn name_key(name: &str) -> String {
    format!("names/{name}")
}

/// What to launch.
#[derive(Clone, Debug)]
pub struct ActorSpec {
    /// The package.
    pub module: Digest,
    /// The tag (`1` in `model.transformer-1`); none: the actor is named by its path.
    pub tag: Option<String>,
    /// Replicas in the pool.
    pub replicas: usize,
    /// Config merged over the module's default.
    pub config: Value,
    /// Higher stays longer when the node is full.
    pub priority: i32,
}

pub use tessera_core::wire::ActorInfo;

struct Replica {
    slot: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
    busy: AtomicUsize,
}

struct Actor {
    name: String,
    image: ModuleImage,
    config: Value,
    /// The config overrides it was launched with.
    overrides: Value,
    priority: i32,
    launched: u64,
    replicas: Vec<Replica>,
    calls: AtomicU64,
    /// `None` until known.
    stateful: std::sync::Mutex<Option<bool>>,
}

/// What `replicas` replicas of a module needing `n` reserve (saturating: manifests come
/// from outside).
fn times(n: &Needs, replicas: usize) -> Needs {
    let r = replicas as u64;
    Needs {
        cpu: n.cpu * r as f64,
        memory: tessera_core::ByteSize(n.memory.0.saturating_mul(r)),
        gpu: n.gpu.saturating_mul(u32::try_from(replicas).unwrap_or(u32::MAX)),
        storage: tessera_core::ByteSize(n.storage.0.saturating_mul(r)),
        libraries: Vec::new(),
        network: n.network,
    }
}

impl Actor {
    fn reserved(&self) -> Needs {
        times(&self.image.manifest.needs, self.replicas.len())
    }

    fn info(&self, node: &Node) -> ActorInfo {
        let n = self.reserved();
        ActorInfo {
            name: self.name.clone(),
            node: node.id().to_owned(),
            degraded: node.degraded(),
            module: format!("{}@{}", self.image.manifest.name, self.image.manifest.version),
            digest: self.image.digest,
            replicas: self.replicas.len(),
            priority: self.priority,
            reserved: Resources { cpu: n.cpu, memory: n.memory, gpu: n.gpu, disk: n.storage },
            calls: self.calls.load(Ordering::Relaxed),
            busy: self.replicas.iter().map(|r| r.busy.load(Ordering::Relaxed)).sum(),
            stateful: self.stateful.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(false),
        }
    }
}

/// The actors of one node.
pub struct Actors {
    node: Arc<Node>,
    capacity: Resources,
    actors: tokio::sync::Mutex<BTreeMap<String, Arc<Actor>>>,
    seq: AtomicU64,
}

/// The name of an actor of `path` with `tag`.
pub fn actor_name(path: &ModulePath, tag: Option<&str>) -> String {
    match tag {
        Some(t) => format!("{path}-{t}"),
        None => path.to_string(),
    }
}

impl Actors {
    /// The actors of `node`, sharing `capacity` (the node's resources by default).
    pub fn new(node: Arc<Node>, capacity: Option<Resources>) -> Self {
        let capacity = capacity.unwrap_or_else(|| node.record().resources);
        Actors { node, capacity, actors: tokio::sync::Mutex::new(BTreeMap::new()), seq: AtomicU64::new(0) }
    }

    /// The node's capacity for actors.
    pub fn capacity(&self) -> &Resources {
        &self.capacity
    }

    /// Launches an actor, or gives the running one of that name.
    pub async fn launch(&self, spec: ActorSpec) -> Result<ActorInfo, ActorError> {
        if spec.replicas == 0 || spec.replicas > 64 {
            return Err(ActorError::Invalid("replicas must be between 1 and 64".into()));
        }
        if let Some(t) = &spec.tag {
            check_ident("actor tag", t).map_err(|e| ActorError::Invalid(e.to_string()))?;
        }
        if !spec.config.is_object() && !spec.config.is_null() {
            return Err(ActorError::Invalid("the actor's config must be a mapping".into()));
        }
        let image = self.node.module(&spec.module).await?;
        let name = actor_name(&image.manifest.name, spec.tag.as_deref());
        // One lock around look-up and creation: two launches of a name make one actor.
        let mut actors = self.actors.lock().await;
        if let Some(a) = actors.get(&name) {
            if a.image.digest != image.digest {
                let m = |i: &ModuleImage| format!("{}@{}", i.manifest.name, i.manifest.version);
                let (running, asked) = (m(&a.image), m(&image));
                let (running, asked) = if running == asked {
                    (format!("{running} ({})", a.image.digest.short()), format!("{asked} ({})", image.digest.short()))
                } else {
                    (running, asked)
                };
                return Err(ActorError::Running { name, running, asked });
            }
            let asked = if spec.config.is_null() { json!({}) } else { spec.config.clone() };
            if asked.as_object().is_some_and(|o| !o.is_empty()) && asked != a.overrides {
                return Err(ActorError::ConfigConflict {
                    name,
                    running: a.overrides.to_string(),
                    asked: asked.to_string(),
                });
            }
            return Ok(a.info(&self.node));
        }
        // A tagged name (`path-tag`) that is another module's own name would take that
        // module's actor name, queues and saved state: refused.
        if spec.tag.is_some()
            && let Ok(path) = name.parse::<ModulePath>()
            && let Ok(other) = self
                .node
                .resolve(&tessera_core::PackageRef::Named {
                    name: path,
                    selector: tessera_core::version::Selector::Alias(tessera_core::version::LATEST.into()),
                })
                .await
            && other.name != image.manifest.name.as_str()
        {
            return Err(ActorError::Invalid(format!(
                "the actor name {name} is the name of the module {}: launch {} with another tag",
                other.name, image.manifest.name
            )));
        }
        self.claim(&name, &image.digest).await?;
        match self.launch_claimed(&mut actors, name.clone(), image, spec).await {
            Ok(info) => Ok(info),
            Err(e) => {
                self.release(&name).await;
                Err(e)
            }
        }
    }

    async fn launch_claimed(
        &self,
        actors: &mut BTreeMap<String, Arc<Actor>>,
        name: String,
        image: ModuleImage,
        spec: ActorSpec,
    ) -> Result<ActorInfo, ActorError> {
        let needs = times(&image.manifest.needs, spec.replicas);
        let running: Vec<Running> = actors
            .values()
            .map(|a| Running { name: a.name.clone(), needs: a.reserved(), priority: a.priority, launched: a.launched })
            .collect();
        match admit(&self.capacity, &running, &needs, spec.priority) {
            Admission::Fits => {}
            Admission::Evict(victims) => {
                for v in victims {
                    if let Some(a) = actors.remove(&v) {
                        tracing::info!(actor = %v, "evicted to make room for {name}");
                        self.save_all(&a).await;
                        self.release(&v).await;
                    }
                }
            }
            Admission::Refuse(why) => return Err(ActorError::NoRoom { name, why }),
        }
        let mut config = image.manifest.config.clone();
        let overrides = if spec.config.is_null() { json!({}) } else { spec.config.clone() };
        deep_merge(&mut config, &overrides);
        let actor = Arc::new(Actor {
            name: name.clone(),
            image,
            config,
            overrides,
            priority: spec.priority,
            launched: self.seq.fetch_add(1, Ordering::Relaxed),
            replicas: (0..spec.replicas)
                .map(|_| Replica { slot: tokio::sync::Mutex::new(None), busy: AtomicUsize::new(0) })
                .collect(),
            calls: AtomicU64::new(0),
            stateful: std::sync::Mutex::new(None),
        });
        // Start the replicas now, so a broken module fails its launch.
        for r in &actor.replicas {
            let inst = self.start(&actor).await?;
            *r.slot.lock().await = Some(inst);
        }
        actors.insert(name, actor.clone());
        Ok(actor.info(&self.node))
    }

    fn placement(&self, digest: &Digest) -> Placement {
        Placement { node: self.node.id().to_owned(), endpoint: self.node.record().endpoint, digest: *digest }
    }

    /// Claims `name` for this node in world state, or says who holds it.
    async fn claim(&self, name: &str, digest: &Digest) -> Result<(), ActorError> {
        let world = self.node.world();
        let key = name_key(name);
        let mine = Bytes::from(serde_json::to_vec(&self.placement(digest)).expect("serializable"));
        for _ in 0..16 {
            let expected = match world.get(&key).await.map_err(NodeError::from)? {
                None => None,
                Some(e) => match serde_json::from_slice::<Placement>(&e.value) {
                    Ok(p) if p.node == self.node.id() => Some(e.revision),
                    Ok(p) if self.is_live(&p.node).await? => {
                        return Err(ActorError::Elsewhere { name: name.to_owned(), placement: p });
                    }
                    Ok(p) => {
                        tracing::info!(actor = %name, "taking over the name from node {}, which left", p.node);
                        Some(e.revision)
                    }
                    Err(_) => Some(e.revision),
                },
            };
            match world.compare_and_set(&key, mine.clone(), expected).await {
                Ok(_) => return Ok(()),
                Err(tessera_ports::WorldError::Conflict { .. }) => continue,
                Err(e) => return Err(NodeError::from(e).into()),
            }
        }
        Err(ActorError::Invalid(format!("could not claim the name {name}: too much contention")))
    }

    async fn is_live(&self, node: &str) -> Result<bool, ActorError> {
        let members = self.node.members().members().await.map_err(NodeError::from)?;
        Ok(members.iter().any(|(id, _)| id == node))
    }

    /// Drops this node's claim on `name`.
    async fn release(&self, name: &str) {
        let world = self.node.world();
        let key = name_key(name);
        if let Ok(Some(e)) = world.get(&key).await
            && serde_json::from_slice::<Placement>(&e.value).is_ok_and(|p| p.node == self.node.id())
            && let Err(err) = world.delete(&key).await
        {
            tracing::warn!(actor = %name, "cannot release the name: {err}");
        }
    }

    /// Where an actor runs: here, on a live node, or nowhere.
    pub async fn locate(&self, name: &str) -> Result<Option<Placement>, ActorError> {
        if let Some(digest) = self.actors.lock().await.get(name).map(|a| a.image.digest) {
            return Ok(Some(self.placement(&digest)));
        }
        let Some(e) = self.node.world().get(&name_key(name)).await.map_err(NodeError::from)? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Placement>(&e.value) {
            Ok(p) if p.node != self.node.id() && self.is_live(&p.node).await? => Ok(Some(p)),
            _ => Ok(None),
        }
    }

    async fn start(&self, actor: &Actor) -> Result<Box<dyn Instance>, ActorError> {
        let ctx = Arc::new(NodeContext {
            node: self.node.id().to_owned(),
            session: format!("actor-{}", actor.name.replace('.', "_")),
            task: actor.name.clone(),
            datasets: self.node.datasets(),
            resources: self.node.record().resources,
            world: self.node.world(),
            scope: None,
            logs: None,
            reuse: None,
        });
        let runtime = self.node.runtime(actor.image.manifest.runtime)?;
        let mut inst: Box<dyn Instance> = match runtime.start(&actor.image, ctx.clone()).await? {
            Some(i) => i,
            None => Box::new(Stateless { runtime, module: actor.image.clone(), ctx }),
        };
        // Bring back saved state when the module keeps some.
        if let Some(state) = self.saved_state(actor).await? {
            let inv = Invocation {
                config: with_call(&actor.config, "restore_state", &json!([]), &json!({})),
                inputs: vec![("state".into(), state)],
                timeout: None,
            };
            inst.call(inv).await?;
            tracing::info!(actor = %actor.name, "state restored");
        }
        Ok(inst)
    }

    /// Where an actor's state is kept: by actor name and module, so a module launched
    /// under another's actor name neither reads nor overwrites that one's state.
    fn state_key(&self, actor: &Actor) -> String {
        format!("actor-state/{}/{}", actor.name, actor.image.manifest.name)
    }

    async fn saved_state(&self, actor: &Actor) -> Result<Option<Bytes>, ActorError> {
        let Some(e) = self.node.world().get(&self.state_key(actor)).await.map_err(NodeError::from)? else {
            return Ok(None);
        };
        let digest: Digest = std::str::from_utf8(&e.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ActorError::Invalid("stored state reference is corrupt".into()))?;
        Ok(self.node.blobs().get(&digest).await.map_err(NodeError::from)?)
    }

    /// Saves a replica's state when its module has hooks (after every call, so a crash
    /// loses nothing).
    async fn save(&self, actor: &Actor, inst: &mut Box<dyn Instance>) {
        if *actor.stateful.lock().unwrap_or_else(|p| p.into_inner()) == Some(false) {
            return;
        }
        let inv = Invocation {
            config: with_call(&actor.config, "save_state", &json!([]), &json!({})),
            inputs: vec![],
            timeout: None,
        };
        match inst.call(inv).await {
            Ok(out) => {
                *actor.stateful.lock().unwrap_or_else(|p| p.into_inner()) = Some(true);
                if let Some((_, state)) = out.into_iter().find(|(n, _)| n == "state") {
                    match self.node.blobs().put(state).await {
                        Ok(d) => {
                            if let Err(e) =
                                self.node.world().put(&self.state_key(actor), Bytes::from(d.to_string())).await
                            {
                                tracing::warn!(actor = %actor.name, "cannot save state: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(actor = %actor.name, "cannot save state: {e}"),
                    }
                }
            }
            Err(RuntimeError::Module(_)) => {
                *actor.stateful.lock().unwrap_or_else(|p| p.into_inner()) = Some(false);
            }
            Err(e) => tracing::warn!(actor = %actor.name, "save_state failed: {e}"),
        }
    }

    async fn save_all(&self, actor: &Actor) {
        for r in &actor.replicas {
            let mut slot = r.slot.lock().await;
            if let Some(inst) = slot.as_mut()
                && inst.healthy()
            {
                self.save(actor, inst).await;
            }
        }
    }

    /// Calls `function` on an actor with positional and keyword arguments (JSON) and
    /// named input blobs; returns its named outputs (`result` by convention).
    pub async fn call(
        &self,
        name: &str,
        function: &str,
        args: &Value,
        kwargs: &Value,
        inputs: Vec<(String, Bytes)>,
        timeout: Duration,
    ) -> Result<Outputs, ActorError> {
        check_ident("function name", function).map_err(|e| ActorError::Invalid(e.to_string()))?;
        if !args.is_array() || !kwargs.is_object() {
            return Err(ActorError::Invalid("args must be a list and kwargs a mapping".into()));
        }
        let actor = self.actors.lock().await.get(name).cloned().ok_or_else(|| ActorError::NotFound(name.to_owned()))?;
        // The least busy replica.
        let replica =
            actor.replicas.iter().min_by_key(|r| r.busy.load(Ordering::Relaxed)).expect("at least one replica");
        // Counted busy until the call ends, also when it is abandoned half-way (cancelled).
        struct Busy<'a>(&'a AtomicUsize);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        replica.busy.fetch_add(1, Ordering::Relaxed);
        let _busy = Busy(&replica.busy);
        let result = self.call_replica(&actor, replica, function, args, kwargs, inputs, timeout).await;
        actor.calls.fetch_add(1, Ordering::Relaxed);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_replica(
        &self,
        actor: &Actor,
        replica: &Replica,
        function: &str,
        args: &Value,
        kwargs: &Value,
        inputs: Vec<(String, Bytes)>,
        timeout: Duration,
    ) -> Result<Outputs, ActorError> {
        let mut slot = replica.slot.lock().await;
        // The instance is out of its slot while it runs: a call abandoned half-way (its
        // caller went away) drops it, and the next call starts a fresh replica.
        let mut inst = match slot.take() {
            Some(i) if i.healthy() => i,
            _ => {
                tracing::info!(actor = %actor.name, "starting a replica");
                self.start(actor).await?
            }
        };
        let inv =
            Invocation { config: with_call(&actor.config, function, args, kwargs), inputs, timeout: Some(timeout) };
        let timed_out = || ActorError::Timeout {
            name: actor.name.clone(),
            function: function.to_owned(),
            ms: timeout.as_millis() as u64,
        };
        // The runtime stops the call at its time-out; the grace covers runtimes that cannot.
        let mut out = tokio::time::timeout(timeout + Duration::from_secs(2), inst.call(inv.clone())).await;
        if let Ok(Err(RuntimeError::Gone(why))) = &out {
            // Stopped before the call reached it (killed from outside): the call had no
            // effect, so a fresh replica (with the saved state) takes it.
            tracing::info!(actor = %actor.name, "replica gone ({why}); starting a new one");
            inst = self.start(actor).await?;
            out = tokio::time::timeout(timeout + Duration::from_secs(2), inst.call(inv)).await;
        }
        let out = match out {
            Ok(Err(RuntimeError::TimeLimit { limit_ms })) if limit_ms == timeout.as_millis() as u64 => {
                // A healthy instance after a time limit (one that stops runs in place)
                // stays; others are replaced at the next call.
                *slot = Some(inst);
                return Err(timed_out());
            }
            Ok(r) => r,
            // The instance may be mid-call: it is dropped, and replaced at the next call.
            Err(_) => return Err(timed_out()),
        };
        let out = match out {
            Ok(out) => {
                if !matches!(function, "save_state" | "restore_state") {
                    self.save(actor, &mut inst).await;
                }
                out
            }
            Err(e) => {
                *slot = Some(inst);
                return Err(e.into());
            }
        };
        *slot = Some(inst);
        Ok(out)
    }

    /// Stops an actor (saving its state first when it has hooks).
    pub async fn kill(&self, name: &str) -> Result<ActorInfo, ActorError> {
        let actor = self.actors.lock().await.remove(name).ok_or_else(|| ActorError::NotFound(name.to_owned()))?;
        self.save_all(&actor).await;
        self.release(name).await;
        Ok(actor.info(&self.node))
    }

    /// The module an actor here runs.
    pub async fn image(&self, name: &str) -> Option<ModuleImage> {
        self.actors.lock().await.get(name).map(|a| a.image.clone())
    }

    /// The running actors.
    pub async fn list(&self) -> Vec<ActorInfo> {
        self.actors.lock().await.values().map(|a| a.info(&self.node)).collect()
    }
}

/// The config of a call: the actor's config with `function`, `args` and `kwargs`.
fn with_call(config: &Value, function: &str, args: &Value, kwargs: &Value) -> Value {
    let mut c = config.clone();
    deep_merge(&mut c, &json!({"function": function, "args": args, "kwargs": kwargs}));
    c
}
