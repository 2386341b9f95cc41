"""The one base of core's configuration errors.

A rule that core/ cannot compile (a bad retryOn, route regex, load-balancer
setting or rate limit) raises a subclass of ``CoreConfigError`` whose message
names the bad value; the proxy's runtime turns it into a rejected config
(NACK) by catching this base, never ``Exception``.
"""

from __future__ import annotations

__all__ = ["CoreConfigError"]


class CoreConfigError(ValueError):
    """A configuration value core/ cannot use; the message names it."""
