"""The error a user can fix: every ``hires`` command reports it as one line and exits
with status 2, instead of a traceback that points into code the user did not write."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Something the user handed us is wrong or unusable: an option, a checkpoint, a
    dataset or a run folder. The message says what and what to do instead."""
