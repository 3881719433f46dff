"""Run a command and record its wall time and peak RSS of its whole process tree (sampled every 0.2 s).

usage: python bench/measure.py RESULTS.jsonl LABEL -- command args...
Appends one JSON line {label, command, seconds, peak_rss_gib, returncode, date, host} to RESULTS.jsonl and
exits with the command's return code. Used by every benchmark so numbers are taken the same way.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main() -> int:
    results, label, sep, *command = sys.argv[1:]
    assert sep == "--", __doc__
    start = time.perf_counter()
    child = subprocess.Popen(command)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    record = {"label": label, "command": " ".join(command), "seconds": round(seconds, 2),
              "peak_rss_gib": round(peak / 2**30, 3), "returncode": child.returncode,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    with open(results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"[measure] {label}: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB, rc {child.returncode}",
          file=sys.stderr, flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
