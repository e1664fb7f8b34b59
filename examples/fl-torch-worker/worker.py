"""Federated softmax regression with PyTorch: `torch.nn.Linear` trained with SGD on
cross-entropy (optionally FedProx's proximal term), speaking the worker protocol of
`fl.softmax.worker`: `mode: init | train | evaluate`, a `model` input with `w` [classes,
features] and `b` [classes], `model` and `metrics` outputs."""

import numpy as np
import torch

import tessera
from tessera import safetensors


class TorchSoftmaxWorker(tessera.Task):
    def _model(self, classes, features, model):
        torch.manual_seed(0)
        lin = torch.nn.Linear(features, classes)
        with torch.no_grad():
            if model is None:
                lin.weight.zero_()
                lin.bias.zero_()
            else:
                lin.weight.copy_(torch.from_numpy(np.asarray(model["w"], dtype=np.float32).reshape(classes, features)))
                lin.bias.copy_(torch.from_numpy(np.asarray(model["b"], dtype=np.float32).reshape(classes)))
        return lin

    @staticmethod
    def _encode(lin):
        w = lin.weight.detach().numpy().astype(np.float32)
        b = lin.bias.detach().numpy().astype(np.float32)
        return safetensors.encode({"w": w, "b": b})

    def run(self):
        cfg = self.config
        mode = cfg.get("mode", "train")
        classes, features = int(cfg.get("classes", 10)), int(cfg.get("features", 64))
        if mode == "init":
            return {"model": self._encode(self._model(classes, features, None))}
        if mode not in ("train", "evaluate"):
            raise ValueError(f"unknown mode {mode!r}; expected init, train or evaluate")
        if self.inputs.get("model") is None:
            raise ValueError("input `model` is missing")
        lin = self._model(classes, features, self.inputs["model"])
        data = self.local.dataset(cfg.get("dataset", "digits")).tensors()
        x = torch.from_numpy(np.asarray(data["x"], dtype=np.float32).reshape(-1, features))
        y = torch.from_numpy(np.asarray(data["y"]).astype(np.int64).reshape(-1))
        parts = int(cfg.get("partitions", 1))
        if parts > 1:
            x, y = x[int(cfg.get("partition", 0)) :: parts], y[int(cfg.get("partition", 0)) :: parts]
        loss_fn = torch.nn.CrossEntropyLoss()
        if mode == "evaluate":
            with torch.no_grad():
                logits = lin(x)
                loss = float(loss_fn(logits, y))
                acc = float((logits.argmax(dim=1) == y).float().mean())
            return {"metrics": {"num_examples": int(len(y)), "loss": loss, "accuracy": acc}}
        lr, mu = float(cfg.get("lr", 0.1)), float(cfg.get("proximal_mu", 0.0))
        batch = max(1, int(cfg.get("batch_size", 32)))
        start = [p.detach().clone() for p in lin.parameters()]
        opt = torch.optim.SGD(lin.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(max(1, int(cfg.get("epochs", 1)))):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch):
                idx = order[i : i + batch]
                logits = lin(x[idx])
                loss = loss_fn(logits, y[idx])
                if mu > 0:
                    loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(lin.parameters(), start))
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss) * len(idx)
                correct += int((logits.argmax(dim=1) == y[idx]).sum())
                seen += len(idx)
        self.log.info(f"trained on {len(y)} examples with torch {torch.__version__}, loss {loss_sum / seen:.4f}")
        return {
            "model": self._encode(lin),
            "metrics": {"num_examples": int(len(y)), "loss": loss_sum / seen, "accuracy": correct / seen},
        }
