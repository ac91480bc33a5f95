"""The one exception tree of distillgate.

Every error a user can meet says what went wrong *and how to fix it*. The CLI maps each branch to an exit code
(see ``exit_code``); ``DISTILLGATE_DEBUG=1`` shows the traceback as well.

    DistillgateError                      base; never raised directly
    ├── UserError                         exit 1: bad input the user can fix
    │   ├── ConfigError                   a policy / project / gateway file is invalid (carries every issue)
    │   ├── NotFoundError                 a file, dataset, version, key or run does not exist
    │   ├── DatasetGuardError             golden or test rows offered to training
    │   │   └── SyntheticShareError       more synthetic train rows than synthetic.max_train_share allows
    │   ├── ConflictError                 a row changed since it was read (optimistic concurrency)
    │   └── DestinationError              an export destination is malformed or unreachable
    ├── PolicyDenied                      exit 2: the policy said no (carries the reason codes)
    ├── IntegrityError                    exit 2: a decision log, stamp or checkpoint failed verification
    ├── UpstreamError                     exit 3: a teacher upstream failed (timeouts, 5xx, resets)
    ├── StoreUnavailable                  exit 3: the database (PostgreSQL) cannot be reached now; retry later
    └── InternalError                     exit 3: a bug; please report it with DISTILLGATE_DEBUG=1 output
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class DistillgateError(Exception):
    """Base of every error distillgate raises on purpose."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UserError(DistillgateError):
    exit_code = 1


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration document: where it is, what is wrong, how to fix it."""

    path: str
    message: str
    fix: str = ""

    def render(self) -> str:
        text = f"{self.path or '<root>'}: {self.message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


class ConfigError(UserError):
    """A configuration document is invalid; ``issues`` holds every problem found, not just the first."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        lines = [f"{source}: {len(self.issues)} problem(s)"] + ["  - " + i.render() for i in self.issues]
        super().__init__("\n".join(lines))


class NotFoundError(UserError):
    pass


class DatasetGuardError(UserError):
    pass


class SyntheticShareError(DatasetGuardError):
    """A build or freeze would give training a larger synthetic share than the dataset config allows."""


class DestinationError(UserError):
    pass


class ConflictError(UserError):
    """A write named a version that is no longer current (someone else changed the record first)."""


class PolicyDenied(DistillgateError):
    exit_code = 2

    def __init__(self, message: str, reasons: Sequence[str], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reasons = list(reasons)


class IntegrityError(DistillgateError):
    """Verification failed; ``index`` is the first bad log index where one applies."""

    exit_code = 2

    def __init__(self, message: str, *, index: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.index = index


class UpstreamError(DistillgateError):
    exit_code = 3

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class StoreUnavailable(DistillgateError):
    """The store's database cannot be reached now (PostgreSQL down or restarting); a retry later can succeed."""

    exit_code = 3


class InternalError(DistillgateError):
    exit_code = 3
