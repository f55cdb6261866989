"""Confinement to cmd_dir (DESIGN.md §4): every escape refused, after symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from task_job.confine import confine
from task_job.errors import ConfinementError

INTERPRETERS = ("sh", "bash", "python3", "perl")


def check(cmd_dir: Path, *argv: str, cwd: str | None = None) -> list[str]:
    out, _ = confine(list(argv), cmd_dir=str(cmd_dir), cwd=cwd, interpreters=INTERPRETERS)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    evil = path / "evil.sh"
    evil.write_text("#!/bin/sh\necho escaped\n")
    evil.chmod(0o755)
    return path


def test_command_inside_cmd_dir_resolves_to_its_real_path(cmd_dir: Path) -> None:
    assert check(cmd_dir, "install.sh", "x") == [str(cmd_dir / "install.sh"), "x"]


def test_symlink_inside_cmd_dir_to_a_file_inside_is_allowed(cmd_dir: Path) -> None:
    (cmd_dir / "link.sh").symlink_to(cmd_dir / "install.sh")
    assert check(cmd_dir, "link.sh") == [str(cmd_dir / "install.sh")]


ESCAPES = [
    ("../outside/evil.sh",),
    ("sub/../../outside/evil.sh",),
    ("{outside}/evil.sh",),
    ("/bin/echo", "hi"),
    ("ls",),
    ("link-out.sh",),
    ("sh", "-c", "echo escaped"),
    ("sh", "-ec", "echo escaped"),
    ("bash", "-c", "echo escaped"),
    ("bash", "-s"),
    ("bash", "--rcfile", "install.sh"),
    ("sh",),
    ("sh", "-"),
    ("python3", "-c", "print(1)"),
    ("python3", "-m", "http.server"),
    ("python3", "-i", "script.py"),
    ("perl", "-e", "print 1"),
    ("perl", "-E", "say 1"),
    ("sh", "../outside/evil.sh"),
    ("python3", "{outside}/evil.sh"),
    ("sh", "link-out.sh"),
    ("{outside}/sh", "install.sh"),
]


@pytest.mark.parametrize("argv", ESCAPES, ids=lambda a: " ".join(a))
def test_escape_from_cmd_dir_is_refused(cmd_dir: Path, outside: Path, argv: tuple[str, ...]) -> None:
    (cmd_dir / "link-out.sh").symlink_to(outside / "evil.sh")
    fake_sh = outside / "sh"
    fake_sh.write_text("#!/bin/sh\n")
    fake_sh.chmod(0o755)
    words = [a.replace("{outside}", str(outside)) for a in argv]
    with pytest.raises(ConfinementError):
        check(cmd_dir, *words)


def test_symlinked_directory_out_of_cmd_dir_is_refused(cmd_dir: Path, outside: Path) -> None:
    (cmd_dir / "dirlink").symlink_to(outside)
    with pytest.raises(ConfinementError, match="outside cmd_dir"):
        check(cmd_dir, "dirlink/evil.sh")
    with pytest.raises(ConfinementError, match="outside cmd_dir"):
        check(cmd_dir, "install.sh", cwd="dirlink")


def test_cwd_must_stay_inside_cmd_dir(cmd_dir: Path) -> None:
    _, workdir = confine(["../install.sh"], cmd_dir=str(cmd_dir), cwd="sub", interpreters=())
    assert workdir == str(cmd_dir / "sub")
    with pytest.raises(ConfinementError):
        confine(["install.sh"], cmd_dir=str(cmd_dir), cwd="../..", interpreters=())


def test_script_without_exec_bit_or_shebang_runs_through_script_interpreter(cmd_dir: Path) -> None:
    (cmd_dir / "plain.sh").write_text("echo hi\n")
    (cmd_dir / "noshebang.sh").write_text("echo hi\n")
    (cmd_dir / "noshebang.sh").chmod(0o755)
    for name in ("plain.sh", "noshebang.sh"):
        out, _ = confine([name, "a"], cmd_dir=str(cmd_dir), interpreters=())
        assert os.path.basename(out[0]) == "bash" and out[1:] == [str(cmd_dir / name), "a"]
        with pytest.raises(ConfinementError, match="not executable|script_interpreter is off"):
            confine([name], cmd_dir=str(cmd_dir), script_interpreter="")


ALLOWED = [
    ("sh", "install.sh"),
    ("sh", "-e", "-x", "install.sh", "-c", "anything"),
    ("bash", "-o", "pipefail", "install.sh"),
    ("python3", "-u", "-B", "script.py", "-c", "x"),
    ("python3", "-W", "ignore", "script.py"),
    ("perl", "-w", "install.sh"),
    ("sh", "--", "install.sh"),
]


@pytest.mark.parametrize("argv", ALLOWED, ids=lambda a: " ".join(a))
def test_interpreter_with_script_inside_cmd_dir_is_allowed(cmd_dir: Path, argv: tuple[str, ...]) -> None:
    out = check(cmd_dir, *argv)
    assert os.path.isabs(out[0])
    script = next(a for a in out[1:] if a.endswith((".sh", ".py")))
    assert script.startswith(str(cmd_dir))


def test_cwd_mode_checks_only_the_working_directory(cmd_dir: Path) -> None:
    out, workdir = confine(["ls", "-l"], cmd_dir=str(cmd_dir), mode="cwd")
    assert out[0].endswith("/ls") and workdir == str(cmd_dir)
    with pytest.raises(ConfinementError):
        confine(["ls"], cmd_dir=str(cmd_dir), cwd="..", mode="cwd")
