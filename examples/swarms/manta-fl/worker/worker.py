"""Federated softmax regression, Manta style: everything goes through the world.

Reads   globals["model"]   safetensors {w: f32 [classes, features], b: f32 [classes]}
Adds    results "model"        the locally trained model (same layout)
        results "num_examples" int, the rows it trained on
        results "evaluation"   {"num_examples": int, "accuracy": float} of the global
                               model it received, on the node's held-out rows
"""

import numpy as np

import tessera
from tessera import safetensors


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Worker(tessera.Task):
    def run(self):
        cfg = self.config
        swarm = cfg.get("swarm", {})
        classes, features = int(cfg["classes"]), int(cfg["features"])
        raw = self.world.globals.get_bytes("model")
        if raw is None:
            w = np.zeros((classes, features), dtype=np.float32)
            b = np.zeros(classes, dtype=np.float32)
        else:
            model = safetensors.decode(raw)
            w = np.asarray(model["w"], dtype=np.float32).reshape(classes, features)
            b = np.asarray(model["b"], dtype=np.float32).reshape(classes)

        data = self.local.dataset(cfg["dataset"]).tensors()
        x = np.asarray(data["x"], dtype=np.float32).reshape(-1, features)
        y = np.asarray(data["y"]).astype(np.int64).reshape(-1)
        # The same rows are held out in every iteration: the last `holdout` of the shard.
        cut = len(y) - max(1, int(len(y) * float(cfg["holdout"])))
        x_train, y_train, x_val, y_val = x[:cut], y[:cut], x[cut:], y[cut:]

        accuracy = float((softmax(x_val @ w.T + b).argmax(axis=1) == y_val).mean())
        self.log.info("iteration %s: the global model scores %.4f on %d held-out rows"
                      % (swarm.get("iteration"), accuracy, len(y_val)))

        lr, batch = float(cfg["lr"]), max(1, int(cfg["batch_size"]))
        rng = np.random.default_rng(int(swarm.get("seed", 0)))
        for _ in range(max(1, int(cfg["epochs"]))):
            order = rng.permutation(len(y_train))
            for start in range(0, len(y_train), batch):
                idx = order[start:start + batch]
                xb, yb = x_train[idx], y_train[idx]
                p = softmax(xb @ w.T + b)
                p[np.arange(len(yb)), yb] -= 1.0
                w -= lr * (p.T @ xb) / len(yb)
                b -= lr * p.mean(axis=0)

        self.world.results.add("model", safetensors.encode({"w": w, "b": b}))
        self.world.results.add("num_examples", int(len(y_train)))
        self.world.results.add("evaluation", {"num_examples": int(len(y_val)), "accuracy": accuracy})
