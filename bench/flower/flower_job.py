"""The federated digits job on Flower (simulation, Ray backend): softmax regression,
10 clients, 20 rounds, FedAvg, the same shards, learning rate, batch size and epochs as
Tessera's. Prints one JSON line: wall seconds, per-round time and overhead of the steady
rounds (all but the first, which also starts Ray's workers), the first round's time, and
the final accuracy.

    python flower_job.py DATA_DIR [ROUNDS] [LR] [BATCH] [EPOCHS]

DATA_DIR is what `tessera dataset digits --out DATA_DIR --shards 10` writes.
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "sdk", "python"))
from tessera import safetensors  # noqa: E402  (the SDK's reader; no Tessera process involved)

import flwr  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

DATA = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
LR = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
BATCH = int(sys.argv[4]) if len(sys.argv) > 4 else 32
EPOCHS = int(sys.argv[5]) if len(sys.argv) > 5 else 1
CLIENTS = len([d for d in os.listdir(DATA) if d.startswith("node-")])
CLASSES, FEATURES = 10, 64


def load(path):
    with open(path, "rb") as f:
        t = safetensors.decode(bytearray(f.read()))
    return np.asarray(t["x"], dtype=np.float32).reshape(-1, FEATURES), np.asarray(t["y"]).astype(np.int64)


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(w, b, x, y):
    p = softmax(x @ w.T + b)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()), float((p.argmax(1) == y).mean())


def train(w, b, x, y, seed):
    """Mini-batch SGD on cross-entropy: the same algorithm as Tessera's workers."""
    rng = np.random.default_rng(seed)
    loss_sum, seen = 0.0, 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(y))
        for s in range(0, len(y), BATCH):
            idx = order[s : s + BATCH]
            xb, yb = x[idx], y[idx]
            p = softmax(xb @ w.T + b)
            loss_sum += float(-np.log(np.maximum(p[np.arange(len(yb)), yb], 1e-12)).sum())
            seen += len(yb)
            p[np.arange(len(yb)), yb] -= 1.0
            w -= LR * (p.T @ xb) / len(yb)
            b -= LR * p.sum(axis=0) / len(yb)
    return w, b, loss_sum / seen


class DigitsClient(NumPyClient):
    def __init__(self, k):
        self.k = k
        self.x, self.y = load(os.path.join(DATA, f"node-{k}", "digits.safetensors"))

    def fit(self, parameters, config):
        t = time.perf_counter()
        w, b = (np.array(p, dtype=np.float32) for p in parameters)
        w, b, loss = train(w, b, self.x, self.y, seed=int(config.get("round", 0)) * 1009 + self.k)
        return [w, b], len(self.y), {"loss": loss, "fit_seconds": time.perf_counter() - t}


def client_fn(context: Context):
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


X_TEST, Y_TEST = load(os.path.join(DATA, "coordinator", "digits-test.safetensors"))
TIMES = {"rounds": [], "fit": {}}


def central_eval(server_round, parameters, config):
    w, b = parameters
    loss, acc = evaluate(np.asarray(w), np.asarray(b), X_TEST, Y_TEST)
    return loss, {"accuracy": acc}


class TimedFedAvg(FedAvg):
    def configure_fit(self, server_round, parameters, client_manager):
        self._t = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        TIMES["rounds"].append(time.perf_counter() - self._t)
        TIMES["fit"][server_round] = max(r.metrics.get("fit_seconds", 0.0) for _, r in results)
        return out


FINAL = {}


def server_fn(context: Context):
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=CLIENTS,
        min_available_clients=CLIENTS,
        initial_parameters=ndarrays_to_parameters(
            [np.zeros((CLASSES, FEATURES), np.float32), np.zeros(CLASSES, np.float32)]
        ),
        on_fit_config_fn=lambda r: {"round": r},
        evaluate_fn=lambda r, p, c: FINAL.__setitem__("last", central_eval(r, p, c)) or FINAL["last"],
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


if __name__ == "__main__":
    start = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": os.cpu_count()}},
    )
    wall = time.perf_counter() - start
    rounds = TIMES["rounds"]
    overhead = [r - TIMES["fit"].get(i + 1, 0.0) for i, r in enumerate(rounds)]
    # Steady rounds against steady rounds: the first also starts the clients' actors.
    first = rounds[0] if rounds else 0.0
    rounds, overhead = (rounds[1:], overhead[1:]) if len(rounds) > 1 else (rounds, overhead)
    print(json.dumps({
        "system": f"flower {flwr.__version__}",
        "clients": CLIENTS,
        "rounds": len(rounds),
        "wall_s": round(wall, 3),
        "round_ms": round(1000 * sum(rounds) / max(1, len(rounds)), 2),
        "overhead_ms": round(1000 * sum(overhead) / max(1, len(overhead)), 2),
        "first_round_ms": round(1000 * first, 2),
        "accuracy": round(FINAL.get("last", (0, {"accuracy": 0}))[1]["accuracy"], 4),
    }))
