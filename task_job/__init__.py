"""task-job: run shell-command tasks from a Redis list, confined, with streamed output.

Public API: `Client` (submit, kill, follow) and the message types of `protocol`.
"""

__version__ = "0.1.0"

from task_job.client import Client  # noqa: E402

__all__ = ["Client", "__version__"]
