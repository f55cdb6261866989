"""A hostile producer against a real executor: real bash, sh, perl and python3 scripts in
cmd_dir, attacked through the environment, interpreter options and arguments. No attempt may
make a proof file appear outside cmd_dir; each ends `rejected` with a reason naming its cause.

The same tests run as root and as an unprivileged user (they create nothing root-only).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.config import Config
from task_job.confine import EnvPolicy
from tests.conftest import records_of, wait_done

SCRIPTS = {
    "run.sh": "#!/bin/bash\nls >/dev/null\necho ok\n",
    "posix.sh": "#!/bin/sh\nls >/dev/null\necho ok\n",
    "run.pl": "#!/usr/bin/perl\nwhile (<>) { print; }\nprint \"ok\\n\";\n",
    "plain.pl": "print \"ok\\n\";\n",
    "run.py": "#!/usr/bin/env python3\nimport json\nprint('ok')\n",
    "noexec.sh": "echo ok \"$@\"\n",  # no exec bit, no shebang: runs through bash
    "data.txt": "line\n",
}


@pytest.fixture
def attack(tmp_path: Path, cmd_dir: Path) -> dict[str, Any]:
    """Scripts in cmd_dir, a proof path outside it, and a payload that creates the proof."""
    for name, text in SCRIPTS.items():
        (cmd_dir / name).write_text(text)
        (cmd_dir / name).chmod(0o644 if name in ("noexec.sh", "data.txt", "plain.pl") else 0o755)
    outside = tmp_path / "outside"
    outside.mkdir()
    proof = outside / "proof"
    payload_sh = outside / "payload.sh"
    payload_sh.write_text(f"#!/bin/sh\ntouch {proof}\n")
    payload_sh.chmod(0o755)
    payload_py = outside / "sitecustomize.py"
    payload_py.write_text(f"open({str(proof)!r}, 'w').close()\n")
    payload_pm = outside / "Evil.pm"
    payload_pm.write_text(f"package Evil; open(my $f, '>', '{proof}'); 1;\n")
    return {"proof": proof, "outside": outside, "sh": str(payload_sh)}


def env_attacks(a: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(script, variable, value): one per family the loader, shells and interpreters read."""
    p, out, sh = a["proof"], a["outside"], a["sh"]
    return [
        ("run.sh", "BASH_ENV", f"$(touch {p})"),
        ("run.sh", "BASH_ENV", sh),
        ("posix.sh", "ENV", sh),
        ("run.sh", "BASH_FUNC_ls%%", f"() {{ touch {p}; }}"),
        ("run.sh", "BASH_FUNC_ls()", f"() {{ touch {p}; }}"),
        ("run.sh", "SHELLOPTS", "xtrace"),
        ("run.sh", "PS4", f"$(touch {p})"),
        ("run.sh", "PROMPT_COMMAND", f"touch {p}"),
        ("run.sh", "PATH", f"{out}:/usr/bin:/bin"),
        ("run.sh", "IFS", "/"),
        ("run.sh", "CDPATH", str(out)),
        ("run.sh", "HOME", str(out)),
        ("run.sh", "LD_PRELOAD", f"{out}/evil.so"),
        ("run.sh", "LD_LIBRARY_PATH", str(out)),
        ("run.sh", "LD_AUDIT", f"{out}/evil.so"),
        ("run.sh", "ld_preload", f"{out}/evil.so"),
        ("run.sh", "GCONV_PATH", str(out)),
        ("run.sh", "GLIBC_TUNABLES", "glibc.malloc.check=3"),
        ("run.sh", "MALLOC_CHECK_", "3"),
        ("run.py", "PYTHONPATH", str(out)),
        ("run.py", "PYTHONSTARTUP", f"{out}/sitecustomize.py"),
        ("run.py", "PYTHONWARNINGS", "ignore::evil.Category"),
        ("run.py", "PYTHONHOME", str(out)),
        ("run.py", "PYTHONINSPECT", "1"),
        ("run.py", "PYTHONUSERBASE", str(out)),
        ("run.pl", "PERL5OPT", f"-Mstrict;system('touch {p}')"),
        ("run.pl", "PERL5LIB", str(out)),
        ("run.pl", "PERLLIB", str(out)),
        ("run.pl", "PERL5DB", f"system('touch {p}')"),
        ("run.pl", "PERL_UNICODE", "S"),
        ("run.sh", "NODE_OPTIONS", f"--require {out}/x.js"),
        ("run.sh", "RUBYOPT", f"-r{out}/x.rb"),
        ("run.sh", "JAVA_TOOL_OPTIONS", f"-javaagent:{out}/x.jar"),
        ("run.sh", "GIT_SSH_COMMAND", f"touch {p}"),
        ("run.sh", "GIT_CONFIG_GLOBAL", f"{out}/gitconfig"),
        ("run.sh", "LESSOPEN", f"|touch {p}"),
        ("run.sh", "TAR_OPTIONS", f"--to-command=touch {p}"),
        ("run.sh", "MAKEFLAGS", f"--eval=$(shell touch {p})"),
        ("run.sh", "OPENSSL_CONF", f"{out}/openssl.cnf"),
        ("run.sh", "EDITOR", sh),
        ("run.sh", "PAGER", sh),
        ("run.sh", "SSH_ASKPASS", sh),
        ("run.sh", "SUDO_ASKPASS", sh),
        ("run.sh", "XDG_CONFIG_HOME", str(out)),
        ("run.sh", "TZ", f"{out}/zone"),
        ("run.sh", "TZ", "../../../etc/passwd"),
        ("run.sh", "LANG", f"{out}/locale"),
        ("run.sh", "LC_ALL", "../../evil"),
        ("run.sh", "TERM", "../../evil"),
        ("run.sh", "NEW_LOADER_VAR", "x"),  # only with a narrowed allow-list (below)
        ("run.sh", "1BAD", "x"),
        ("run.sh", "A-B", "x"),
    ]


async def run_task(r: redis.Redis, config: Config, argv: list[str], env: dict[str, str] | None = None,
                   ) -> Any:
    task_id = f"atk-{uuid.uuid4().hex[:10]}"
    spec: dict[str, Any] = {"cmdline": argv[0], "cmd_args": argv[1:]}
    if env:
        spec["env"] = env
    r.rpush(config.queue_name, orjson.dumps({"id": task_id, "type": "start", "task": spec}))
    return await wait_done(r, config, task_id, timeout=20)


async def test_environment_attacks_are_rejected_naming_the_variable(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        attack: dict[str, Any]) -> None:
    config = make_config(max_concurrency=8, task_env_allow=("*",))
    narrowed = make_config(max_concurrency=8, task_env_allow=("MODE", "CI_*"),
                           queue_name="narrow")
    await start_executor(config)
    await start_executor(narrowed)
    attacks = env_attacks(attack)

    async def one(script: str, name: str, value: str) -> None:
        cfg = narrowed if name == "NEW_LOADER_VAR" else config
        done = await run_task(sync_redis, cfg, [script], {name: value})
        assert done.fields["status"] == "rejected", (name, value, done.fields)
        shown = name[:64] if name.isidentifier() else repr(name[:64])
        assert shown in done.data or name in done.data, (name, done.data)

    await asyncio.gather(*(one(*a) for a in attacks))
    assert not attack["proof"].exists()


async def test_safe_environment_reaches_the_task_and_executor_secrets_do_not(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        cmd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (cmd_dir / "show.sh").write_text("#!/bin/sh\nenv\n")
    (cmd_dir / "show.sh").chmod(0o755)
    monkeypatch.setenv("TASK_JOB_REDIS_ADDR", "redis://:hunter2@h:1")
    monkeypatch.setenv("REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("SOME_URL", "redis://user:hunter2@host:6379/0")
    monkeypatch.setenv("BASH_FUNC_x%%", "() { echo hi; }")
    monkeypatch.setenv("PERL5OPT", "-Mstrict")
    monkeypatch.setenv("KEEP_ME", "kept")
    config = make_config()
    await start_executor(config)
    done = await run_task(sync_redis, config, ["show.sh"],
                          {"MODE": "ci", "CI_BRANCH": "main", "TZ": "Europe/Berlin", "LANG": "C.UTF-8"})
    assert done.fields["status"] == "succeeded", done.fields
    out = "".join(rec.data for rec in records_of(sync_redis, config, done.id) if not rec.is_done)
    for line in ("MODE=ci", "CI_BRANCH=main", "TZ=Europe/Berlin", "LANG=C.UTF-8", "KEEP_ME=kept"):
        assert line in out.splitlines(), line
    assert "hunter2" not in out and "PERL5OPT" not in out
    # The one TASK_JOB_ variable a task sees is its own marker (reaper.py), never a setting.
    assert [line.split("=")[0] for line in out.splitlines() if line.startswith("TASK_JOB_")] == [
        "TASK_JOB_RUN"]
    assert "BASH_FUNC" not in out and "PATH=" in out


OPTION_ATTACKS = [
    ["perl", "-n", "run.pl", "{proof_cmd}|"],
    ["perl", "-p", "run.pl", "{proof_cmd}|"],
    ["perl", "-i", "run.pl", "data.txt"],
    ["perl", "-ni", "run.pl"],
    ["perl", "-s", "run.pl", "-x=1"],
    ["perl", "-e", "system('{proof_cmd}')"],
    ["perl", "-E", "system('{proof_cmd}')"],
    ["perl", "-Mstrict", "run.pl"],
    ["perl", "-M-strict", "run.pl"],
    ["perl", "-I{outside}", "run.pl"],
    ["perl", "-d", "run.pl"],
    ["perl", "-d:Evil", "run.pl"],
    ["perl", "-x", "run.pl"],
    ["perl", "-S", "run.pl"],
    ["perl", "-F/x/", "run.pl"],
    ["perl", "-U", "run.pl"],
    ["perl", "-", "run.pl"],
    ["python3", "-c", "import os; os.system('{proof_cmd}')"],
    ["python3", "-m", "run"],
    ["python3", "-i", "run.py"],
    ["python3", "-W", "ignore::evil.Category", "run.py"],
    ["python3", "-Wignore::evil.Category", "run.py"],
    ["python3", "-X", "pycache_prefix={outside}", "run.py"],
    ["python3", "-X", "importtime=evil", "run.py"],
    ["python3", "-", "run.py"],
    ["python3", "--check-hash-based-pycs", "always", "run.py"],
    ["bash", "-c", "{proof_cmd}"],
    ["bash", "-ec", "{proof_cmd}"],
    ["bash", "-s"],
    ["bash", "-i", "run.sh"],
    ["bash", "-k", "run.sh"],
    ["bash", "-l", "run.sh"],
    ["bash", "--login", "run.sh"],
    ["bash", "--rcfile", "{sh}", "run.sh"],
    ["bash", "--init-file", "{sh}", "run.sh"],
    ["bash", "--debugger", "run.sh"],
    ["bash", "-O", "extdebug", "run.sh"],
    ["bash", "-o", "history", "run.sh"],
    ["sh", "-c", "{proof_cmd}"],
    ["sh", "-"],
    ["sh", "{sh}"],
    ["bash", "../outside/payload.sh"],
]


async def test_interpreter_option_attacks_are_rejected(
        config: Config, executor: Any, sync_redis: redis.Redis, attack: dict[str, Any]) -> None:
    async def one(argv: list[str]) -> None:
        words = [w.format(proof_cmd=f"touch {attack['proof']}", outside=attack["outside"],
                          sh=attack["sh"]) for w in argv]
        done = await run_task(sync_redis, config, words)
        assert done.fields["status"] == "rejected", (argv, done.fields)
        assert any(k in done.data for k in ("option", "script", "outside cmd_dir", "inline")), done.data

    await asyncio.gather(*(one(argv) for argv in OPTION_ATTACKS))
    assert not attack["proof"].exists()


PERL_ARGS = ["touch {p}|", " touch {p} | ", "|touch {p}", "  |touch {p}", "<&=0", ">{p}",
             "+<{p}", "+>{p}", ">>{p}", "< /etc/passwd"]


async def test_perl_arguments_that_open_would_run_are_rejected(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        attack: dict[str, Any]) -> None:
    config = make_config(max_concurrency=8)
    perl_default = make_config(max_concurrency=8, script_interpreter="perl", queue_name="perlq")
    await start_executor(config)
    await start_executor(perl_default)

    async def one(how: list[str], arg: str) -> None:
        cfg = perl_default if how == ["plain.pl"] else config
        done = await run_task(sync_redis, cfg, [*how, arg.format(p=attack["proof"])])
        assert done.fields["status"] == "rejected", (how, arg, done.fields)
        assert "perl" in done.data and "argument" in done.data

    ways = [["perl", "run.pl"], ["run.pl"], ["perl", "-w", "run.pl"], ["plain.pl"]]
    await asyncio.gather(*(one(how, arg) for how in ways for arg in PERL_ARGS))
    assert not attack["proof"].exists()


async def test_perl_argument_check_can_be_turned_off_for_a_script(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        attack: dict[str, Any], cmd_dir: Path) -> None:
    (cmd_dir / "argv.pl").write_text('#!/usr/bin/perl\nprint "[$_]\\n" for @ARGV;\n')
    (cmd_dir / "argv.pl").chmod(0o755)
    config = make_config(perl_args_unchecked=("argv.pl",))
    await start_executor(config)
    done = await run_task(sync_redis, config, ["argv.pl", "a|b|"])
    assert done.fields["status"] == "succeeded", done.fields
    done = await run_task(sync_redis, config, ["run.pl", "a|"])
    assert done.fields["status"] == "rejected"


ALLOWED = [
    ["bash", "-eu", "-o", "pipefail", "run.sh"],
    ["sh", "-x", "posix.sh"],
    ["python3", "-u", "-B", "-W", "ignore", "-X", "utf8", "run.py"],
    ["perl", "-w", "run.pl", "data.txt"],
    ["perl", "-T", "run.pl", "-"],
    ["run.pl", "data.txt"],
    ["noexec.sh", "a"],
]


async def test_inert_options_and_plain_arguments_run(
        config: Config, executor: Any, sync_redis: redis.Redis, attack: dict[str, Any]) -> None:
    async def one(argv: list[str]) -> None:
        done = await run_task(sync_redis, config, argv)
        assert done.fields["status"] == "succeeded", (argv, done.data, done.fields)

    await asyncio.gather(*(one(argv) for argv in ALLOWED))


async def test_script_without_exec_bit_or_shebang_runs_like_the_original(
        config: Config, executor: Any, sync_redis: redis.Redis, attack: dict[str, Any]) -> None:
    done = await run_task(sync_redis, config, ["noexec.sh", "x y"])
    assert done.fields["status"] == "succeeded", done.fields
    out = "".join(rec.data for rec in records_of(sync_redis, config, done.id) if not rec.is_done)
    assert out == "ok x y\n"
    assert done.fields["child_num"] == 0


async def test_a_path_swapped_to_a_symlink_after_resolution_is_not_run(
        cmd_dir: Path, attack: dict[str, Any]) -> None:
    """The file is checked through the descriptor that was opened: a directory swapped for
    a symlink out of cmd_dir before that open is caught by the kernel's name for it."""
    from task_job.confine import inspect
    from task_job.errors import ConfinementError

    sub = cmd_dir / "tools"
    sub.mkdir()
    (sub / "payload.sh").write_text("#!/bin/sh\necho inside\n")
    real = os.path.realpath(cmd_dir)
    os.rename(sub, cmd_dir / "tools.old")
    os.symlink(attack["outside"], sub)  # tools/payload.sh now names the outside payload
    with pytest.raises(ConfinementError, match="outside cmd_dir"):
        inspect("tools/payload.sh", real, real, "command")


def test_env_policy_denies_by_family_whatever_the_allow_list() -> None:
    policy = EnvPolicy.build(allow=("*",))
    for name in ("LD_ANYTHING_NEW", "BASH_FUNC_f%%", "PYTHONNEWTHING", "PERL5NEW", "Perl5Opt",
                 "GIT_NEW", "NODE_NEW", "RUBYNEW", "JAVA_NEW", "SSH_NEW"):
        assert policy.refusal(name, "x") is not None, name
    narrowed = EnvPolicy.build(allow=("LD_*", "MODE"))
    assert narrowed.refusal("LD_PRELOAD", "x") is not None  # deny wins over allow
    assert narrowed.refusal("MODE", "ci") is None
    assert narrowed.refusal("OTHER", "x") is not None


@pytest.mark.skipif(os.environ.get("TASK_JOB_TEST_UNPRIVILEGED") == "1",
                    reason="this run is the unprivileged one")
def test_the_same_attacks_fail_when_everything_runs_as_an_unprivileged_user(tmp_path: Path) -> None:
    """Reruns this module as nobody (uid 65534): executor, scripts, proof files and all."""
    if os.geteuid() != 0:
        pytest.skip("not root: this run is the unprivileged one already")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot drop to an unprivileged user")
    import pwd

    from task_job.spawner import interpreter_for
    from task_job.users import lookup

    nobody = 65534
    # The tests start `sys.executable` again (executors, the guard): it must be a Python that
    # user may run under its own name, as the executor's spawner needs one too.
    python = interpreter_for(lookup(pwd.getpwuid(nobody).pw_name))
    if python is None:
        pytest.skip(f"no python{sys.version_info[0]}.{sys.version_info[1]} that uid {nobody} may run")
    home = tmp_path / "nobody"
    home.mkdir()
    os.chown(home, nobody, nobody)
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's own base directory is private to root
        if str(parent).startswith(tempfile.gettempdir() + os.sep):
            parent.chmod(parent.stat().st_mode | 0o005)
    site = [p for p in sys.path if p.endswith("site-packages")]
    root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", python, "-m",
         "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(home / "bt"),
         str(Path(__file__).resolve())],
        capture_output=True, text=True, timeout=240, cwd=root,
        env={**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONPATH": os.pathsep.join([*site, root]), "TASK_JOB_TEST_UNPRIVILEGED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
