"""Federated multilayer perceptron with batch normalisation in PyTorch.

The model is `torch.nn.Sequential(Linear(features, hidden), BatchNorm1d(hidden), ReLU(),
Linear(hidden, classes))`, exchanged as its whole `state_dict` in safetensors: `0.weight`
[hidden, features], `0.bias` [hidden], `1.weight`, `1.bias`, `1.running_mean`,
`1.running_var` [hidden] (float32), `1.num_batches_tracked` [] (int64), `3.weight`
[classes, hidden], `3.bias` [classes]. The coordinator averages the float tensors (running
statistics included, as FedAvg does) and takes the counter by its integer rule. Worker
protocol of `fl.softmax.worker`: `mode: init | train | evaluate`, a `model` input, `model`
and `metrics` outputs."""

import numpy as np
import torch

import tessera
from tessera import safetensors


def network(features, hidden, classes):
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


class TorchBatchNormWorker(tessera.Task):
    def _network(self, cfg, model):
        features, hidden, classes = (int(cfg.get(k, d)) for k, d in (("features", 64), ("hidden", 32), ("classes", 10)))
        torch.manual_seed(int(cfg.get("seed", 0)))
        net = network(features, hidden, classes)
        if model is not None:
            expected = net.state_dict()
            missing = sorted(set(expected) - set(model))
            if missing:
                raise ValueError(f"the model lacks {missing}")
            state = {}
            for name, like in expected.items():
                value = np.asarray(model[name])
                if tuple(value.shape) != tuple(like.shape):
                    raise ValueError(f"tensor {name} has shape {list(value.shape)}; expected {list(like.shape)}")
                state[name] = torch.from_numpy(np.array(value, dtype=like.numpy().dtype))
            net.load_state_dict(state)
        return net

    @staticmethod
    def _encode(net):
        return safetensors.encode({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})

    def run(self):
        cfg = self.config
        mode = cfg.get("mode", "train")
        if mode == "init":
            return {"model": self._encode(self._network(cfg, None))}
        if mode not in ("train", "evaluate"):
            raise ValueError(f"unknown mode {mode!r}; expected init, train or evaluate")
        if self.inputs.get("model") is None:
            raise ValueError("input `model` is missing")
        net = self._network(cfg, self.inputs["model"])
        features = int(cfg.get("features", 64))
        data = self.local.dataset(cfg.get("dataset", "digits")).tensors()
        x = torch.from_numpy(np.asarray(data["x"], dtype=np.float32).reshape(-1, features))
        y = torch.from_numpy(np.asarray(data["y"]).astype(np.int64).reshape(-1))
        loss_fn = torch.nn.CrossEntropyLoss()
        if mode == "evaluate":
            net.eval()
            with torch.no_grad():
                logits = net(x)
                loss = float(loss_fn(logits, y))
                acc = float((logits.argmax(dim=1) == y).float().mean())
            return {"metrics": {"num_examples": int(len(y)), "loss": loss, "accuracy": acc}}
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=float(cfg.get("lr", 0.1)))
        batch = max(2, int(cfg.get("batch_size", 32)))
        gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(max(1, int(cfg.get("epochs", 1)))):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch):
                idx = order[i : i + batch]
                if len(idx) < 2:
                    continue  # BatchNorm1d needs two examples to train on a batch
                logits = net(x[idx])
                loss = loss_fn(logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss) * len(idx)
                correct += int((logits.argmax(dim=1) == y[idx]).sum())
                seen += len(idx)
        self.log.info(f"trained on {seen} examples with torch {torch.__version__}, loss {loss_sum / max(seen, 1):.4f}")
        return {
            "model": self._encode(net),
            "metrics": {"num_examples": int(seen), "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)},
        }
