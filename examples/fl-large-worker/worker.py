"""A worker for large models: every value moves a step towards the node's target.

The model is `w` (float32, [parameters]) and `steps` (int64 scalar, the training steps it
has taken, a counter taken whole by the coordinator). The node's dataset holds `target`
(float32, [1]) and `examples` (int64, [1]). Nothing model-sized is allocated beyond the
input itself: updates are in place, the loss is summed a chunk at a time, and the output
is written from the arrays' memory (`safetensors.encode_parts`)."""

import numpy as np

import tessera
from tessera import safetensors

CHUNK = 1 << 20


def _sq_distance(w, target):
    """Mean of (w - target)^2, a chunk at a time."""
    total = 0.0
    for start in range(0, w.size, CHUNK):
        d = w[start : start + CHUNK] - np.float32(target)
        total += float(np.dot(d, d))
    return total / max(1, w.size)


class LargeWorker(tessera.Task):
    def run(self):
        cfg = self.config
        mode = cfg.get("mode", "train")
        if mode == "init":
            n = int(cfg.get("parameters", 1_000_000))
            if n < 1:
                raise ValueError("parameters must be at least 1")
            rng = np.random.default_rng(int(cfg.get("seed", 0)))
            w = rng.standard_normal(n, dtype=np.float32)
            return {"model": safetensors.encode_parts({"w": w, "steps": np.array(0, dtype=np.int64)})}
        if mode not in ("train", "evaluate"):
            raise ValueError(f"unknown mode {mode!r}; expected init, train or evaluate")
        model = self.inputs.get("model")
        if not isinstance(model, dict) or "w" not in model or "steps" not in model:
            raise ValueError("input `model` must hold `w` and `steps`")
        w = model["w"]
        if w.dtype != np.float32 or w.ndim != 1:
            raise ValueError(f"`w` must be float32 of one dimension, not {w.dtype} {w.shape}")
        data = self.local.dataset(cfg.get("dataset", "targets")).tensors()
        target = float(np.asarray(data["target"]).reshape(-1)[0])
        examples = int(np.asarray(data["examples"]).reshape(-1)[0])
        loss = _sq_distance(w, target)
        if mode == "evaluate":
            return {"metrics": {"num_examples": examples, "loss": loss}}
        lr = float(cfg.get("lr", 0.5))
        w *= np.float32(1.0 - lr)
        w += np.float32(lr * target)
        steps = np.array(int(model["steps"]) + 1, dtype=np.int64)
        return {
            "model": safetensors.encode_parts({"w": w, "steps": steps}),
            "metrics": {"num_examples": examples, "loss": loss},
        }
