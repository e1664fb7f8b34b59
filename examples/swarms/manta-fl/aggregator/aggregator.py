"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", algorithm 1): the new global model is the average of the nodes'
models weighted by the examples each trained on.

Reads   results "model", "num_examples", "evaluation" of this iteration (every node's)
Sets    globals["model"]     safetensors {w, b} (float32), the weighted average
        globals["accuracy"]  float, the workers' scores of the model they received,
                             weighted by their held-out rows
"""

import numpy as np

import tessera
from tessera import safetensors


class FedAvg(tessera.Task):
    def run(self):
        models = dict(self.world.results.select("model"))
        counts = dict(self.world.results.select("num_examples"))
        evaluations = dict(self.world.results.select("evaluation"))
        nodes = sorted(n for n in models if n in counts)
        if not nodes:
            raise ValueError("no worker added a model in this iteration")
        total = float(sum(counts[n] for n in nodes))
        average = {}
        # Sorted by node so every run sums in the same order: the same inputs give the
        # same bytes.
        for n in nodes:
            tensors = safetensors.decode(models[n])
            for key, value in tensors.items():
                part = np.asarray(value, dtype=np.float64) * (counts[n] / total)
                average[key] = part if key not in average else average[key] + part
        self.world.globals["model"] = safetensors.encode({k: v.astype(np.float32) for k, v in average.items()})

        rows = sum(e["num_examples"] for e in evaluations.values())
        if rows:
            accuracy = sum(e["accuracy"] * e["num_examples"] for e in evaluations.values()) / rows
            self.world.globals["accuracy"] = accuracy
            self.log.info("averaged %d models over %d examples; the previous global model scored %.4f"
                          % (len(nodes), int(total), accuracy))
