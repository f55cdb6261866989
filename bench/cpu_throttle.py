"""Accuracy of max_cpu_percent: a busy loop of --seconds under each share; the CPU it got
(wait4's usage in its done record) over its duration, against the share asked for.

    python bench/cpu_throttle.py [--seconds 3] [--shares 10,30,50,80]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from _harness import executor, machine, redis_server, wait_done

BUSY = "#!/usr/bin/env python3\nimport sys, time\nend = time.monotonic() + float(sys.argv[1])\n" \
       "while time.monotonic() < end:\n    pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shares", default="10,30,50,80")
    args = parser.parse_args()
    rows = []
    with redis_server() as (server, r), tempfile.TemporaryDirectory() as cmd_dir:
        path = os.path.join(cmd_dir, "busy.py")
        with open(path, "w") as f:
            f.write(BUSY)
        os.chmod(path, 0o755)
        with executor(server.url, cmd_dir, max_concurrency=1):
            start = 0
            for i, share in enumerate(int(s) for s in args.shares.split(",")):
                r.rpush("queue_job_task", json.dumps({"id": f"b{i}", "task": {
                    "cmdline": "busy.py", "cmd_args": [str(args.seconds)],
                    "limits": {"max_cpu_percent": share}}}))
                done, start = wait_done(r, "queue_job_task_logs", f"b{i}", start, timeout=120)
                usage = done["usage"]
                got = (usage["cpu_user"] + usage["cpu_system"]) / done["duration"] * 100
                rows.append((share, got))
    print(f"{machine()}; a busy loop of {args.seconds:g} s per share")
    print("| max_cpu_percent | CPU share it got |")
    print("| --- | --- |")
    for share, got in rows:
        print(f"| {share}% | {got:.1f}% |")


if __name__ == "__main__":
    main()
