"""The compute floor of the federated digits job: the same FedAvg loop as flower_job.py
and Tessera's quickstart (softmax regression, the same shards, learning rate, batch size,
epochs and held-out evaluation every round) in plain numpy, one process, no framework: the
clients train one after another and the server averages their models by example counts.
Prints one JSON line: per-round time of the steady rounds (all but the first) and the
final accuracy.

    python numpy_floor.py DATA_DIR [ROUNDS] [LR] [BATCH] [EPOCHS]
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import flower_job as job  # noqa: E402  (its data loading and training; Flower is imported, not run)

ROUNDS = job.ROUNDS
CLIENTS = [job.load(os.path.join(job.DATA, f"node-{k}", "digits.safetensors")) for k in range(job.CLIENTS)]
X_TEST, Y_TEST = job.X_TEST, job.Y_TEST

if __name__ == "__main__":
    w = np.zeros((job.CLASSES, job.FEATURES), np.float32)
    b = np.zeros(job.CLASSES, np.float32)
    times, acc = [], 0.0
    for r in range(1, ROUNDS + 1):
        t = time.perf_counter()
        models = []
        for k, (x, y) in enumerate(CLIENTS):
            wk, bk, _ = job.train(w.copy(), b.copy(), x, y, seed=r * 1009 + k)
            models.append((wk, bk, len(y)))
        n = sum(m[2] for m in models)
        w = sum(m[0] * m[2] for m in models) / n
        b = sum(m[1] * m[2] for m in models) / n
        _, acc = job.evaluate(w, b, X_TEST, Y_TEST)
        times.append(time.perf_counter() - t)
    steady = times[1:] or times
    print(json.dumps({
        "system": "numpy",
        "rounds": len(times),
        "round_ms": round(1000 * sum(steady) / len(steady), 3),
        "first_round_ms": round(1000 * times[0], 3),
        "accuracy": round(acc, 4),
    }))
