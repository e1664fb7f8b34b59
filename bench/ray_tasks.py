"""Ray's no-op task rate on this machine, the yardstick for Tessera's no-op tasks.

    bench/.venv/bin/python bench/ray_tasks.py [TASKS]

Starts a local Ray (one worker per core, as `ray.init()` does), warms the workers, then
submits TASKS no-op tasks (`noop.remote(i)`, which returns its argument) and waits for all
of them with `ray.get`; prints tasks per second. Each task takes one CPU, Ray's default.
"""

import sys
import time

import ray


@ray.remote
def noop(x):
    return x


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    ray.init(include_dashboard=False, logging_level="ERROR")
    ray.get([noop.remote(i) for i in range(200)])
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        got = ray.get([noop.remote(i) for i in range(n)])
        elapsed = time.perf_counter() - t
        assert got == list(range(n))
        best = max(best, n / elapsed)
    print(f"ray no-op tasks: {best:.0f} tasks/s (best of 3 runs of {n})")
    ray.shutdown()


if __name__ == "__main__":
    main()
