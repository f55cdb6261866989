"""Table and property tests of the pure message parser and builders."""

from __future__ import annotations

import base64
import json
import shlex

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from task_job.errors import ProtocolError
from task_job.protocol import (
    MsgType,
    Outcome,
    RecordHead,
    Status,
    Task,
    build_done_record,
    build_output_record,
    parse_control,
    parse_record,
    parse_task,
    peek_id,
    split_cmdline,
)

ORIGINAL = (b'{"id":"101","type":"test","task":{"cmdline":"install.sh",'
            b'"cmd_args":["feature/homestead"],"timeout":3600}}')


def test_original_example_message_parses_with_every_field() -> None:
    task = parse_task(ORIGINAL)
    assert (task.id, task.type, task.cmdline, task.cmd_args, task.timeout) == (
        "101", "test", "install.sh", ("feature/homestead",), 3600.0)
    assert task.argv == ("install.sh", "feature/homestead")
    assert task.raw == ORIGINAL


def test_original_kill_message_parses() -> None:
    ctl = parse_control(b'{"id":"101","type":"kill"}')
    assert (ctl.id, ctl.type) == ("101", "kill")


def test_numeric_id_is_stringified_and_cmdline_is_shell_split() -> None:
    task = parse_task(b'{"id": 7, "task": {"cmdline": "run.sh \'a b\' \\"c d\\" e"}}')
    assert task.id == "7"
    assert task.argv == ("run.sh", "a b", "c d", "e")


@pytest.mark.parametrize("timeout, expected", [(0, None), (-5, None), (1.5, 1.5), (None, None)])
def test_timeout_zero_or_negative_means_none(timeout: float | None, expected: float | None) -> None:
    task = parse_task(orjson.dumps({"id": "1", "task": {"cmdline": "x", "timeout": timeout}}))
    assert task.timeout == expected


def test_unknown_fields_are_ignored() -> None:
    task = parse_task(b'{"id":"1","future":{"x":1},"task":{"cmdline":"x","novel":[1,2]}}')
    assert isinstance(task, Task)


MALFORMED = [
    (b"not json", "not valid JSON", None),
    (b"[1,2]", "must be a JSON object", None),
    (b"{}", "missing 'id'", None),
    (b'{"id": true, "task": {"cmdline": "x"}}', "'id' must be a string", None),
    (b'{"id": "", "task": {"cmdline": "x"}}', "'id' is empty", None),
    (b'{"id": "a\\nb", "task": {"cmdline": "x"}}', "control characters", None),
    (b'{"id": "5"}', "missing 'task'", "5"),
    (b'{"id": "5", "task": "install.sh"}', "'task' must be an object", "5"),
    (b'{"id": "5", "task": {}}', "missing 'task.cmdline'", "5"),
    (b'{"id": "5", "task": {"cmdline": 42}}', "'task.cmdline' must be a string", "5"),
    (b'{"id": "5", "task": {"cmdline": "   "}}', "'task.cmdline' is empty", "5"),
    (b'{"id": "5", "task": {"cmdline": "a \'b"}}', "cannot be split", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "cmd_args": "a"}}', "must be an array", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "cmd_args": [1]}}', "cmd_args[0]' must be a string", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "timeout": "10"}}', "'task.timeout' must be a number", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "env": {"A": 1}}}', "task.env.A", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "env": {"A=B": "1"}}}', "invalid name", "5"),
    (b'{"id": "5", "task": {"cmdline": "x", "on_lost": "maybe"}}', "on_lost", "5"),
    (b'{"id": "5", "task": {"cmdline": "x\\u0000y"}}', "NUL", "5"),
]


@pytest.mark.parametrize("raw, reason, task_id", MALFORMED)
def test_malformed_message_gives_clear_reason(raw: bytes, reason: str, task_id: str | None) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_task(raw)
    assert reason in info.value.reason
    assert info.value.task_id == task_id


def test_oversize_message_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parse_task(b'{"id":"1","task":{"cmdline":"' + b"x" * 2000 + b'"}}', max_bytes=1000)


def test_unknown_control_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown control type"):
        parse_control(b'{"id": "1", "type": "pause"}')


def test_peek_id_reads_id_of_invalid_task() -> None:
    assert peek_id(b'{"id": 9, "task": 1}') == "9"
    assert peek_id(b"garbage") is None


def test_output_record_has_tasklog_fields_and_base64_for_binary() -> None:
    head = RecordHead("101", "test", "tube1", "host-a/1")
    text = orjson.loads(build_output_record(head, MsgType.STDOUT, b"line\n", 3, 1.5))
    assert text == {"id": "101", "type": "test", "tube": "tube1", "msg_type": "stdout",
                    "data": "line\n", "seq": 3, "ts": 1.5, "executor": "host-a/1",
                    "child_num": 0}
    binary = parse_record(build_output_record(head, MsgType.STDERR, b"\xff\xfe", 4, 2.0))
    assert binary.fields["encoding"] == "base64"
    assert binary.payload == b"\xff\xfe"
    assert base64.b64decode(binary.data) == b"\xff\xfe"


def test_done_record_carries_status_and_times() -> None:
    head = RecordHead("101", "test", None, "h/1")
    outcome = Outcome(Status.FAILED, "exit status 2", exit_code=2, started_at=1.0,
                      finished_at=3.0, duration=2.0)
    done = orjson.loads(build_done_record(head, outcome, 7, 3.0))
    assert done["msg_type"] == "done" and done["status"] == "failed"
    assert (done["exit_code"], done["signal"], done["data"], done["seq"]) == (2, None, "exit status 2", 7)
    assert (done["started_at"], done["finished_at"], done["duration"]) == (1.0, 3.0, 2.0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
task_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=10), st.integers(), st.none())},
    optional={"type": json_values, "tube": json_values,
              "task": st.one_of(json_values, st.fixed_dictionaries(
                  {"cmdline": st.one_of(st.text(max_size=30), json_values)},
                  optional={"cmd_args": json_values, "timeout": json_values, "env": json_values,
                            "cwd": json_values, "stdin": json_values, "max_output": json_values,
                            "on_lost": json_values, "retries": json_values}))},
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_crashes_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        assert isinstance(parse_task(raw), Task)
    except ProtocolError as exc:
        assert exc.reason


@settings(max_examples=600, deadline=None)
@given(st.one_of(json_values, task_like))
def test_parser_never_crashes_on_arbitrary_json(value: object) -> None:
    raw = json.dumps(value).encode()  # stdlib: big integers too, which orjson refuses
    try:
        task = parse_task(raw)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert task.id and task.argv and all(isinstance(a, str) for a in task.argv)


SHELLISH = " \t\r\n\x0b\x0c\x1c\x1f\x85\xa0\u2003\x00ab1-=#;|&*$'\"\\"


@given(st.text(alphabet=SHELLISH, max_size=24))
@settings(max_examples=2000)
def test_cmdline_split_matches_shlex_including_the_fast_path(cmdline: str) -> None:
    try:
        want = shlex.split(cmdline, comments=False, posix=True)
    except ValueError:
        with pytest.raises(ValueError):
            split_cmdline(cmdline)
        return
    assert split_cmdline(cmdline) == want
