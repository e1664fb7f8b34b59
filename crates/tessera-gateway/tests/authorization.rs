//! One authorization step on every gateway route: for every route the router serves
//! (listed from its OpenAPI document, which the router is built from), a signed key without
//! a grant changes nothing and reads nothing private, on both backends. A route without a
//! case here fails the test. Then the reproductions: eviction by an ungranted launch,
//! another key's queue, call and output, numbers that used to panic.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, On, cluster, key};
use serde_json::{Value, json};
use tessera_client::gateway::GatewayClient;
use tessera_gateway::GatewayConfig;
use tessera_identity::envelope::HEADER;
use tessera_identity::{Envelope, KeyPair, now_ms};
use tessera_node::{Grant, NodePolicy};

on_both_backends!(
    a_key_without_a_grant_changes_nothing_and_reads_nothing_on_any_route,
    ungranted_launches_evict_nothing,
    extreme_numbers_do_not_panic
);

struct Node {
    url: String,
    node_key: Arc<KeyPair>,
    alice: Arc<KeyPair>,
    mallory: Arc<KeyPair>,
}

/// A node that takes only signed requests; alice may use `demo.*` modules and the `demo.jobs`
/// queue; mallory has a valid key and no grant.
async fn policy_node(c: &Cluster, config: GatewayConfig) -> Node {
    c.publish("demo.counter", "wasm", "module.wasm");
    let (node_key, alice, mallory) = (key(), key(), key());
    let policy = NodePolicy {
        require_signed_tasks: true,
        grants: vec![Grant {
            to: alice.public().clone(),
            modules: vec!["demo".into()],
            datasets: vec![],
            queues: vec!["demo.jobs".into(), "*".into()],
            max_priority: 0,
            max_replicas: 4,
            expires: None,
        }],
        ..NodePolicy::open()
    };
    let url = c.node_with("n1", config, policy, Some(node_key.clone())).await;
    Node { url, node_key, alice, mallory }
}

impl Node {
    fn client(&self, k: &Arc<KeyPair>) -> GatewayClient {
        GatewayClient::new(&self.url).unwrap().with_signer(k.clone())
    }
    /// A request signed by `k` for this node.
    fn signed(&self, c: &Cluster, k: &KeyPair, method: &str, path: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
        let env = Envelope::sign(k, self.node_key.public(), method, path, &body, now_ms());
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        c.http
            .request(m, format!("{}{path}", self.url))
            .header(HEADER, env.to_header())
            .header("content-type", "application/json")
            .body(body)
    }
}

async fn a_key_without_a_grant_changes_nothing_and_reads_nothing_on_any_route(on: On) {
    let c = cluster(on).await;
    let config = GatewayConfig { inline_limit: 1024, ..GatewayConfig::default() };
    let n = policy_node(&c, config).await;
    let alice = n.client(&n.alice);
    // Alice's things: an actor whose output is a blob, messages on two queues, a long call.
    let launch = tessera_core::wire::LaunchRequest {
        module: "demo.counter".into(),
        tag: Some("big".into()),
        replicas: 1,
        config: json!({"bytes": 4000}),
        priority: 0,
        node: None,
    };
    alice.launch(&launch).await.unwrap();
    let r = alice.call(&tessera_core::wire::CallRequest::new("demo.counter-big", "big-output", vec![])).await.unwrap();
    let digest = r.outputs["big"].digest.expect("a blob");
    alice.queue_put("demo.jobs", &json!({"job": 1})).await.unwrap();
    alice.queue_put("demo.counter-big.in", &json!({"item": 1})).await.unwrap();
    let long = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut req = tessera_core::wire::CallRequest::new("demo.counter-big", "spin", vec![]);
            req.id = Some("long-1".into());
            req.timeout = Some(30.0);
            alice.call(&req).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // What alice sees; a stranger's request must leave it as it is.
    let state = || async {
        let actors: Vec<(String, u64)> = alice.actors().await.unwrap().into_iter().map(|a| (a.name, a.calls)).collect();
        let jobs = alice.queue_len("demo.jobs").await.unwrap();
        let inbox = alice.queue_len("demo.counter-big.in").await.unwrap();
        json!({"actors": actors, "jobs": jobs, "inbox": inbox, "long running": !long.is_finished()})
    };
    let before = state().await;
    assert_eq!(before["long running"], true);

    let m = &n.mallory;
    let call = serde_json::to_vec(&json!({"module": "demo.counter-big", "function": "count"})).unwrap();
    let evict = serde_json::to_vec(&json!({"module": "demo.counter", "tag": "evil", "priority": 1000})).unwrap();
    let refused = &[403u16][..];
    let mut cases: BTreeMap<&str, (reqwest::RequestBuilder, &[u16])> = BTreeMap::new();
    cases.insert("GET /api/v1/health", (c.http.get(format!("{}/api/v1/health", n.url)), &[200]));
    cases.insert("POST /api/v1/call", (n.signed(&c, m, "POST", "/api/v1/call", call.clone()), refused));
    cases.insert("POST /call", (n.signed(&c, m, "POST", "/call", call.clone()), refused));
    cases.insert(
        "POST /api/v1/calls/{id}/cancel",
        (n.signed(&c, m, "POST", "/api/v1/calls/long-1/cancel", vec![]), &[404]),
    );
    cases.insert("GET /api/v1/actors", (n.signed(&c, m, "GET", "/api/v1/actors", vec![]), &[200]));
    cases.insert("POST /api/v1/actors", (n.signed(&c, m, "POST", "/api/v1/actors", evict), refused));
    cases.insert(
        "GET /api/v1/actors/{name}",
        (n.signed(&c, m, "GET", "/api/v1/actors/demo.counter-big", vec![]), refused),
    );
    cases.insert(
        "DELETE /api/v1/actors/{name}",
        (n.signed(&c, m, "DELETE", "/api/v1/actors/demo.counter-big", vec![]), refused),
    );
    cases.insert("GET /api/v1/queues/{name}", (n.signed(&c, m, "GET", "/api/v1/queues/demo.jobs", vec![]), refused));
    cases.insert(
        "POST /api/v1/queues/{name}",
        (n.signed(&c, m, "POST", "/api/v1/queues/demo.jobs", b"{\"job\": 666}".to_vec()), refused),
    );
    cases.insert(
        "POST /api/v1/queues/{name}/get",
        (n.signed(&c, m, "POST", "/api/v1/queues/demo.counter-big.in/get?wait=0.1", vec![]), refused),
    );
    cases.insert(
        "GET /api/v1/blobs/{digest}",
        (n.signed(&c, m, "GET", &format!("/api/v1/blobs/{digest}"), vec![]), &[404]),
    );

    let doc = tessera_gateway::openapi();
    let served: BTreeSet<String> = doc
        .paths
        .paths
        .iter()
        .flat_map(|(p, item)| {
            let mut methods = Vec::new();
            for (m, op) in [("GET", &item.get), ("POST", &item.post), ("PUT", &item.put), ("DELETE", &item.delete)] {
                if op.is_some() {
                    methods.push(format!("{m} {p}"));
                }
            }
            methods
        })
        .collect();
    let covered: BTreeSet<String> = cases.keys().map(|s| s.to_string()).collect();
    assert_eq!(served, covered, "every gateway route needs a case here (and every case a route)");

    for (route, (req, allowed)) in cases {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(allowed.contains(&status), "{route}: {status} {text}");
        assert!(!text.contains("demo.counter-big") || status != 200, "{route} showed alice's actor: {text}");
        assert!(!body.windows(16).any(|w| w == [7u8; 16]), "{route} served alice's output");
        assert!(!text.contains("\"job\""), "{route} served alice's message");
        assert_eq!(state().await, before, "{route} changed something");
    }
    // Unsigned, every route but health is refused before anything happens.
    for (method, path) in [
        ("POST", "/api/v1/call"),
        ("POST", "/api/v1/calls/long-1/cancel"),
        ("GET", "/api/v1/actors"),
        ("DELETE", "/api/v1/actors/demo.counter-big"),
        ("POST", "/api/v1/queues/demo.jobs/get"),
        ("GET", &format!("/api/v1/blobs/{digest}")),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let s = c.http.request(m, format!("{}{path}", n.url)).body(call.clone()).send().await.unwrap().status();
        assert_eq!(s.as_u16(), 401, "{method} {path}");
    }
    assert_eq!(state().await, before);
    // Alice still reads her own output, and cancels her own call.
    assert_eq!(alice.blob(&digest).await.unwrap().len(), 4000);
    alice.cancel("long-1").await.unwrap();
    assert!(long.await.unwrap().unwrap_err().to_string().contains("cancelled"));
}

/// A launch the caller was not granted never evicts anything; a granted one evicts only
/// actors whose release frees what it lacks.
async fn ungranted_launches_evict_nothing(on: On) {
    let c = cluster(on).await;
    let n = policy_node(&c, GatewayConfig::default()).await;
    let alice = n.client(&n.alice);
    let launch = |tag: &str, priority: i32| tessera_core::wire::LaunchRequest {
        module: "demo.counter".into(),
        tag: Some(tag.into()),
        replicas: 1,
        config: json!({}),
        priority,
        node: None,
    };
    alice.launch(&launch("a", 0)).await.unwrap();
    let e = n.client(&n.mallory).launch(&launch("evil", 1000)).await.unwrap_err();
    assert_eq!(e.kind(), Some("refused"), "{e}");
    // A granted key launches within its grant: priority and replicas are capped.
    let e = alice.launch(&launch("b", 5)).await.unwrap_err();
    assert!(e.kind() == Some("refused") && e.to_string().contains("priority 5"), "{e}");
    let mut many = launch("b", 0);
    many.replicas = 5;
    let e = alice.launch(&many).await.unwrap_err();
    assert!(e.kind() == Some("refused") && e.to_string().contains("5 replicas"), "{e}");
    // A tag may not make another module's actor name (and take its queues and state).
    c.publish("demo.counter-x", "wasm", "module.wasm");
    let e = alice.launch(&launch("x", 0)).await.unwrap_err();
    assert!(e.to_string().contains("is the name of the module demo.counter-x"), "{e}");
    // Get-or-create with another config is refused, not answered with the running actor.
    let mut other = launch("a", 0);
    other.config = json!({"bytes": 7});
    let e = alice.launch(&other).await.unwrap_err();
    assert!(e.kind() == Some("conflict") && e.to_string().contains("config"), "{e}");
    let names: Vec<String> = alice.actors().await.unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["demo.counter-a"]);
    // Tessera's own queues are out of reach, even with a grant for every queue.
    let e = alice.queue_get("tessera.node.n1.tasks", Duration::from_millis(10)).await.unwrap_err();
    assert!(e.kind() == Some("refused") && e.to_string().contains("Tessera's own queues"), "{e}");
}

/// Numbers that used to panic a handler: a call time-out of 1e20 s, a signature timestamp
/// at the end of time.
async fn extreme_numbers_do_not_panic(on: On) {
    let c = cluster(on).await;
    let n = policy_node(&c, GatewayConfig::default()).await;
    let alice = n.client(&n.alice);
    let mut req = tessera_core::wire::CallRequest::new("demo.counter", "count", vec![]);
    req.timeout = Some(1e20);
    assert_eq!(alice.call(&req).await.unwrap().result, json!(1), "cut to the longest time-out");
    for t in [f64::MAX, f64::MIN_POSITIVE, 1e-300] {
        req.timeout = Some(t);
        let r = alice.call(&req).await;
        assert!(
            r.is_ok()
                || r.as_ref().unwrap_err().kind() == Some("bad_request")
                || r.as_ref().unwrap_err().kind() == Some("timeout"),
            "{t}: {r:?}"
        );
    }
    let body = serde_json::to_vec(&json!({"module": "demo.counter", "function": "count"})).unwrap();
    for ts in [u64::MAX, 0] {
        let env = Envelope::sign(&n.alice, n.node_key.public(), "POST", "/api/v1/call", &body, ts);
        let s = c
            .http
            .post(format!("{}/api/v1/call", n.url))
            .header(HEADER, env.to_header())
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s.as_u16(), 401, "ts {ts}");
    }
    let v: Value = c.http.get(format!("{}/api/v1/health", n.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "ok", "the gateway still answers");
}

/// Bodies the fuzzer (`fuzz/fuzz_targets/gateway_call.rs`) found: each is refused cleanly.
#[test]
fn bodies_found_by_fuzzing_are_refused() {
    let config = GatewayConfig::default();
    let bodies: &[&[u8]] = &[
        include_bytes!("fixtures/call-timeout-rounds-to-zero.json"),
        br#"{"module": "a", "function": "f", "timeout": 5e-324}"#,
    ];
    for body in bodies {
        let e = tessera_gateway::check_call(body, &config).unwrap_err();
        assert_eq!(e.status().as_u16(), 400, "{e}");
    }
}
