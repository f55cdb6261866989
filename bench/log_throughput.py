"""Output throughput: a task printing 2,000,000 short lines, and one printing 200 MB of long
lines. Reports the executor's delivered lines/s and MB/s as a ratio of the raw pipe rate (the
same command read by a process that discards it), measured in the same run, and the executor's
peak RSS. Medians over --runs.

    python bench/log_throughput.py [--runs 3] [--lines 2000000] [--mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from _harness import executor, peak_rss_mb, redis_server, wait_final

SCRIPTS = {
    "short.sh": '#!/bin/sh\nseq 1 "$1"\n',
    "long.sh": '#!/bin/sh\nhead -c "$1" /dev/zero | tr "\\0" "x" | fold -w 999\n',
}


def raw_rate(cmd: list[str]) -> float:
    """Seconds for the command's output to be read to EOF and discarded."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while proc.stdout.read(1 << 16):
        pass
    proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    cases = [("short lines", "short.sh", str(args.lines)), ("long lines", "long.sh", str(args.mb * 1_000_000))]
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        for name, text in SCRIPTS.items():
            path = os.path.join(cmd_dir, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        print(f"{'case':12} {'raw s':>8} {'task-job s':>10} {'ratio':>6} {'lines/s':>12} {'MB/s':>8} {'peak RSS MB':>12}")
        for label, script, arg in cases:
            raws, ours, rss = [], [], []
            nbytes = nlines = 0
            for run in range(args.runs):
                raws.append(raw_rate([os.path.join(cmd_dir, script), arg]))
                r.flushall()
                with executor(server.url, cmd_dir, task_log_max_records=100) as proc:
                    task_id = f"t{run}"
                    t0 = time.perf_counter()
                    r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": script, "cmd_args": [arg]}}))
                    status = wait_final(r, task_id)
                    ours.append(time.perf_counter() - t0)
                    rss.append(peak_rss_mb(proc.pid))
                    assert status == b"succeeded", status
                    nbytes = nlines = 0
                    for start in range(0, r.llen("queue_job_task_logs"), 500):
                        for raw in r.lrange("queue_job_task_logs", start, start + 499):
                            rec = json.loads(raw)
                            if rec["msg_type"] == "stdout":
                                nbytes += len(rec["data"])
                                nlines += rec["data"].count("\n")
            raw_s, our_s = statistics.median(raws), statistics.median(ours)
            print(f"{label:12} {raw_s:8.3f} {our_s:10.3f} {raw_s / our_s:6.2f} {nlines / our_s:12,.0f} "
                  f"{nbytes / our_s / 1e6:8.1f} {max(rss):12.1f}")


if __name__ == "__main__":
    main()
