"""The trainer's failure classes and the exit codes of docs/architecture.md they map to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1  # anything unexpected: the operator retries up to backoffLimit
    INVALID_INPUT = 2  # dataset, spec or model unusable: retrying cannot help
    STORAGE_UNREACHABLE = 3  # object storage failed after the trainer's own bounded retries
    MODEL_ACCESS_DENIED = 4  # the hub refused the model: gated and the licence not accepted, or a bad token
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2; a checkpoint was saved when training had started
    TERMINATED = 143  # SIGTERM (pod deleted, evicted, preempted): 128 + 15; likewise. The Job's next pod resumes


class TrainerError(Exception):
    """A failure with a message written for the user (which file, which field, what was expected)."""

    exit_code: ExitCode = ExitCode.CRASH


class InvalidInputError(TrainerError):
    exit_code = ExitCode.INVALID_INPUT


class DatasetError(InvalidInputError):
    """The dataset cannot be trained on; `problems` names every offending file, one per line."""

    def __init__(self, location: str, problems: list[str], limit: int = 50):
        self.location = location
        self.problems = problems
        shown = problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"dataset {location} has {len(problems)} {noun}:\n  " + "\n  ".join(shown) + more)


class InputChangedError(InvalidInputError):
    """An input changed after the preparation validated it (a file of the dataset replaced or deleted)."""


class ModelLoadError(InvalidInputError):
    pass


class ModelAccessError(TrainerError):
    """The hub refused the model: a gated repository whose licence the token's account has not accepted, no token,
    or a token the hub does not accept. The message carries the hub's own words."""

    exit_code = ExitCode.MODEL_ACCESS_DENIED


class CheckpointMismatchError(InvalidInputError):
    """The output URI holds checkpoints of a differently shaped LoRA: resuming from them cannot work."""


class StorageError(TrainerError):
    """Object storage refused or could not be reached after bounded retries.

    `transient`: a failure that may pass by itself (connection refused or cut, timeout, a 5xx answer), which the
    S3 storage retries within its time budget; refusals (missing bucket, wrong credentials) are not.
    """

    exit_code = ExitCode.STORAGE_UNREACHABLE

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient
