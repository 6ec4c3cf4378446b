"""The embedded stack: Postgres, an S3 server, Triton, Ray and every bmcell service,
on loopback, under one run folder. ``bmcell stack up | down | status | logs``."""

from bmcell.stack.config import StackConfig
from bmcell.stack.manager import Stack

__all__ = ["Stack", "StackConfig"]
