//! The gateway over real HTTP: calls (by name, spawning, forwarding), bad calls, large
//! results, cancellation, queues, and two nodes sharing one cluster, on both backends.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::{On, cluster};
use serde_json::{Value, json};
use tessera_gateway::GatewayConfig;

on_both_backends!(calls_launch_and_bad_calls, two_nodes_share_names_and_forward_calls, bounded_queues);

/// A node whose policy wants signed requests: unsigned, unknown, replayed and misaddressed
/// requests are refused; a key with a grant calls, launches, kills and uses queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_policy_takes_only_signed_granted_requests() {
    use tessera_client::gateway::GatewayClient;
    use tessera_identity::{Envelope, KeyPair, KeyType, now_ms};
    use tessera_node::{Grant, NodePolicy};
    let c = cluster(On::Memory).await;
    c.publish("demo.counter", "wasm", "module.wasm");
    c.publish("other.counter", "wasm", "module.wasm");
    let node_key = Arc::new(KeyPair::generate(KeyType::Ed25519));
    let alice = Arc::new(KeyPair::generate(KeyType::Ed25519));
    let mallory = Arc::new(KeyPair::generate(KeyType::Ed25519));
    let policy = NodePolicy {
        require_signed_tasks: true,
        grants: vec![Grant {
            to: alice.public().clone(),
            modules: vec!["demo".into()],
            datasets: vec![],
            queues: vec!["demo.q".into()],
            max_priority: 0,
            max_replicas: 4,
            expires: None,
        }],
        ..NodePolicy::open()
    };
    let gw = c.node_with("n1", GatewayConfig::default(), policy, Some(node_key.clone())).await;
    let body = json!({"module": "demo.counter", "function": "count"});

    // Unsigned: refused, nothing launched.
    let (s, r) = c.call(&gw, body.clone()).await;
    assert_eq!((s, r["kind"].clone()), (401, json!("unauthorized")), "{r}");
    let (s, _) = c.post(&format!("{gw}/api/v1/queues/demo.q"), json!(1)).await;
    assert_eq!(s, 401);
    let s = c.http.get(format!("{gw}/api/v1/actors")).send().await.unwrap().status().as_u16();
    assert_eq!(s, 401, "every route but health wants a signature here");

    // A key without a grant: refused.
    let m = GatewayClient::new(&gw).unwrap().with_signer(mallory.clone());
    assert_eq!(
        GatewayClient::new(&gw).unwrap().with_signer(alice.clone()).actors().await.unwrap(),
        vec![],
        "a refused call launches nothing"
    );
    let e = m.actor("demo.counter").call("count", vec![]).await.unwrap_err();
    assert_eq!(e.kind(), Some("refused"), "{e}");
    assert!(e.to_string().contains("no grant"), "{e}");

    // Alice: her grant covers demo.*, not other.*.
    let a = GatewayClient::new(&gw).unwrap().with_signer(alice.clone());
    assert_eq!(a.actor("demo.counter").call("count", vec![]).await.unwrap(), json!(1));
    assert_eq!(a.actor("demo.counter").call("count", vec![]).await.unwrap(), json!(2));
    let e = a.actor("other.counter").call("count", vec![]).await.unwrap_err();
    assert_eq!(e.kind(), Some("refused"), "{e}");
    let e = m.kill("demo.counter").await.unwrap_err();
    assert_eq!(e.kind(), Some("refused"), "{e}");
    a.queue_put("demo.q", &json!({"x": 1})).await.unwrap();
    assert_eq!(a.queue_get("demo.q", Duration::from_secs(1)).await.unwrap(), Some(json!({"x": 1})));

    // A captured request cannot be replayed, changed, or sent to another node.
    let bytes = serde_json::to_vec(&body).unwrap();
    let env = Envelope::sign(&alice, node_key.public(), "POST", "/api/v1/call", &bytes, now_ms()).to_header();
    let send = |b: Vec<u8>, h: String| {
        c.http
            .post(format!("{gw}/api/v1/call"))
            .header(tessera_identity::envelope::HEADER, h)
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    assert_eq!(send(bytes.clone(), env.clone()).await.unwrap().status().as_u16(), 200);
    let replay = send(bytes.clone(), env.clone()).await.unwrap();
    assert_eq!(replay.status().as_u16(), 401, "replayed");
    let changed = serde_json::to_vec(&json!({"module": "demo.counter", "function": "spin"})).unwrap();
    let env2 = Envelope::sign(&alice, node_key.public(), "POST", "/api/v1/call", &bytes, now_ms()).to_header();
    assert_eq!(send(changed, env2).await.unwrap().status().as_u16(), 401, "body changed");
    let elsewhere = KeyPair::generate(KeyType::Ed25519);
    let env3 = Envelope::sign(&alice, elsewhere.public(), "POST", "/api/v1/call", &bytes, now_ms()).to_header();
    assert_eq!(send(bytes.clone(), env3).await.unwrap().status().as_u16(), 401, "addressed to another node");
    let stale = Envelope::sign(&alice, node_key.public(), "POST", "/api/v1/call", &bytes, now_ms() - 600_000);
    assert_eq!(send(bytes.clone(), stale.to_header()).await.unwrap().status().as_u16(), 401, "stale");
    assert_eq!(send(bytes.clone(), "garbage".into()).await.unwrap().status().as_u16(), 401);
    // State hooks are the node's, not callers'.
    let e = a.actor("demo.counter").call("restore_state", vec![]).await.unwrap_err();
    assert_eq!(e.kind(), Some("bad_request"), "{e}");
    // After all that, the counter moved only for the accepted calls.
    assert_eq!(a.actor("demo.counter").call("count", vec![]).await.unwrap(), json!(4));
    a.kill("demo.counter").await.unwrap();
}

fn small_inline() -> GatewayConfig {
    GatewayConfig { inline_limit: 1024, queue_capacity: 3, max_body: 64 << 10, ..GatewayConfig::default() }
}

async fn calls_launch_and_bad_calls(on: On) {
    let c = cluster(on).await;
    c.publish("demo.counter", "wasm", "module.wasm");
    c.publish("demo.echo", "builtin", "echo");
    let gw = c.node("n1", small_inline()).await;

    // A call to a module that is not running launches it; the actor keeps its state.
    let (s, r) = c.call(&gw, json!({"module": "demo.counter", "function": "count"})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["result"], 1);
    assert_eq!(r["actor"], "demo.counter");
    assert_eq!(r["node"], "n1");
    let (_, r) = c.call(&gw, json!({"module": "demo.counter", "function": "count"})).await;
    assert_eq!(r["result"], 2);
    // The root `/call` route is the same.
    let (s, r) = c.post(&format!("{gw}/call"), json!({"module": "demo.counter", "function": "count"})).await;
    assert_eq!((s, r["result"].clone()), (200, json!(3)));

    // A native actor: JSON arguments in, JSON result out, binary inputs passed through.
    let x = base64::engine::general_purpose::STANDARD.encode(b"\x00\x01binary");
    let (s, r) = c
        .call(&gw, json!({"module": "demo.echo", "function": "echo", "args": [{"k": [1, 2]}], "inputs": {"x": x}}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["result"], json!({"k": [1, 2]}));
    assert_eq!(r["outputs"]["x"]["kind"], "bytes");
    assert_eq!(r["outputs"]["x"]["inline"], x);

    // Launch through the API: a tagged actor with its own config; get-or-create.
    let launch = json!({"module": "demo.counter@0.1.0", "tag": "big", "config": {"bytes": 4000}});
    let (s, a) = c.post(&format!("{gw}/api/v1/actors"), launch.clone()).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["name"], "demo.counter-big");
    let (s, _) = c.post(&format!("{gw}/api/v1/actors"), launch).await;
    assert_eq!(s, 200);
    let list: Value = c.http.get(format!("{gw}/api/v1/actors")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["demo.counter", "demo.counter-big", "demo.echo"]);

    // A result larger than the inline limit goes to the blob store.
    let (s, r) = c.call(&gw, json!({"module": "demo.counter-big", "function": "big-output"})).await;
    assert_eq!(s, 200, "{r}");
    let out = &r["outputs"]["big"];
    assert_eq!(out["size"], 4000);
    assert!(out.get("inline").is_none());
    let digest = out["digest"].as_str().unwrap();
    let blob = c.http.get(format!("{gw}/api/v1/blobs/{digest}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&blob[..], &[7u8; 4000][..]);

    // Bad calls: clear errors, and the actor stays up with its state.
    let bad: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"module": "demo.nothing", "function": "f"}), 404, "not_found", "demo.nothing"),
        (json!({"module": "demo.counter", "function": "nope"}), 422, "module_error", "nope"),
        (json!({"module": "demo.counter", "function": "count", "args": {"a": 1}}), 400, "bad_request", "args"),
        (json!({"module": "demo.counter", "function": "bad name"}), 400, "bad_request", "function"),
        (json!({"module": "demo.counter", "function": "count", "inputs": {"x": "%%%"}}), 400, "bad_request", "base64"),
        (json!({"module": "demo.counter", "function": "count", "colour": 1}), 400, "bad_request", "colour"),
        (json!({"module": "demo.counter", "function": "count", "timeout": -1}), 400, "bad_request", "timeout"),
        (json!({"module": "../etc", "function": "count"}), 400, "bad_request", "actor name"),
        (json!({"module": "demo.counter", "function": "panic"}), 500, "crashed", "panic"),
        (json!({"module": "demo.counter", "function": "spin", "timeout": 0.3}), 504, "timeout", "timed out"),
        (json!({"module": "demo.counter-huge", "function": "big-output"}), 404, "not_found", "demo.counter-huge"),
    ];
    for (body, status, kind, needle) in bad {
        let (s, r) = c.call(&gw, body.clone()).await;
        assert_eq!(s, status, "{body}: {r}");
        assert_eq!(r["kind"], kind, "{body}: {r}");
        assert!(r["error"].as_str().unwrap().contains(needle), "{body}: {r}");
    }
    let (s, r) = c.call(&gw, json!({"module": "demo.counter", "function": "count"})).await;
    assert_eq!((s, r["result"].clone()), (200, json!(4)), "the actor kept its state through the bad calls");
    // An output over the runtime's limit is an error, not a truncated answer.
    let (s, _) = c
        .post(
            &format!("{gw}/api/v1/actors"),
            json!({"module": "demo.counter", "tag": "huge", "config": {"bytes": 2 << 20}}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, r) = c.call(&gw, json!({"module": "demo.counter-huge", "function": "big-output"})).await;
    assert!(s >= 400 && r["error"].as_str().unwrap().contains("limit"), "{s} {r}");
    // Malformed and oversized bodies.
    let r = c.http.post(format!("{gw}/api/v1/call")).body("{not json").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let huge = json!({"module": "demo.counter", "function": "count", "args": ["x".repeat(100 << 10)]});
    let r = c.http.post(format!("{gw}/api/v1/call")).json(&huge).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413, "over the body limit");
    let r = c.http.post(format!("{gw}/api/v1/queues/demo.big")).json(&huge).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // Cancellation: a long call with an id is stopped by its cancel route.
    let long = {
        let (http, gw) = (c.http.clone(), gw.clone());
        tokio::spawn(async move {
            http.post(format!("{gw}/api/v1/call"))
                .json(&json!({"module": "demo.counter", "function": "spin", "id": "long-1", "timeout": 60}))
                .send()
                .await
                .unwrap()
        })
    };
    let mut cancelled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, _) = c.post(&format!("{gw}/api/v1/calls/long-1/cancel"), json!({})).await;
        if s == 200 {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the call never showed up as running");
    let r = long.await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["kind"], "cancelled");
    let (s, _) = c.post(&format!("{gw}/api/v1/calls/long-1/cancel"), json!({})).await;
    assert_eq!(s, 404);
    let info: Value =
        c.http.get(format!("{gw}/api/v1/actors/demo.counter")).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["busy"], 0, "a cancelled call no longer counts as running: {info}");
    // The actor answers again (a fresh replica with the saved state).
    let (s, r) = c.call(&gw, json!({"module": "demo.counter", "function": "count"})).await;
    assert_eq!((s, r["result"].clone()), (200, json!(5)));

    // Kill.
    let r = c.http.delete(format!("{gw}/api/v1/actors/demo.counter-big")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = c.http.delete(format!("{gw}/api/v1/actors/demo.counter-big")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

async fn two_nodes_share_names_and_forward_calls(on: On) {
    let c = cluster(on).await;
    c.publish("demo.counter", "wasm", "module.wasm");
    let key = || Some(Arc::new(tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519)));
    let open = tessera_node::NodePolicy::open;
    let a = c.node_with("na", GatewayConfig::default(), open(), key()).await;
    let b = c.node_with("nb", GatewayConfig::default(), open(), key()).await;
    // Launched on node b through node a's gateway.
    let (s, info) =
        c.post(&format!("{a}/api/v1/actors"), json!({"module": "demo.counter", "tag": "1", "node": "nb"})).await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["node"], "nb");
    // The same name launched on a: get-or-create across the cluster gives b's actor.
    let (s, again) = c.post(&format!("{a}/api/v1/actors"), json!({"module": "demo.counter", "tag": "1"})).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["node"], "nb");
    // Calls through either gateway reach the one actor.
    for (gw, expected) in [(&a, 1), (&b, 2), (&a, 3)] {
        let (s, r) = c.call(gw, json!({"module": "demo.counter-1", "function": "count"})).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!((r["node"].clone(), r["result"].clone()), (json!("nb"), json!(expected)));
    }
    // The cluster-wide list shows it once, on b.
    let list: Value = c.http.get(format!("{a}/api/v1/actors")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["node"], "nb");
    let local: Value = c.http.get(format!("{a}/api/v1/actors?scope=local")).send().await.unwrap().json().await.unwrap();
    assert_eq!(local, json!([]));
    // A signed call is addressed to the node it reaches: it is not forwarded, and the
    // answer says where to send it.
    let me = Arc::new(tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519));
    let signed = tessera_client::gateway::GatewayClient::new(&a).unwrap().with_signer(me.clone());
    let e = signed.actor("demo.counter-1").call("count", vec![]).await.unwrap_err();
    assert_eq!(e.kind(), Some("elsewhere"), "{e}");
    assert!(e.to_string().contains("nb") && e.to_string().contains(&b), "{e}");
    let at_b = tessera_client::gateway::GatewayClient::new(&b).unwrap().with_signer(me);
    assert_eq!(at_b.actor("demo.counter-1").call("count", vec![]).await.unwrap(), json!(4));
    // Killed through a: it stops on b.
    let r = c.http.delete(format!("{a}/api/v1/actors/demo.counter-1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let list: Value = c.http.get(format!("{b}/api/v1/actors")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list, json!([]));
    // Launching on a node that does not exist names it.
    let (s, r) = c.post(&format!("{a}/api/v1/actors"), json!({"module": "demo.counter", "node": "nz"})).await;
    assert_eq!(s, 404, "{r}");
    assert!(r["error"].as_str().unwrap().contains("nz"));
}

async fn bounded_queues(on: On) {
    let c = cluster(on).await;
    let gw = c.node("n1", small_inline()).await;
    let q = format!("{gw}/api/v1/queues/demo.model.in");
    for i in 0..3 {
        let (s, r) = c.post(&q, json!({"item": i})).await;
        assert_eq!(s, 201, "{r}");
    }
    let (s, r) = c.post(&q, json!({"item": 3})).await;
    assert_eq!((s, r["kind"].clone()), (429, json!("queue_full")), "bounded: {r}");
    let len: Value = c.http.get(&q).send().await.unwrap().json().await.unwrap();
    assert_eq!((len["len"].clone(), len["capacity"].clone()), (json!(3), json!(3)));
    let (s, r) = c.post(&format!("{q}/get?wait=1"), json!(null)).await;
    assert_eq!((s, r), (200, json!({"item": 0})));
    let (s, _) = c.post(&q, json!({"item": 3})).await;
    assert_eq!(s, 201, "room again after a get");
    for i in 1..4 {
        let (_, r) = c.post(&format!("{q}/get?wait=1"), json!(null)).await;
        assert_eq!(r, json!({"item": i}));
    }
    let r = c.http.post(format!("{q}/get?wait=0.1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204, "empty");
    // Bad input.
    let r = c.http.post(&q).body("not json").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c.http.post(format!("{gw}/api/v1/queues/a..b")).json(&json!(1)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c.http.post(format!("{q}/get?wait=abc")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // Bounded in bytes too: 100 bytes hold two 40-byte messages, not a third.
    let tight = GatewayConfig { queue_max_bytes: 100, ..GatewayConfig::default() };
    let gw2 = c.node("n2", tight).await;
    let q = format!("{gw2}/api/v1/queues/demo.bytes");
    let forty = json!("x".repeat(38));
    for _ in 0..2 {
        let (s, r) = c.post(&q, forty.clone()).await;
        assert_eq!(s, 201, "{r}");
    }
    let (s, r) = c.post(&q, forty.clone()).await;
    assert_eq!((s, r["kind"].clone()), (429, json!("queue_full")), "{r}");
    assert!(r["error"].as_str().unwrap().contains("bytes"), "{r}");
    let (s, r) = c.post(&format!("{gw2}/api/v1/queues/demo.other"), json!("y".repeat(200))).await;
    assert_eq!((s, r["kind"].clone()), (413, json!("too_large")), "a message over the whole bound: {r}");
    let (s, _) = c.post(&format!("{q}/get?wait=1"), json!(null)).await;
    assert_eq!(s, 200);
    let (s, r) = c.post(&q, forty).await;
    assert_eq!(s, 201, "room again after a get: {r}");
}
