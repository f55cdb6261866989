"""The job RQ runs in the benchmarks: the same command task-job runs, via subprocess."""

import subprocess


def run(argv: list[str]) -> bytes:
    return subprocess.run(argv, capture_output=True, check=False).stdout
