"""The supervisor's own error."""

from __future__ import annotations


class UpError(Exception):
    """`up` cannot go on; the message names the cause. What started is stopped."""
