"""Runs a command and reports the peak total resident memory of it and every process it
started (summed over the process tree and its session, sampled every 20 ms), as JSON on
stderr's last line: {"peak_rss_mib": ..., "processes": ...}. The command's own output
passes through."""

import json
import os
import subprocess
import sys
import time


def tree(root):
    """The pids of root, its descendants, and processes in root's session."""
    parents, sessions = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(") ", 1)[1].split()
            parents[int(d)] = int(rest[1])
            sessions[int(d)] = int(rest[3])
        except (OSError, IndexError, ValueError):
            pass
    out = {p for p, s in sessions.items() if s == root}
    out.add(root)
    grew = True
    while grew:
        grew = False
        for p, pp in parents.items():
            if pp in out and p not in out:
                out.add(p)
                grew = True
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    proc = subprocess.Popen(sys.argv[1:], start_new_session=True)
    peak, peak_n = 0, 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        total = sum(rss_kib(p) for p in pids)
        if total > peak:
            peak, peak_n = total, len(pids)
        time.sleep(0.02)
    print(json.dumps({"peak_rss_mib": round(peak / 1024, 1), "processes": peak_n}), file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
