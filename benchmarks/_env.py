"""What a benchmark ran on, printed with its figures: a ratio means little without its baseline's
version (filelock 4.3.2 took 83 µs per cycle where 4.0.8 took 57 µs, on one machine)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import redis


def versions(packages: tuple[str, ...], server: redis.Redis | None = None) -> str:
    """One line: Python, each installed package's version, the Redis server's, usable CPUs."""
    parts = [f"Python {platform.python_version()}"]
    for name in packages:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    if server is not None:
        parts.append(f"Redis {server.info('server')['redis_version']}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts.append(f"{cpus} CPUs")
    return ", ".join(parts)
