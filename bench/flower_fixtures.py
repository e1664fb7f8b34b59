#!/usr/bin/env python3
"""Reference numbers from Flower for `tessera_core::strategy`.

Builds small deterministic cases, runs Flower's own aggregation functions and strategy classes
on them, and writes the inputs and Flower's outputs to
`crates/tessera-core/tests/fixtures/flower.json`, which `crates/tessera-core/tests/strategies.rs`
checks every strategy against. The JSON is checked in: the Rust tests do not need Python.

Run with a Python that has flwr 1.x (the numbers were made with flwr 1.41.0):

    /tmp/flwr-venv/bin/python bench/flower_fixtures.py

Inputs are float32 values (what a Rust `f32` holds exactly), computed on by Flower as float64,
so the expected numbers are the exact formulas; Tessera computes in f32 and the tests allow a
relative tolerance of about 1e-5.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

import flwr
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
    weighted_loss_avg,
)

# Tensor names in Flower's list order; Tessera orders tensors by name, so keep them sorted.
LAYOUT = [("a", (2, 3)), ("b", (4,))]
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "tessera-core", "tests", "fixtures", "flower.json")


def f32(x: np.ndarray) -> np.ndarray:
    """Rounds to float32 and back: a value a Rust f32 holds exactly."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def model(rng: np.random.Generator, center: float, scale: float) -> list[np.ndarray]:
    return [f32(center + scale * rng.standard_normal(shape)) for _, shape in LAYOUT]


def tensors_json(nds: list[np.ndarray]) -> dict:
    return {
        name: {"shape": list(shape), "data": [float(v) for v in np.asarray(nd, dtype=np.float64).ravel()]}
        for (name, shape), nd in zip(LAYOUT, nds, strict=True)
    }


def clients_json(results: list[tuple[list[np.ndarray], int]]) -> list[dict]:
    return [
        {"node": f"client-{i}", "num_examples": n, "tensors": tensors_json(nds)} for i, (nds, n) in enumerate(results)
    ]


def fit_results(results: list[tuple[list[np.ndarray], int]]) -> list:
    """Flower's (ClientProxy, FitRes) pairs; the strategies here never look at the proxy."""
    ok = Status(code=Code.OK, message="")
    return [(None, FitRes(ok, ndarrays_to_parameters(nds), n, {})) for nds, n in results]


def run_class(strategy, round_: int, results) -> list[np.ndarray]:
    params, _ = strategy.aggregate_fit(round_, fit_results(results), [])
    assert params is not None
    return parameters_to_ndarrays(params)


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(a, b, strict=True))


def build_cases(rng: np.random.Generator) -> dict[str, list[tuple[list[np.ndarray], int]]]:
    cases = {}
    # Seven honest clients around 0.5, with different example counts.
    examples = [10, 25, 7, 40, 13, 31, 19]
    cases["seven"] = [(model(rng, 0.5, 0.3), n) for n in examples]
    # Six clients: an even count for the median.
    cases["six"] = [(model(rng, -0.2, 0.5), n) for n in [3, 8, 5, 12, 9, 4]]
    # Eight clients, two of them Byzantine (sign-flipped and scaled).
    byz = [(model(rng, 1.0, 0.1), n) for n in [20, 15, 30, 10, 25, 12]]
    byz += [([f32(-10.0 * x) for x in byz[k][0]], n) for k, n in [(0, 50), (1, 60)]]
    cases["byzantine"] = byz
    return cases


def single_round(cases) -> list[dict]:
    out = []

    def add(strategy, params, case, flower, expected):
        out.append(
            {"strategy": strategy, "params": params, "case": case, "flower": flower, "expected": tensors_json(expected)}
        )

    for case, results in cases.items():
        # FedAvg: the function, and the class (in-place aggregation) for the same numbers.
        expected = aggregate(results)
        assert same(expected, run_class(FedAvg(), 1, results))
        add("fedavg", {}, case, "aggregate", expected)
        assert same(expected, run_class(FedProx(proximal_mu=0.1), 1, results))
        add("fedprox", {"proximal_mu": 0.1}, case, "FedProx.aggregate_fit (aggregate_inplace)", expected)
        fedavgm = run_class(FedAvgM(), 1, results)
        add("fedavgm", {}, case, "FedAvgM.aggregate_fit (defaults: plain aggregate)", fedavgm)

        expected = aggregate_median(results)
        assert same(expected, run_class(FedMedian(), 1, results))
        add("fedmedian", {}, case, "aggregate_median", expected)

        for beta in [0.2, 0.3, 0.0]:
            expected = aggregate_trimmed_avg(results, beta)
            assert same(expected, run_class(FedTrimmedAvg(beta=beta), 1, results))
            add("fedtrimmedavg", {"beta": beta}, case, "aggregate_trimmed_avg", expected)

        for f, keep in [(0, 0), (1, 0), (2, 0), (1, 3), (2, 4)]:
            expected = aggregate_krum(results, f, keep)
            assert same(expected, run_class(Krum(num_malicious_clients=f, num_clients_to_keep=keep), 1, results))
            params = {"num_malicious_clients": f, "num_clients_to_keep": keep}
            add("krum", params, case, "aggregate_krum", expected)

        for f in [0, 1]:
            if len(results) < 4 * f + 3:
                continue
            expected = aggregate_bulyan(list(results), f, aggregate_krum, to_keep=0)
            bulyan = Bulyan(num_malicious_clients=f, to_keep=0)
            assert same(expected, run_class(bulyan, 1, results))
            add("bulyan", {"num_malicious_clients": f, "to_keep": 0}, case, "aggregate_bulyan (aggregate_krum)", expected)
    return out


def multi_round(rng: np.random.Generator) -> list[dict]:
    """Server optimisers over three rounds, each through Flower's strategy class."""
    out = []
    configs = [
        ("fedadagrad", {}, FedAdagrad),
        ("fedadam", {}, FedAdam),
        ("fedadam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.001}, FedAdam),
        ("fedyogi", {}, FedYogi),
        ("fedyogi", {"eta": 0.1, "tau": 0.01}, FedYogi),
        ("fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9}, FedAvgM),
        ("fedavgm", {"server_learning_rate": 0.5}, FedAvgM),
    ]
    for name, params, cls in configs:
        initial = model(rng, 0.0, 0.5)
        target = model(rng, 1.0, 0.5)
        strategy = cls(initial_parameters=ndarrays_to_parameters(initial), **params)
        current = initial
        rounds = []
        for round_ in [1, 2, 3]:
            # Each client moves part of the way towards the target, with its own noise.
            results = []
            for n in [12, 30, 7, 21, 16]:
                step = rng.uniform(0.2, 0.6)
                nds = [f32(c + step * (t - c) + 0.05 * rng.standard_normal(c.shape)) for c, t in zip(current, target)]
                results.append((nds, n))
            current = run_class(strategy, round_, results)
            rounds.append({"round": round_, "clients": clients_json(results), "expected": tensors_json(current)})
        flower = f"{cls.__name__}.aggregate_fit"
        out.append({"strategy": name, "params": params, "flower": flower, "initial": tensors_json(initial), "rounds": rounds})
    return out


def evaluate(rng: np.random.Generator) -> list[dict]:
    out = []
    for k in [1, 4, 7]:
        results = [(int(rng.integers(1, 100)), float(f32(rng.uniform(0.1, 3.0)))) for _ in range(k)]
        out.append({"results": [list(r) for r in results], "expected_loss": weighted_loss_avg(results)})
    return out


def main() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(20240611)
    cases = build_cases(rng)
    fixture = {
        "generated_by": "bench/flower_fixtures.py",
        "flwr_version": flwr.__version__,
        "numpy_version": np.__version__,
        "cases": {name: clients_json(results) for name, results in cases.items()},
        "single_round": single_round(cases),
        "multi_round": multi_round(rng),
        "evaluate": evaluate(rng),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
