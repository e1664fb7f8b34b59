//! Instances kept between runs of modules that allow it (`reuse: session` in the manifest):
//! a run of such a module takes an idle instance made by an earlier run with the same key
//! (the module, the node, the reuse scope its context gives, the dataset files it sees,
//! whether it has `/scratch`) instead of instantiating the module afresh, and gives it back
//! when the call returned. An instance whose call trapped, ran out of time or memory, or
//! which holds more than half the memory limit, is dropped, never given back.
//!
//! Idle instances are bounded three ways: at most [`WARM_INSTANCES`], holding at most
//! [`WARM_BYTES`] of linear memory between them (the oldest idle go first), each idle at
//! most [`WARM_TTL`] (the runtime's ticker lets go of older ones within a second).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tessera_core::Digest;
use wasmtime::Store;

use crate::pipe::RunPipe;
use crate::{DatasetKey, Host, bindings};

/// Idle instances kept at most, over all modules.
pub const WARM_INSTANCES: usize = 64;

/// Linear memory idle instances may hold between them, in bytes; an instance larger than
/// this is not kept.
pub const WARM_BYTES: u64 = 1 << 30;

/// How long an instance is kept idle.
pub const WARM_TTL: Duration = Duration::from_secs(60);

/// Which runs may share an instance.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct WarmKey {
    pub(crate) module: Digest,
    pub(crate) node: String,
    pub(crate) scope: String,
    pub(crate) datasets: Vec<DatasetKey>,
    /// Whether its instances have `/scratch` (a task naming a catalogue entry may declare
    /// disk space the module's own manifest does not).
    pub(crate) scratch: bool,
}

/// A run's standard output (absent for an actor's replica, whose output is dropped) and
/// error.
pub(crate) struct Pipes {
    pub(crate) stdout: Option<RunPipe>,
    pub(crate) stderr: RunPipe,
}

/// An instantiated module with its store.
pub(crate) struct Live {
    pub(crate) store: Store<Host>,
    pub(crate) module: bindings::Module,
    pub(crate) pipes: Pipes,
}

struct Idle {
    live: Live,
    since: Instant,
}

impl Idle {
    fn memory(&self) -> u64 {
        self.live.store.data().limiter.total
    }
}

/// The idle instances. Methods hand back the instances they let go of, for the caller to
/// drop outside the pool's lock (dropping a store unmaps its memory).
#[derive(Default)]
pub(crate) struct WarmPool {
    idle: HashMap<WarmKey, Vec<Idle>>,
    count: usize,
    bytes: u64,
}

impl WarmPool {
    /// The most recently idle instance for `key`, if any.
    pub(crate) fn take(&mut self, key: &WarmKey) -> Option<Live> {
        let list = self.idle.get_mut(key)?;
        let idle = list.pop()?;
        if list.is_empty() {
            self.idle.remove(key);
        }
        self.count -= 1;
        self.bytes -= idle.memory();
        Some(idle.live)
    }

    /// Keeps `live` idle under `key`; returns what the bounds no longer allow.
    pub(crate) fn put(&mut self, key: WarmKey, live: Live) -> Vec<Live> {
        let idle = Idle { live, since: Instant::now() };
        if idle.memory() > WARM_BYTES {
            return vec![idle.live];
        }
        self.count += 1;
        self.bytes += idle.memory();
        self.idle.entry(key).or_default().push(idle);
        let mut gone = Vec::new();
        while self.count > WARM_INSTANCES || self.bytes > WARM_BYTES {
            match self.pop_oldest() {
                Some(live) => gone.push(live),
                None => break,
            }
        }
        gone
    }

    /// Lets go of the instances idle for longer than [`WARM_TTL`].
    pub(crate) fn expire(&mut self) -> Vec<Live> {
        let mut gone = Vec::new();
        while let Some(live) = self.pop_oldest_if(|since| since.elapsed() > WARM_TTL) {
            gone.push(live);
        }
        gone
    }

    /// How many instances are idle.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Linear memory the idle instances hold, in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    fn pop_oldest(&mut self) -> Option<Live> {
        self.pop_oldest_if(|_| true)
    }

    fn pop_oldest_if(&mut self, old: impl Fn(Instant) -> bool) -> Option<Live> {
        // Each list is in the order its instances went idle: the oldest is first.
        let key = self
            .idle
            .iter()
            .filter_map(|(k, list)| list.first().map(|i| (k, i.since)))
            .min_by_key(|(_, since)| *since)
            .filter(|(_, since)| old(*since))
            .map(|(k, _)| k.clone())?;
        let list = self.idle.get_mut(&key)?;
        let idle = list.remove(0);
        if list.is_empty() {
            self.idle.remove(&key);
        }
        self.count -= 1;
        self.bytes -= idle.memory();
        Some(idle.live)
    }
}
