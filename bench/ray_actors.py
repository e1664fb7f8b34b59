"""Ray actor call latency on this machine: a synchronous loop of `ray.get(a.echo.remote(x))`.

Prints one JSON line like `tessera call --repeat`: calls, p50_us, p99_us, calls_per_s.
"""

import json
import sys
import time

import ray


@ray.remote
class Echo:
    def echo(self, x):
        return x


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    a = Echo.remote()
    for _ in range(200):  # warm up
        ray.get(a.echo.remote(1))
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        ray.get(a.echo.remote(1))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, max(0, int(len(lat) * p + 0.999999) - 1))] * 1e6
    print(json.dumps({"calls": n, "concurrency": 1, "p50_us": round(pct(0.5), 1), "p99_us": round(pct(0.99), 1),
                      "calls_per_s": round(n / wall)}))
    ray.shutdown()


if __name__ == "__main__":
    main()
