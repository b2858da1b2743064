"""Errors that grail-opt reports to users.

Every error names the offending value and says what to do about it. The CLI prints the
message and exits with status 2; library callers catch `GrailError`.
"""

from __future__ import annotations


class GrailError(Exception):
    """An invalid input or option, reported with the value at fault and the fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}. {fix}")


class UnsupportedModelError(GrailError):
    """A model the front end cannot load or handle."""


class DataError(GrailError):
    """Calibration or evaluation data that does not fit the model."""
