"""The one error tree of task-job.

Every error the package raises on purpose derives from `TaskJobError`.
"""


class TaskJobError(Exception):
    """Base of every error task-job raises on purpose."""


class ConfigError(TaskJobError, ValueError):
    """The configuration is invalid; the message names the key."""


class ProtocolError(TaskJobError, ValueError):
    """A message could not be parsed or validated.

    `task_id` is set when the id could be read, so a `rejected` record can be sent.
    """

    def __init__(self, reason: str, task_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id


class BrokerError(TaskJobError, ConnectionError):
    """Redis could not be reached or answered unexpectedly; `transient` when worth retrying."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ConfinementError(TaskJobError, PermissionError):
    """A command would run outside `cmd_dir` or with inline code."""


class SinkError(TaskJobError):
    """Records could not be delivered to a sink."""
