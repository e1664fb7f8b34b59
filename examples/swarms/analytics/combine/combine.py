"""Combines the nodes' statistics of this iteration.

Sets  globals["histogram"]     [classes] ints, the sum of the nodes' histograms
      globals["feature_mean"]  [features] floats, sum of the sums / total rows
      globals["rows"]          int, total rows
      globals["nodes"]         [str], the nodes that contributed
"""

import tessera


class Combine(tessera.Task):
    def run(self):
        histograms = self.world.results.select("histogram")
        sums = dict(self.world.results.select("sums"))
        rows = dict(self.world.results.select("rows"))
        if not histograms:
            raise ValueError("no node added a histogram")
        total = [0] * len(histograms[0][1])
        for _, h in histograms:
            total = [a + b for a, b in zip(total, h)]
        n = sum(rows.values())
        features = len(next(iter(sums.values())))
        mean = [sum(s[i] for s in sums.values()) / n for i in range(features)] if n else []
        self.world.globals["histogram"] = total
        self.world.globals["feature_mean"] = mean
        self.world.globals["rows"] = n
        self.world.globals["nodes"] = sorted(node for node, _ in histograms)
        self.log.info("%d rows from %d nodes" % (n, len(histograms)))
