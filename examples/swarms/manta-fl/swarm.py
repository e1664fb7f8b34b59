"""Federated learning as a swarm of three Python modules, as Manta writes it: a numpy
worker on every node holding `digits`, a FedAvg aggregator on any one node, and a
scheduler that ends the run once the target accuracy is reached (or after 30 iterations).

    tessera swarm run examples/swarms/manta-fl/swarm.py
"""

from tessera.swarm import Module, Swarm, Task


class FederatedLearningSwarm(Swarm):
    def __init__(self):
        super().__init__()
        self.name = "manta-fl"
        self.worker = Task(Module("./worker", datasets=["digits"]), method="all", maximum=-1)
        self.aggregator = Task(Module("./aggregator"), method="any", maximum=1)
        self.scheduler = Task(Module("./scheduler"), method="any", maximum=1)
        self.iterations = 30
        self.seed = 42
        self.set_global("target_accuracy", 0.93)

    def execute(self):
        results = self.worker()
        aggregated = self.aggregator(results)
        return self.scheduler(aggregated)
