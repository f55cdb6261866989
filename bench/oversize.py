"""Memory an oversize task message costs an executor: one message of --mb MB (over
max_message_bytes) pushed onto the queue; the executor's peak RSS before and after it is
dead-lettered, and what stays in the dead-letter list.

    python bench/oversize.py [--mb 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from _harness import executor, peak_rss_mb, redis_server, rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    size = args.mb << 20
    with redis_server() as (server, r), tempfile.TemporaryDirectory() as cmd_dir:
        with executor(server.url, cmd_dir) as proc:
            time.sleep(0.5)
            before = peak_rss_mb(proc.pid)
            body = b'{"id":"big","tube":"' + b"t" * size + b'","task":{"cmdline":"true"}}'
            r.rpush("queue_job_task", body)
            del body
            deadline = time.monotonic() + 120
            while not r.llen("queue_job_task_dead"):
                assert time.monotonic() < deadline, "not dead-lettered"
                time.sleep(0.05)
            time.sleep(0.5)
            peak = peak_rss_mb(proc.pid)
            now = rss_mb(proc.pid)
            entry = json.loads(r.lindex("queue_job_task_dead", 0))
            processing = r.llen("{queue_job_task}:processing:" + f"bench-{__import__('os').getpid()}")
    print(f"message {args.mb} MB: executor peak RSS {before:.0f} -> {peak:.0f} MB "
          f"(+{peak - before:.0f} MB, {(peak - before) / args.mb:.2f}x the message), "
          f"{now:.0f} MB after; dead-letter entry {len(json.dumps(entry)) / 1024:.0f} KiB "
          f"(size {entry['size']}, truncated {entry.get('truncated')}); left claimed: {processing}")


if __name__ == "__main__":
    main()
