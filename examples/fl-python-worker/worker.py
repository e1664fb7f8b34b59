"""Federated softmax regression with numpy: mini-batch SGD on cross-entropy, optionally
with FedProx's proximal term, speaking the same worker protocol as `fl.softmax.worker`.

`dtype` (float32, float16 or float64) is the type the parameters are stored in, as a
half-precision model would be; `count_batches: true` adds `num_batches_tracked`, an int64
counter of the mini-batches the model has been trained on (as PyTorch's BatchNorm keeps)."""

import numpy as np

import tessera
from tessera import safetensors


DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def _store(cfg, w, b, batches):
    name = cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    out = {"w": w.astype(DTYPES[name]), "b": b.astype(DTYPES[name])}
    if cfg.get("count_batches", False):
        out["num_batches_tracked"] = np.array(batches, dtype=np.int64)
    return safetensors.encode(out)


def _params(model, classes, features):
    w = np.asarray(model["w"], dtype=np.float32).reshape(classes, features)
    b = np.asarray(model["b"], dtype=np.float32).reshape(classes)
    return w, b


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxWorker(tessera.Task):
    def run(self):
        cfg = self.config
        mode = cfg.get("mode", "train")
        classes, features = int(cfg.get("classes", 10)), int(cfg.get("features", 64))
        if mode == "init":
            w = np.zeros((classes, features), dtype=np.float32)
            b = np.zeros(classes, dtype=np.float32)
            return {"model": _store(cfg, w, b, 0)}
        if mode not in ("train", "evaluate"):
            raise ValueError(f"unknown mode {mode!r}; expected init, train or evaluate")
        model = self.inputs.get("model")
        if model is None:
            raise ValueError("input `model` is missing")
        w, b = _params(model, classes, features)
        data = self.local.dataset(cfg.get("dataset", "digits")).tensors()
        x = np.asarray(data["x"], dtype=np.float32).reshape(-1, features)
        y = np.asarray(data["y"]).astype(np.int64).reshape(-1)
        if len(y) == 0:
            raise ValueError("the dataset is empty")
        if y.max() >= classes or y.min() < 0:
            raise ValueError(f"labels must be in 0..{classes - 1}")
        if mode == "evaluate":
            p = _softmax(x @ w.T + b)
            loss = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
            acc = float((p.argmax(axis=1) == y).mean())
            return {"metrics": {"num_examples": int(len(y)), "loss": loss, "accuracy": acc}}
        lr = float(cfg.get("lr", 0.1))
        mu = float(cfg.get("proximal_mu", 0.0))
        batch = max(1, int(cfg.get("batch_size", 32)))
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        w0, b0 = w.copy(), b.copy()
        batches = int(np.asarray(model["num_batches_tracked"])) if "num_batches_tracked" in model else 0
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(max(1, int(cfg.get("epochs", 1)))):
            order = rng.permutation(len(y))
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                xb, yb = x[idx], y[idx]
                p = _softmax(xb @ w.T + b)
                loss_sum += float(-np.log(np.maximum(p[np.arange(len(yb)), yb], 1e-12)).sum())
                correct += int((p.argmax(axis=1) == yb).sum())
                seen += len(yb)
                batches += 1
                p[np.arange(len(yb)), yb] -= 1.0
                gw = p.T @ xb / len(yb)
                gb = p.sum(axis=0) / len(yb)
                w -= lr * (gw + mu * (w - w0))
                b -= lr * (gb + mu * (b - b0))
        self.log.info(f"trained on {len(y)} examples, loss {loss_sum / seen:.4f}")
        metrics = {"num_examples": int(len(y)), "loss": loss_sum / seen, "accuracy": correct / seen}
        return {"model": _store(cfg, w, b, batches), "metrics": metrics}
