"""What a completion callback costs per task: the same checkout with and without
`callback_url` (a webhook on loopback that answers 200), in alternated runs of N `true` tasks at
max_concurrency 16. Prints the median executor CPU per task of each side and the difference,
and the median throughput (push to the last done record); every callback must have arrived
by the time the executor has stopped.

    python bench/callbacks.py [--tasks 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _harness import machine, redis_server
from policy_cost import run_once

ROOT = Path(__file__).resolve().parent.parent


class Receiver(BaseHTTPRequestHandler):
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Receiver.lock:
            Receiver.count += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/done"
    sides: dict[str, list[float]] = {"without": [], "with": []}
    took: dict[str, list[float]] = {"without": [], "with": []}
    try:
        with tempfile.TemporaryDirectory(prefix="tj-cmd-") as cmd_dir, redis_server() as (redis, r):
            shutil.copy(shutil.which("true") or "/bin/true", os.path.join(cmd_dir, "true"))
            for i in range(args.runs):
                order = [("without", {}), ("with", {"callback_url": url, "callback_secret": "bench"})]
                for name, extra in (order if i % 2 == 0 else order[::-1]):
                    Receiver.count = 0
                    elapsed: list[float] = []
                    sides[name].append(run_once(ROOT, redis.url, r, cmd_dir, args.tasks, elapsed, **extra))
                    took[name].append(elapsed[-1])
                    if extra:  # the executor is stopped: every callback was sent before it exited
                        assert Receiver.count == args.tasks, Receiver.count  # none lost, none twice
                    print(f"run {i + 1} {name:7}: {sides[name][-1] * 1e6:6.0f} us CPU per task", flush=True)
    finally:
        server.shutdown()
    a, b = statistics.median(sides["without"]), statistics.median(sides["with"])
    print(f"\n{machine()}; {args.tasks} `true` tasks, concurrency 16, {args.runs} alternated runs")
    print(f"without callbacks: median {a * 1e6:.0f} us executor CPU per task")
    print(f"with a webhook:    median {b * 1e6:.0f} us executor CPU per task")
    print(f"difference: {(b - a) * 1e6:+.0f} us per task ({b / a:.3f}x)")
    ra, rb = (args.tasks / statistics.median(took[k]) for k in ("without", "with"))
    print(f"throughput: without {ra:.0f} tasks/s, with {rb:.0f} tasks/s ({rb / ra:.2f}x)")
    print("every callback arrived before its executor had stopped")


if __name__ == "__main__":
    main()
