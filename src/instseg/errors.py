"""Errors the command line reports as one line naming the problem (no traceback)."""

from __future__ import annotations


class DistributedError(RuntimeError):
    """A multi-process launch that cannot work; the message names the variable, command or
    rank."""
