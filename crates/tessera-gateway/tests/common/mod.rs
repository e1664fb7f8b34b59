//! The gateway tests' harness: a hub, a backend (in-process or a private nats-server), and
//! nodes with gateways on loopback.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tessera_core::Digest;
use tessera_gateway::{Gateway, GatewayConfig, app};
use tessera_hub::{HubStore, LocalHub};
use tessera_nats::testing::NatsServer;
use tessera_node::{Actors, BuiltinRuntime, Node, NodeConfig, NodePorts};
use tessera_package::{Limits, pack_dir};
use tessera_ports::{Backend, Runtime};
use tessera_wasm::{WasmLimits, WasmRuntime};

pub enum On {
    Memory,
    Nats,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub _nats: Option<NatsServer>,
    pub backend: Backend,
    pub hub: Arc<HubStore>,
    pub http: reqwest::Client,
}

pub async fn cluster(on: On) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let (nats, backend) = match on {
        On::Memory => (None, Backend::in_process(Duration::from_secs(10))),
        On::Nats => {
            let server = NatsServer::start();
            let backend = tessera_nats::backend(&server.url(), &Default::default()).await.unwrap();
            (Some(server), backend)
        }
    };
    Cluster { dir, _nats: nats, backend, hub, http: reqwest::Client::new() }
}

impl Cluster {
    pub fn publish(&self, name: &str, runtime: &str, entry: &str) -> Digest {
        let m = self.dir.path().join(format!("src-{name}"));
        let manifest = format!("name: {name}\nversion: 0.1.0\nkind: model\nruntime: {runtime}\nentry: {entry}\n");
        if runtime == "wasm" {
            tessera_modules::write_module_dir(&m, &manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
        } else {
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(m.join("module.yaml"), manifest).unwrap();
        }
        let bytes = pack_dir(&m, &Limits::default()).unwrap().bytes;
        self.hub.publish(&bytes, None, None).unwrap().record.digest
    }

    /// A node with a gateway listening on loopback; returns its URL.
    pub async fn node(&self, id: &str, config: GatewayConfig) -> String {
        self.node_with(id, config, tessera_node::NodePolicy::open(), None).await
    }

    pub async fn node_with(
        &self,
        id: &str,
        config: GatewayConfig,
        policy: tessera_node::NodePolicy,
        identity: Option<Arc<tessera_identity::KeyPair>>,
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let wasm = WasmRuntime::new(WasmLimits {
            max_memory: 128 << 20,
            max_time: Duration::from_secs(30),
            max_output_bytes: 1 << 20,
        })
        .unwrap();
        let runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(wasm), Arc::new(BuiltinRuntime::new())];
        let mut cfg = NodeConfig::new(id, self.dir.path().join(id));
        cfg.endpoint = Some(url.clone());
        cfg.policy = policy;
        cfg.identity = identity;
        let ports = NodePorts { backend: self.backend.clone(), source: Arc::new(LocalHub(self.hub.clone())) };
        let node = Arc::new(Node::new(cfg, ports, runtimes).unwrap());
        node.register().await.unwrap();
        let actors = Arc::new(Actors::new(node.clone(), None));
        let gw = Gateway::new(node, actors, config);
        tokio::spawn(async move { axum::serve(listener, app(gw)).await.unwrap() });
        url
    }

    pub async fn post(&self, url: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(url).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn call(&self, base: &str, body: Value) -> (u16, Value) {
        self.post(&format!("{base}/api/v1/call"), body).await
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                super::$name($crate::common::On::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name($crate::common::On::Nats).await
            }
        }
    )*};
}

/// Keys for policy tests: the node's, and a key with a grant.
pub fn key() -> Arc<tessera_identity::KeyPair> {
    Arc::new(tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519))
}
