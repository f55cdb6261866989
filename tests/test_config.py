"""Config loading: comments, defaults, env overrides, one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from task_job.config import Config, load_config, redact_url, strip_comments
from task_job.errors import ConfigError


def test_defaults_keep_the_original_names() -> None:
    cfg = Config(queue_name="jobs")
    assert (cfg.queue_control_name, cfg.logs_channel, cfg.cmd_dir) == ("jobs_control", "jobs_logs", "/tmp")
    assert Config().queue_name == "queue_job_task"
    assert ":" in Config().executor_id


def test_comments_are_stripped_but_not_inside_strings() -> None:
    text = '{\n  // a comment\n  "redis_addr": "redis://h:1/0", // trailing\n  "x": "a//b"\n}'
    assert strip_comments(text) == '{\n  \n  "redis_addr": "redis://h:1/0", \n  "x": "a//b"\n}'


def test_file_env_and_overrides_apply_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('// original style\n{"queue_name": "q1", "max_concurrency": 2, '
                    f'"logs_channel": "", "cmd_dir": "{tmp_path}"}}')
    cfg = load_config(path, env={"TASK_JOB_MAX_CONCURRENCY": "3", "TASK_JOB_LOGS": "false",
                                 "TASK_JOB_INTERPRETERS": "sh,python3"},
                      overrides={"queue_name": "q2"})
    assert (cfg.queue_name, cfg.max_concurrency, cfg.logs) == ("q2", 3, False)
    assert cfg.logs_channel == "q2_logs"  # "" means the default
    assert cfg.interpreters == ("sh", "python3")


@pytest.mark.parametrize("body, key", [
    ('{"max_concurrency": "many"}', "max_concurrency"),
    ('{"max_concurrency": 0}', "max_concurrency"),
    ('{"kill_grace": -1}', "kill_grace"),
    ('{"confine": "loose"}', "confine"),
    ('{"no_such_key": 1}', "no_such_key"),
    ('{"redis_addr": "ftp://x"}', "redis_addr"),
    ('{"redis_addr": "nohost"}', "redis_addr"),
    ('{"cmd_dir": "/does/not/exist"}', "cmd_dir"),
    ('{"logs": "perhaps"}', "logs"),
    ('{"interpreters": [1]}', "interpreters"),
    ('{"heartbeat_interval": 10, "dead_after": 5}', "dead_after"),
    ('not json', "not valid JSON"),
])
def test_bad_config_names_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TASK_JOB_KILL_GRACE"):
        load_config(None, env={"TASK_JOB_KILL_GRACE": "soon"})


def test_password_never_shows_in_repr() -> None:
    cfg = Config(redis_addr="redis://user:s3cret@host:6379/0")
    assert "s3cret" not in repr(cfg)
    assert redact_url(cfg.redis_addr) == "redis://user:***@host:6379/0"
    # every URL of a NATS cluster list, the callback URL and its signing secret
    cfg = Config(nats_url="nats://a:s3cret@h1:4222,nats://b:s3cret@h2:4222",
                 callback_url="https://hook:s3cret@example.com/done", callback_secret="s3cret")
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.redacted())
    assert cfg.redacted()["nats_url"] == "nats://a:***@h1:4222,nats://b:***@h2:4222"


def test_example_config_loads_and_lists_every_key() -> None:
    example = Path(__file__).parent.parent / "config.example.json"
    cfg = load_config(example, env={}, check_paths=False)
    text = example.read_text()
    from dataclasses import fields
    missing = [f.name for f in fields(Config) if f'"{f.name}"' not in text]
    assert not missing, f"config.example.json lacks {missing}"
    assert cfg.queue_name == "queue_job_task"


def test_a_misspelt_environment_setting_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TASK_JOB_MAX_CONCURENCY: unknown setting "
                                          r"\(did you mean TASK_JOB_MAX_CONCURRENCY\?\)"):
        load_config(env={"TASK_JOB_MAX_CONCURENCY": "4"}, check_paths=False)
    load_config(env={"TASK_JOB_RUN": "x", "TASK_JOB_MAX_CONCURRENCY": "4"}, check_paths=False)


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"cmd_dir": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path, check_paths=False)
