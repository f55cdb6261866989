"""The runner on its own: real processes, both ways of watching their fds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from task_job import runner
from task_job.protocol import MsgType
from task_job.runner import Ending, Run

from .conftest import pipes_and_pidfds


@pytest.fixture(params=["epoll", "loop"])
def watcher_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The runner's own epoll set, or the event loop's readers where epoll is missing."""
    monkeypatch.setattr(runner, "_current", None)
    if request.param == "loop":
        monkeypatch.setattr(runner, "_EPOLL", False)
    return str(request.param)


async def test_stdin_and_both_pipes_flow_through_either_watcher(watcher_kind: str, tmp_path: Path) -> None:
    before = pipes_and_pidfds()
    out: dict[MsgType, list[bytes]] = {MsgType.STDOUT: [], MsgType.STDERR: []}

    async def collect(kind: MsgType, data: bytes) -> None:
        out[kind].append(data)

    text = "".join(f"{i:06d} a line of stdin\n" for i in range(20000))  # 420 KB: many pipefuls
    script = tmp_path / "cat-then-stderr.sh"
    script.write_text("#!/bin/sh\ncat\necho to-stderr >&2\n")
    script.chmod(0o755)
    run = Run([str(script)], cwd=str(tmp_path), env=None, on_output=collect, stdin=text)
    await run.start()
    result = await run.wait()
    assert result.ending is Ending.EXITED and result.returncode == 0
    assert b"".join(out[MsgType.STDOUT]) == text.encode()
    assert b"".join(out[MsgType.STDERR]) == b"to-stderr\n"
    true = shutil.which("true")
    assert true is not None
    quiet = Run([true], cwd=str(tmp_path), env=None, on_output=collect)
    await quiet.start()
    assert (await quiet.wait()).returncode == 0
    assert pipes_and_pidfds() <= before
    assert isinstance(runner._watcher(), runner._Watcher if watcher_kind == "epoll" else runner._LoopWatcher)


async def test_a_kill_ends_a_silent_process_under_either_watcher(watcher_kind: str, tmp_path: Path) -> None:
    async def ignore(kind: MsgType, data: bytes) -> None:
        pass

    sleep = shutil.which("sleep")
    assert sleep is not None
    run = Run([sleep, "1000"], cwd=str(tmp_path), env=None, on_output=ignore, kill_grace=1.0)
    await run.start()
    run.kill("test")
    result = await run.wait()
    assert result.ending is Ending.KILLED and result.kill_signal == "SIGTERM"
    assert result.signal == "SIGTERM"
