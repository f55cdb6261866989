"""Idle cost: an executor with nothing to do, watched for --seconds: its RSS, and CPU seconds
per idle minute (any busy polling would show here). Beside it, in the same run, an idle
`rq worker` on the same Redis. The executor's numbers include its heartbeats, reaper and
blocking claim/control loops; its guard process is reported on its own line.

    python bench/idle.py [--seconds 60] [--no-rq]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from _harness import cpu_seconds, executor, guard_of, have_rq, machine, redis_server, rq_worker, rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--no-rq", action="store_true")
    args = parser.parse_args()
    use_rq = not args.no_rq and have_rq()
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r), ExitStack() as stack:
        procs: dict[str, subprocess.Popen[bytes]] = {
            "task-job executor": stack.enter_context(executor(server.url, cmd_dir))}
        guard = guard_of(procs["task-job executor"].pid)
        if use_rq:
            procs["rq worker"] = stack.enter_context(rq_worker(server.url, "bench"))
        time.sleep(2)  # past start-up
        pids = {name: p.pid for name, p in procs.items()}
        if guard:
            pids["task-job guard"] = guard
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        print(f"watching for {args.seconds:g} s ...", file=sys.stderr, flush=True)
        time.sleep(args.seconds)
        rows = [(name, rss_mb(pid), (cpu_seconds(pid) - before[name]) / args.seconds * 60)
                for name, pid in pids.items()]
    print(f"Idle cost over {args.seconds:g} s")
    print(f"machine: {machine()}")
    print("| process | RSS, MB | CPU s per idle minute |")
    print("|---|---|---|")
    for name, rss, cpu in rows:
        print(f"| {name} | {rss:.1f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
