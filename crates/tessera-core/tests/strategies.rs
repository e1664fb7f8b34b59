//! The strategies against Flower's own numbers (`tests/fixtures/flower.json`, written by
//! `bench/flower_fixtures.py` with flwr 1.41), hostile input, resuming from saved state and
//! Byzantine participants.

use serde_json::{Value, json};
use tessera_core::select::SplitMix64;
use tessera_core::strategy::{FitFailure, FitResult, Participation, STRATEGIES, Strategy, StrategyError, from_config};
use tessera_core::tensor::{Tensor, Tensors};

const FIXTURE: &str = include_str!("fixtures/flower.json");

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).expect("the fixture is JSON")
}

fn tensors(v: &Value) -> Tensors {
    let mut t = Tensors::default();
    for (name, x) in v.as_object().expect("tensors object") {
        let shape = x["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let data = x["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap() as f32).collect();
        t.0.insert(name.clone(), Tensor { shape, data });
    }
    t
}

fn results(clients: &Value) -> Vec<FitResult> {
    clients
        .as_array()
        .unwrap()
        .iter()
        .map(|c| FitResult {
            node: c["node"].as_str().unwrap().into(),
            update: tensors(&c["tensors"]),
            num_examples: c["num_examples"].as_u64().unwrap(),
        })
        .collect()
}

/// Lets every round through: the fixtures have 5 to 8 clients.
fn lenient() -> Participation {
    Participation { min_fit: 1, min_available: 1, ..Participation::default() }
}

fn strategy(name: &str, params: &Value) -> Box<dyn Strategy> {
    from_config(name, params, lenient()).unwrap_or_else(|e| panic!("{name} {params}: {e}"))
}

/// `|got - want| <= 1e-5 * |want| + 1e-6` for every value: f32 against Flower's float64.
/// Returns the largest relative difference, for the record (`--nocapture`).
fn assert_close(got: &Tensors, want: &Tensors, what: &str) -> f64 {
    assert!(want.check_same_layout(got).is_ok(), "{what}: layout");
    let mut worst = 0.0f64;
    for (name, w) in &want.0 {
        for (i, (&g, &e)) in got.0[name].data.iter().zip(&w.data).enumerate() {
            let tol = 1e-5 * e.abs() + 1e-6;
            assert!((g - e).abs() <= tol, "{what}: {name}[{i}] = {g}, Flower gives {e}");
            worst = worst.max(f64::from((g - e).abs()) / f64::from(e.abs()).max(1e-3));
        }
    }
    eprintln!("{what}: largest relative difference {worst:.1e}");
    worst
}

#[test]
fn single_rounds_match_flower() {
    let fx = fixture();
    let cases = &fx["cases"];
    let mut seen = std::collections::BTreeSet::new();
    for entry in fx["single_round"].as_array().unwrap() {
        let name = entry["strategy"].as_str().unwrap();
        let params = &entry["params"];
        let case = entry["case"].as_str().unwrap();
        let rs = results(&cases[case]);
        let want = tensors(&entry["expected"]);
        let what = format!("{name} {params} on {case} (Flower: {})", entry["flower"]);
        // Without a current model (the layout comes from the first result) and with one.
        let mut s = strategy(name, params);
        let got = s.aggregate_fit(1, &Tensors::default(), &rs, &[]).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&got, &want, &what);
        let mut s = strategy(name, params);
        let again = s.aggregate_fit(1, &rs[0].update, &rs, &[]).unwrap();
        assert_eq!(got, again, "{what}");
        // The arrival order does not matter.
        let mut reversed = rs.clone();
        reversed.reverse();
        let mut s = strategy(name, params);
        assert_eq!(s.aggregate_fit(1, &Tensors::default(), &reversed, &[]).unwrap(), got, "{what}: order");
        seen.insert(name.to_string());
    }
    for name in ["fedavg", "fedprox", "fedavgm", "fedmedian", "fedtrimmedavg", "krum", "bulyan"] {
        assert!(seen.contains(name), "no fixture for {name}");
    }
}

#[test]
fn krum_returns_one_of_the_models() {
    let fx = fixture();
    for entry in fx["single_round"].as_array().unwrap() {
        if entry["strategy"] != "krum" || entry["params"]["num_clients_to_keep"] != 0 {
            continue;
        }
        let rs = results(&fx["cases"][entry["case"].as_str().unwrap()]);
        let got = strategy("krum", &entry["params"]).aggregate_fit(1, &Tensors::default(), &rs, &[]).unwrap();
        assert!(rs.iter().any(|r| r.update == got), "Krum picks a model, bit for bit");
    }
}

#[test]
fn server_optimisers_match_flower_over_rounds() {
    let fx = fixture();
    let mut seen = std::collections::BTreeSet::new();
    for entry in fx["multi_round"].as_array().unwrap() {
        let name = entry["strategy"].as_str().unwrap();
        let params = &entry["params"];
        let mut s = strategy(name, params);
        let mut current = tensors(&entry["initial"]);
        for r in entry["rounds"].as_array().unwrap() {
            let round = r["round"].as_u64().unwrap() as u32;
            let what = format!("{name} {params} round {round} (Flower: {})", entry["flower"]);
            let got = s
                .aggregate_fit(round, &current, &results(&r["clients"]), &[])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_close(&got, &tensors(&r["expected"]), &what);
            current = got;
        }
        seen.insert(name.to_string());
    }
    for name in ["fedadagrad", "fedadam", "fedyogi", "fedavgm"] {
        assert!(seen.contains(name), "no fixture for {name}");
    }
}

#[test]
fn evaluation_matches_flower() {
    let fx = fixture();
    let s = strategy("fedavg", &Value::Null);
    for entry in fx["evaluate"].as_array().unwrap() {
        let rs: Vec<(u64, f64, Option<f64>)> = entry["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap(), r[1].as_f64().unwrap(), None))
            .collect();
        let (loss, acc) = s.aggregate_evaluate(&rs).unwrap();
        let want = entry["expected_loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-12 * want.abs(), "{loss} against Flower's {want}");
        assert_eq!(acc, None);
    }
}

/// Runs the fixture's rounds for every server optimiser twice: straight through, and with a
/// crash after round 1 (state saved, a fresh instance restored). The models must be identical.
#[test]
fn resumed_sessions_give_bit_identical_models() {
    let fx = fixture();
    for entry in fx["multi_round"].as_array().unwrap() {
        let name = entry["strategy"].as_str().unwrap();
        let params = &entry["params"];
        let rounds: Vec<(u32, Vec<FitResult>)> = entry["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["round"].as_u64().unwrap() as u32, results(&r["clients"])))
            .collect();
        let initial = tensors(&entry["initial"]);

        let mut straight = strategy(name, params);
        let mut models = vec![];
        let mut current = initial.clone();
        for (round, rs) in &rounds {
            current = straight.aggregate_fit(*round, &current, rs, &[]).unwrap();
            models.push(current.clone());
        }

        let mut first = strategy(name, params);
        let after_one = first.aggregate_fit(rounds[0].0, &initial, &rounds[0].1, &[]).unwrap();
        let saved = first.state();
        drop(first);
        let mut resumed = strategy(name, params);
        resumed.restore(&saved).unwrap();
        assert_eq!(resumed.state(), saved, "{name}: the state round-trips");
        let mut current = after_one;
        for (k, (round, rs)) in rounds.iter().enumerate().skip(1) {
            current = resumed.aggregate_fit(*round, &current, rs, &[]).unwrap();
            assert_eq!(current, models[k], "{name} {params}: round {round} after a restore");
        }
        assert_eq!(resumed.state(), straight.state(), "{name}: same final state");

        // A round already aggregated is refused rather than applied twice.
        let e = resumed.aggregate_fit(rounds[1].0, &current, &rounds[1].1, &[]).unwrap_err();
        assert!(matches!(e, StrategyError::RoundOrder { .. }), "{name}: {e}");
    }
}

#[test]
fn state_from_elsewhere_is_refused() {
    let mut adam = strategy("fedadam", &Value::Null);
    let m = model(&[("w", &[1.0, 2.0])]);
    adam.aggregate_fit(1, &m, &[res("a", &[("w", &[1.5, 2.5])], 1), res("b", &[("w", &[0.5, 2.0])], 2)], &[]).unwrap();
    let saved = adam.state();
    let mut yogi = strategy("fedyogi", &Value::Null);
    let e = yogi.restore(&saved).unwrap_err();
    assert!(e.to_string().contains("belongs to strategy \"fedadam\""), "{e}");
    let mut other = strategy("fedadam", &json!({"eta": 0.5}));
    let e = other.restore(&saved).unwrap_err();
    assert!(e.to_string().contains("parameters"), "{e}");
    // Saved moments that do not fit the model are refused at the next round.
    let mut fresh = strategy("fedadam", &Value::Null);
    fresh.restore(&saved).unwrap();
    let bigger = model(&[("w", &[1.0, 2.0, 3.0])]);
    let e = fresh.aggregate_fit(2, &bigger, &[res("a", &[("w", &[1.0, 2.0, 3.0])], 1)], &[]).unwrap_err();
    assert!(e.to_string().contains("moments do not match"), "{e}");
}

fn model(tensors: &[(&str, &[f32])]) -> Tensors {
    let mut t = Tensors::default();
    for (name, data) in tensors {
        t.0.insert(name.to_string(), Tensor { shape: vec![data.len()], data: data.to_vec() });
    }
    t
}

fn res(node: &str, tensors: &[(&str, &[f32])], num_examples: u64) -> FitResult {
    FitResult { node: node.into(), update: model(tensors), num_examples }
}

fn fail(node: &str) -> FitFailure {
    FitFailure { node: node.into(), error: "timed out".into() }
}

/// The parameters each strategy is tried with: FedProx's μ, none for the others.
fn params_of(name: &str) -> Value {
    if name == "fedprox" { json!({"proximal_mu": 0.1}) } else { Value::Null }
}

fn all_strategies(participation: Participation) -> Vec<Box<dyn Strategy>> {
    STRATEGIES.iter().map(|name| from_config(name, &params_of(name), participation.clone()).unwrap()).collect()
}

/// Seven well-formed results of one tensor `w` of three values.
fn good() -> Vec<FitResult> {
    (0..7).map(|i| res(&format!("n{i}"), &[("w", &[1.0 + i as f32 * 0.1, 2.0, -1.0])], 10 + i)).collect()
}

#[test]
fn hostile_input_is_refused_with_clear_errors() {
    let current = model(&[("w", &[1.0, 2.0, -1.0])]);
    for mut s in all_strategies(lenient()) {
        let name = s.name().to_string();
        let mut agg = |rs: &[FitResult], fs: &[FitFailure]| s.aggregate_fit(1, &current, rs, fs).unwrap_err();

        let e = agg(&[], &[]);
        assert!(matches!(e, StrategyError::TooFewResults { results: 0, .. }), "{name}: {e}");

        let mut rs = good();
        rs[3].update.0.get_mut("w").unwrap().shape = vec![3, 1];
        let e = agg(&rs, &[]);
        assert!(matches!(&e, StrategyError::Layout { node, .. } if node == "n3"), "{name}: {e}");
        assert!(e.to_string().contains("\"n3\"") && e.to_string().contains("shape"), "{name}: {e}");

        let mut rs = good();
        rs[2].update.0.insert("extra".into(), Tensor { shape: vec![1], data: vec![0.0] });
        assert!(matches!(agg(&rs, &[]), StrategyError::Layout { .. }), "{name}: an extra tensor");
        let mut rs = good();
        rs[2].update = model(&[("v", &[1.0, 2.0, -1.0])]);
        assert!(matches!(agg(&rs, &[]), StrategyError::Layout { .. }), "{name}: a renamed tensor");

        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut rs = good();
            rs[5].update.0.get_mut("w").unwrap().data[1] = bad;
            let e = agg(&rs, &[]);
            assert!(matches!(&e, StrategyError::NonFinite { node, index: 1, .. } if node == "n5"), "{name}: {e}");
        }

        let mut rs = good();
        for r in &mut rs {
            r.num_examples = 0;
        }
        let e = agg(&rs, &[]);
        assert!(e.to_string().contains("zero examples"), "{name}: {e}");
        let mut rs = good();
        rs[0].num_examples = u64::MAX;
        assert!(matches!(agg(&rs, &[]), StrategyError::Examples { .. }), "{name}: overflowing counts");

        let mut rs = good();
        rs[4].node = "n1".into();
        let e = agg(&rs, &[]);
        assert!(matches!(&e, StrategyError::DuplicateNode { node, .. } if node == "n1"), "{name}: {e}");
    }

    // Failures: refused when not accepted, or above the ratio.
    let strict = Participation { accept_failures: false, ..lenient() };
    for mut s in all_strategies(strict) {
        let e = s.aggregate_fit(1, &current, &good(), &[fail("n9")]).unwrap_err();
        assert!(e.to_string().contains("accept_failures is false") && e.to_string().contains("n9"), "{e}");
    }
    let ratio = Participation { max_failure_ratio: 0.25, ..lenient() };
    for mut s in all_strategies(ratio) {
        // 2 of 9 failed: 0.22, accepted. 3 of 10: 0.3, refused.
        s.aggregate_fit(1, &current, &good(), &[fail("x"), fail("y")]).unwrap();
        let e = s.aggregate_fit(2, &current, &good(), &[fail("x"), fail("y"), fail("z")]).unwrap_err();
        assert!(matches!(e, StrategyError::TooManyFailures { failures: 3, results: 7, .. }), "{e}");
    }
    // min_fit: Flower's default of 2 refuses a round with one result.
    for mut s in all_strategies(Participation::default()) {
        let e = s.aggregate_fit(1, &current, &good()[..1], &[]).unwrap_err();
        assert!(e.to_string().contains("1 result(s), but the strategy needs at least 2"), "{e}");
    }
}

#[test]
fn strategy_specific_refusals() {
    let current = model(&[("w", &[1.0, 2.0, -1.0])]);
    let mut bulyan = strategy("bulyan", &json!({"num_malicious_clients": 1}));
    let e = bulyan.aggregate_fit(1, &current, &good()[..6], &[]).unwrap_err();
    assert!(e.to_string().contains("4f + 3 = 7"), "{e}");
    bulyan.aggregate_fit(1, &current, &good(), &[]).unwrap();
    let e = from_config("bulyan", &json!({"to_keep": 2}), lenient()).err().unwrap();
    assert!(e.to_string().contains("to_keep"), "{e}");

    let mut multi = strategy("krum", &json!({"num_clients_to_keep": 8}));
    let e = multi.aggregate_fit(1, &current, &good(), &[]).unwrap_err();
    assert!(e.to_string().contains("num_clients_to_keep = 8"), "{e}");

    for name in ["fedadam", "fedyogi", "fedadagrad"] {
        let mut s = strategy(name, &Value::Null);
        let e = s.aggregate_fit(1, &Tensors::default(), &good(), &[]).unwrap_err();
        assert!(e.to_string().contains("needs the current model"), "{name}: {e}");
    }
    let mut m = strategy("fedavgm", &json!({"server_momentum": 0.9}));
    assert!(m.aggregate_fit(1, &Tensors::default(), &good(), &[]).is_err());

    for (name, params, field) in [
        ("fedtrimmedavg", json!({"beta": 0.5}), "beta"),
        ("fedprox", json!({"proximal_mu": -1.0}), "proximal_mu"),
        ("fedadam", json!({"beta_1": 1.0}), "beta_1"),
        ("fedyogi", json!({"tau": 0.0}), "tau"),
        ("fedavgm", json!({"server_momentum": -0.1}), "server_momentum"),
        ("krum", json!({"num_malicious_clients": -1}), "num_malicious_clients"),
        ("fedmedian", json!({"beta": 0.1}), "unknown field"),
    ] {
        let e = from_config(name, &params, lenient()).err().unwrap_or_else(|| panic!("{name} {params} accepted"));
        assert!(e.to_string().contains(field), "{name}: {e}");
    }
}

#[test]
fn a_refused_round_leaves_the_state_unchanged() {
    let current = model(&[("w", &[1.0, 2.0, -1.0])]);
    for name in ["fedadam", "fedyogi", "fedadagrad", "fedavgm"] {
        let params = if name == "fedavgm" { json!({"server_momentum": 0.9}) } else { Value::Null };
        let mut s = strategy(name, &params);
        let before = s.state();
        let mut bad = good();
        bad[0].update.0.get_mut("w").unwrap().data[0] = f32::NAN;
        assert!(s.aggregate_fit(1, &current, &bad, &[]).is_err());
        assert_eq!(s.state(), before, "{name}");
        let mut fresh = strategy(name, &params);
        assert_eq!(
            s.aggregate_fit(1, &current, &good(), &[]).unwrap(),
            fresh.aggregate_fit(1, &current, &good(), &[]).unwrap(),
            "{name}"
        );
    }
}

/// A server step whose new model leaves the f32 range is refused, and the state saved by the
/// round before (moments, momentum) stays as it was (the step reads it first and writes it
/// only once the model is accepted).
#[test]
fn a_step_past_f32_is_refused_and_the_state_stays() {
    let current = model(&[("w", &[1.0, 2.0, -1.0]), ("b", &[0.5])]);
    let still: Vec<FitResult> =
        (0..3).map(|i| res(&format!("n{i}"), &[("w", &[1.0, 2.0, -1.0]), ("b", &[0.5])], 10)).collect();
    let moved: Vec<FitResult> =
        (0..3).map(|i| res(&format!("n{i}"), &[("w", &[3.0, 2.0, -1.0]), ("b", &[0.5])], 10)).collect();
    // A server learning rate of 1e39: any step that moves at all passes f32::MAX.
    for (name, params) in [
        ("fedadam", json!({"eta": 1e39})),
        ("fedyogi", json!({"eta": 1e39})),
        ("fedadagrad", json!({"eta": 1e39})),
        ("fedavgm", json!({"server_momentum": 0.9, "server_learning_rate": 1e39})),
    ] {
        let mut s = strategy(name, &params);
        assert_eq!(s.aggregate_fit(1, &current, &still, &[]).unwrap(), current, "{name}: no delta, no step");
        let saved = s.state();
        let e = s.aggregate_fit(2, &current, &moved, &[]).unwrap_err();
        assert!(e.to_string().contains("non-finite") || e.to_string().contains("inf"), "{name}: {e}");
        assert_eq!(s.state(), saved, "{name}");
        // It carries on from its saved state as a fresh one restored from it does.
        let mut fresh = strategy(name, &params);
        fresh.restore(&saved).unwrap();
        let again = s.aggregate_fit(2, &current, &still, &[]).unwrap();
        assert_eq!(again, fresh.aggregate_fit(2, &current, &still, &[]).unwrap(), "{name}");
        assert_eq!(s.state(), fresh.state(), "{name}");
    }
}

/// A step whose new server state leaves the f32 range is refused with the state as it was:
/// kept, an infinite moment or momentum would make every later round's model NaN.
#[test]
fn a_state_past_f32_is_refused() {
    let current = model(&[("w", &[-3.0e38, 0.0])]);
    let far = [res("n0", &[("w", &[3.0e38, 0.0])], 1)];
    for (name, params) in [
        ("fedadagrad", Value::Null),
        ("fedadam", Value::Null),
        ("fedyogi", Value::Null),
        ("fedavgm", json!({"server_momentum": 0.9})),
    ] {
        let mut s = strategy(name, &params);
        let before = s.state();
        let e = s.aggregate_fit(1, &current, &far, &[]).unwrap_err();
        assert!(e.to_string().contains("server state of tensor \"w\" would leave the f32 range"), "{name}: {e}");
        assert_eq!(s.state(), before, "{name}");
    }
}

#[test]
fn configure_fit_is_seeded_and_fedprox_sends_mu() {
    let nodes: Vec<String> = (0..20).map(|i| format!("node-{i:02}")).collect();
    let p = Participation { fraction_fit: 0.25, fraction_evaluate: 0.1, ..Participation::default() };
    let s = from_config("fedprox", &json!({"proximal_mu": 0.01}), p).unwrap();
    let plan = s.configure_fit(3, &nodes, 99).unwrap();
    assert_eq!(plan.participants.len(), 5);
    assert_eq!(plan.config, json!({"proximal_mu": 0.01}));
    assert_eq!(plan, s.configure_fit(3, &nodes, 99).unwrap());
    assert_ne!(plan.participants, s.configure_fit(3, &nodes, 100).unwrap().participants);
    assert_eq!(s.configure_evaluate(3, &nodes, 99).unwrap().len(), 2, "floor(20 * 0.1) = 2 = min_evaluate");
    let e = s.configure_fit(3, &nodes[..1], 99).unwrap_err();
    assert!(e.to_string().contains("1 node(s) available"), "{e}");
}

#[test]
fn threads_do_not_change_results() {
    let n = 150_001;
    let mut rng = SplitMix64::new(5);
    let mut rand = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    let current = model(&[("w", &(0..n).map(|_| rand()).collect::<Vec<_>>())]);
    let rs: Vec<FitResult> = (0..7)
        .map(|k| {
            let data: Vec<f32> = current.0["w"].data.iter().map(|x| x + 0.1 * rand()).collect();
            FitResult { node: format!("n{k}"), update: model(&[("w", &data)]), num_examples: 5 + k }
        })
        .collect();
    for (one, mut many) in all_strategies(lenient()).into_iter().zip(all_strategies(lenient())) {
        let mut one = one;
        many.set_threads(3);
        let a = one.aggregate_fit(1, &current, &rs, &[]).unwrap();
        let b = many.aggregate_fit(1, &current, &rs, &[]).unwrap();
        assert_eq!(a, b, "{}", one.name());
    }
}

/// Ten clients train towards a target; three of them send the sign-flipped target scaled by
/// ten. FedAvg is dragged far away; the robust rules are not.
#[test]
fn byzantine_clients_do_not_move_the_robust_rules() {
    let dim = 1000;
    let mut rng = SplitMix64::new(2024);
    let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    let target: Vec<f32> = (0..dim).map(|_| 1.0 + uniform()).collect();
    let mut rs = vec![];
    for k in 0..10 {
        let data: Vec<f32> = if k < 7 {
            // Honest: the target plus noise of ±0.1.
            target.iter().map(|t| t + 0.2 * (uniform() - 0.5)).collect()
        } else {
            target.iter().map(|t| -10.0 * t).collect()
        };
        rs.push(FitResult { node: format!("client-{k}"), update: model(&[("w", &data)]), num_examples: 100 });
    }
    let norm = target.iter().map(|t| t * t).sum::<f32>().sqrt();
    let rel_err = |name: &str, params: Value| {
        let out = strategy(name, &params).aggregate_fit(1, &Tensors::default(), &rs, &[]).unwrap();
        let err = out.0["w"].data.iter().zip(&target).map(|(o, t)| (o - t) * (o - t)).sum::<f32>().sqrt();
        err / norm
    };
    let fedavg = rel_err("fedavg", Value::Null);
    // (7 t - 30 t) / 10 = -2.3 t: a relative error of 3.3.
    assert!(fedavg > 3.0, "FedAvg should be far off: {fedavg}");
    for (name, params, bound) in [
        ("fedmedian", Value::Null, 0.05),
        // Trimming cuts floor(0.3 * 10) = 3 from each end: all three attackers.
        ("fedtrimmedavg", json!({"beta": 0.3}), 0.05),
        ("krum", json!({"num_malicious_clients": 3}), 0.1),
        ("krum", json!({"num_malicious_clients": 3, "num_clients_to_keep": 5}), 0.05),
        // Bulyan assumes n >= 4f + 3: with 10 clients it is told f = 1, and still holds.
        ("bulyan", json!({"num_malicious_clients": 1}), 0.05),
    ] {
        let e = rel_err(name, params.clone());
        assert!(e < bound, "{name} {params}: relative error {e}, bound {bound}");
    }
    // A trimmed mean only resists as many attackers as it cuts: 0.2 * 10 = 2 < 3.
    let e = rel_err("fedtrimmedavg", json!({"beta": 0.2}));
    assert!(e > 0.5, "one attacker left in the trimmed mean: {e}");
}

/// The weighted-mean strategies give the same bits from a sum folded one update at a time
/// (as a coordinator streams a round) as from the results held together; the order
/// statistics say they take no sum and refuse one.
#[test]
fn streamed_sums_give_the_held_results_bits() {
    use tessera_core::strategy::FitSum;
    let mut rng = SplitMix64::new(11);
    let mut uniform = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    let current = model(&[("w", &[0.5, -0.25, 1.0, 2.0]), ("b", &[0.1])]);
    let rs: Vec<FitResult> = (0..7)
        .map(|k| {
            let w: Vec<f32> = (0..4).map(|_| uniform() * 2.0 - 1.0).collect();
            let b = [uniform()];
            FitResult { node: format!("n{k}"), update: model(&[("w", &w), ("b", &b)]), num_examples: 10 + k as u64 }
        })
        .collect();
    for name in STRATEGIES {
        let params = params_of(name);
        let mut held = strategy(name, &params);
        let mut streamed = strategy(name, &params);
        let mut sum = FitSum::new(1, &current, 1);
        for r in &rs {
            sum.add(&r.node, &r.update, r.num_examples).unwrap();
        }
        if streamed.takes_sum() {
            // A strategy that says it does not read the current model is given none.
            let given = if streamed.reads_current() { current.clone() } else { Tensors::default() };
            for round in 1..=2 {
                let a = held.aggregate_fit(round, &current, &rs, &[]).unwrap();
                let b = streamed.aggregate_sum(round, &given, sum.clone(), &[]).unwrap();
                assert_eq!(a, b, "{name}, round {round}");
            }
            assert_eq!(held.state(), streamed.state(), "{name}: the same server state");
        } else {
            let e = streamed.aggregate_sum(1, &current, sum, &[]).unwrap_err();
            assert!(e.to_string().contains("needs every update"), "{name}: {e}");
        }
    }
    let sums: Vec<&str> = STRATEGIES.iter().copied().filter(|n| strategy(n, &params_of(n)).takes_sum()).collect();
    assert_eq!(sums, ["fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"]);
    let blind: Vec<&str> = sums.iter().copied().filter(|n| !strategy(n, &params_of(n)).reads_current()).collect();
    assert_eq!(blind, ["fedavg", "fedprox"]);
}
