"""The example's Celery app: Redis when one answers, otherwise no services at all (files only).

Mode, decided once per process when this module is imported:

- ``EXAMPLE_REDIS=off`` (or ``REDIS_URL=none``): *files* — kombu's ``filesystem://`` transport
  with atomic publishing (:mod:`example_project.fs_transport`), a ``file://`` result backend and
  file locks, all under the run directory. Everything runs on one host with no server.
- ``EXAMPLE_REDIS=on``: *redis* on ``REDIS_URL`` (or ``redis://127.0.0.1:6379``), no probe.
- unset / ``auto``: *redis* if that server answers a ``PING`` within a fraction of a second, else
  *files*.

In *redis* mode the broker, the results and the locks share database :data:`REDIS_DB` of that
server (whatever database ``REDIS_URL`` names is replaced), and every key the example writes
starts with ``celery_lock_example:``, so it never meets another application's keys.

``EXAMPLE_RUN_DIR`` is the run directory (lock files, beat schedule, events, the file broker);
``EXAMPLE_SCHEDULE=demo`` shortens the beat schedule to seconds for the demo.
``python -m example_project.celery_app`` prints the mode.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery
from celery.schedules import crontab
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EVENTS_FILE", "MODE", "REDIS_DB", "REDIS_URL", "RUN_DIR", "app", "describe_mode"]

#: Database used on the Redis server: a dedicated one, away from the default DB 0.
REDIS_DB = 13
#: Start of every key the example writes to Redis (broker, results, locks).
KEY_PREFIX = "celery_lock_example"
#: Where the example looks for Redis when ``REDIS_URL`` is not set.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
#: The probe must not slow down every worker start when no Redis is there.
PROBE_TIMEOUT = 0.3


def run_dir() -> Path:
    """The run directory: ``EXAMPLE_RUN_DIR``, else a per-user folder in the system temp dir."""
    configured = os.environ.get("EXAMPLE_RUN_DIR")
    if configured:
        return Path(configured).resolve()
    return Path(tempfile.gettempdir()) / f"celery_lock_example-{os.getuid()}"


def with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` (``redis://`` and ``rediss://`` URLs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    return urlunsplit(parts._replace(path=f"/{db}"))


def redis_answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a Redis server answers ``PING`` at ``url`` within ``timeout`` seconds."""
    # No retries: redis-py 8 retries a refused connection for ~4.5 s by default.
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def choose_redis_url() -> str | None:
    """The Redis URL the example uses, or ``None`` for the no-services (files) mode."""
    switch = os.environ.get("EXAMPLE_REDIS", "auto").strip().lower()
    configured = os.environ.get("REDIS_URL", "").strip()
    if switch == "off" or configured.lower() == "none":
        return None
    if switch not in ("on", "auto", ""):
        raise ValueError(f"EXAMPLE_REDIS must be 'on', 'off' or 'auto', not {switch!r}")
    url = with_db(configured or DEFAULT_REDIS_URL, REDIS_DB)
    if switch == "on" or redis_answers(url):
        return url
    return None


RUN_DIR = run_dir()
#: JSON lines written by the tasks and the signal handlers (read by the demo).
EVENTS_FILE = RUN_DIR / "events.jsonl"
REDIS_URL = choose_redis_url()
MODE = "redis" if REDIS_URL else "files"
DEMO_SCHEDULE = os.environ.get("EXAMPLE_SCHEDULE", "") == "demo"


def describe_mode() -> str:
    """One line saying where the broker, the results and the locks live."""
    if REDIS_URL:
        return (
            f"redis: broker, results and locks on {REDIS_URL} "
            f"(keys {KEY_PREFIX}:*), lock files under {RUN_DIR / 'locks'} if Redis goes away"
        )
    return (
        f"files: no services; filesystem:// broker, file:// results and file locks under {RUN_DIR}"
    )


def _redis_settings(url: str) -> dict[str, Any]:
    return {
        "broker_url": url,
        "result_backend": url,
        # A key prefix per use: the lock cleaner scans "<lock_key_prefix>:*", and that scan must
        # not walk over the broker's and the result backend's keys.
        "broker_transport_options": {"global_keyprefix": f"{KEY_PREFIX}:broker:"},
        "result_backend_transport_options": {"global_keyprefix": f"{KEY_PREFIX}:results:"},
        "lock_redis_url": url,
        "lock_key_prefix": f"{KEY_PREFIX}:locks",
    }


def _file_settings(base: Path) -> dict[str, Any]:
    broker = base / "broker"
    folders = {name: broker / name for name in ("queue", "processed", "control")}
    for folder in (*folders.values(), base / "results"):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        # The stock channel loses messages under a producer/consumer race (celery/kombu#1551).
        "broker_transport": "example_project.fs_transport:Transport",
        "broker_transport_options": {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            # Consumed messages are renamed into this folder: a rename within one file system
            # lets exactly one of two workers take a message. (Without store_processed, kombu
            # moves them to the system temp dir, a copy + delete when that is another file
            # system, which two workers can both "win".) They stay there as an audit trail.
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            # The default is the relative path "control": each process's cwd, so broadcasts
            # would only reach processes started from the same directory.
            "control_folder": str(folders["control"]),
            "polling_interval": 0.1,
        },
        "result_backend": f"file://{base / 'results'}",
        "lock_redis_url": None,  # locks: FileLockManager in lock_directory
    }


RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)

app = Celery("example_project", include=["example_project.tasks"])
app.conf.update(
    _redis_settings(REDIS_URL) if REDIS_URL else _file_settings(RUN_DIR),
    task_default_queue=KEY_PREFIX,
    result_expires=timedelta(minutes=10),  # nothing the example stores outlives the demo long
    broker_connection_retry_on_startup=True,
    timezone="UTC",
    beat_schedule_filename=str(RUN_DIR / "beat-schedule"),
    # Lock settings (DESIGN §4). The lock directory is used by file mode, and in redis mode as
    # the fallback while Redis is unreachable (lock_fallback="file", the default).
    lock_directory=str(RUN_DIR / "locks"),
    lock_default_ttl=120,
    lock_fallback="file",
    # celery_lock adds the "celery_lock.cleanup" beat entry itself, every this many seconds.
    lock_cleanup_interval=3 if DEMO_SCHEDULE else 300,
    beat_schedule={
        "nightly-report": {
            "task": "example_project.tasks.nightly_report",
            # The demo fires it every 2 s so that beat fires again while a run is still going.
            "schedule": 2.0 if DEMO_SCHEDULE else crontab(hour=2, minute=0),
        },
    },
)


if __name__ == "__main__":
    print(describe_mode())
