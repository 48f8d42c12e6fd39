"""Settings: the app's ``lock_*`` configuration, per-task options, and the app's lock manager.

Precedence: ``task_annotations`` > task option (``@app.task`` keyword or subclass attribute) >
app setting (``app.conf.lock_default_*``) > library default. Celery itself applies annotations
to the task class when it binds, over whatever the class or the decorator said; this module
resolves what the task then holds against the app settings, and nowhere else.

Settings are read lazily with ``app.conf.get(key, default)``, so an app that never configures
them works (Celery's ``Task.from_config`` would raise ``KeyError`` for an unregistered key), and
Django's ``namespace="CELERY"`` maps ``CELERY_LOCK_REDIS_URL`` to ``lock_redis_url`` unchanged.
They are read once per app, when its first locked task binds (usually when the app finalizes);
configure the app before that, as for Celery's own settings that tasks read when they bind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import os
import tempfile
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from celery_lock import _fork
from celery_lock._base import LockManager
from celery_lock._validate import check_ttl
from celery_lock.backends import _clients, _durability
from celery_lock.backends.file import FileLockManager
from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.backends.redis import RedisLockManager
from celery_lock.keys import KeyBuilder
from celery_lock.modes import LockMode
from celery_lock.signals import lock_fallback

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "ON_DUPLICATE",
    "OPTION_NAMES",
    "SETTING_NAMES",
    "LockSettings",
    "TaskLockOptions",
    "get_manager",
    "get_settings",
    "warn_if_host_local",
]

#: What an EXECUTION-mode duplicate does: not run (SUCCESS, None), fail, or Celery ``Ignore``.
ON_DUPLICATE: Final = ("skip", "fail", "ignore")

#: The task options, in the order they are documented.
OPTION_NAMES: Final = (
    "lock_mode",
    "lock_ttl",
    "lock_key",
    "lock_countdown",
    "lock_max_requeues",
    "lock_on_duplicate",
    "lock_renew",
    "lock_coalesce",
)

#: The app settings (``app.conf``; ``CELERY_LOCK_*`` under Django's namespace).
SETTING_NAMES: Final = (
    "lock_redis_url",
    "lock_directory",
    "lock_default_ttl",
    "lock_key_prefix",
    "lock_fallback",
    "lock_retry_interval",
    "lock_cleanup_interval",
    "lock_default_mode",
    "lock_default_countdown",
    "lock_default_max_requeues",
    "lock_default_on_duplicate",
    "lock_default_renew",
    "lock_default_coalesce",
    "lock_redis_transport_options",
    "lock_redis_use_ssl",
    "lock_redis_wait_replicas",
    "lock_redis_wait_timeout",
    "lock_manager",
)

#: kombu spells a Redis unix socket ``redis+socket://``; redis-py calls it ``unix://``.
_KOMBU_SOCKET: Final = "redis+socket://"


def _positive(value: object, what: str) -> float:
    return check_ttl(value, name=what)


def _non_negative(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds >= 0, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return number


def _requeue_cap(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be None (no cap) or an int >= 0, got {value!r}")
    return value


def _on_duplicate(value: object, what: str) -> str:
    if isinstance(value, str) and value.strip().lower() in ON_DUPLICATE:
        return value.strip().lower()
    raise ValueError(f"{what} must be one of {', '.join(map(repr, ON_DUPLICATE))}, got {value!r}")


def _mode(value: object, what: str) -> LockMode:
    try:
        return LockMode.coerce(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def _without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed (it names the store, not who logs in)."""
    parts = [urllib.parse.urlsplit(part.strip()) for part in url.split(";")]
    return ";".join(
        urllib.parse.urlunsplit(p._replace(netloc=p.netloc.rpartition("@")[2])) for p in parts
    )


def _broker_redis_url(broker_url: object) -> str | None:
    """The broker URL when its server(s) can hold the locks: a Redis broker's (first) URL, a
    Sentinel broker's sentinels; None for other brokers."""
    url = _clients.broker_lock_url(broker_url)
    if url is not None and url.lower().startswith(_KOMBU_SOCKET):
        return "unix://" + url[len(_KOMBU_SOCKET) :]
    return url


def _options(value: object, what: str) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise TypeError(f"setting {what} must be a dict or None, got {value!r}")


def _ssl(value: object, what: str) -> Mapping[str, Any] | bool | None:
    if value is None or isinstance(value, (bool, Mapping)):
        return value
    raise TypeError(f"setting {what} must be True, False, None or a dict, got {value!r}")


def _factory(value: object, app: Celery) -> Callable[[], LockManager] | None:
    """``lock_manager`` as a zero-argument builder (the app held weakly: the settings are
    cached per app, and must not keep it alive)."""
    if value is None:
        return None
    if isinstance(value, str):
        module, _, name = value.replace(":", ".").rpartition(".")
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"setting lock_manager: cannot import {value!r}: {exc}") from exc
    if not callable(value):
        raise TypeError(f"setting lock_manager must be a dotted path or a callable, got {value!r}")
    factory = value
    app_ref = weakref.ref(app)

    def build() -> LockManager:
        app = app_ref()
        if app is None:
            raise RuntimeError("lock_manager: the app is gone")
        manager = factory(app)
        if not isinstance(manager, LockManager):
            raise TypeError(
                f"setting lock_manager: {factory!r} returned {manager!r}, not a LockManager"
            )
        return manager

    return build


def _check_url(url: str, options: Mapping[str, Any] | None) -> None:
    """Refuse, when the settings are read, a lock URL no client can be built from."""
    try:
        kind = _clients.url_kind(url)
    except ValueError as exc:
        raise ValueError(f"setting lock_redis_url: {exc}") from None
    if kind == "sentinel" and not (options or {}).get("master_name"):
        raise ValueError(
            f"setting lock_redis_url {_clients.redact_url(url)!r} is a Sentinel URL: set "
            "'master_name' in lock_redis_transport_options (or, when the locks follow a "
            "Sentinel broker, in broker_transport_options)"
        )


@dataclasses.dataclass(frozen=True)
class LockSettings:
    """The app's lock settings (``app.conf.lock_*``), validated, read once per app.

    Build it with :meth:`from_app`; the field defaults are the library defaults.
    """

    #: ``lock_redis_url``: where locks live; None → file locks only. Any form of
    #: ``backends/_clients.py`` (``redis://``, ``rediss://``, ``unix://``, ``sentinel://``,
    #: ``redis+cluster://``). Default: the broker's, when the broker is Redis or Sentinel.
    redis_url: str | None = None
    #: ``lock_redis_transport_options``: Sentinel options (``master_name``,
    #: ``sentinel_kwargs`` ...). Default: ``broker_transport_options`` when the lock URL
    #: follows the broker, else none.
    redis_transport_options: Mapping[str, Any] | None = None
    #: ``lock_redis_use_ssl``: TLS options like ``broker_use_ssl``. Default: ``broker_use_ssl``
    #: when the lock URL follows the broker, else none.
    redis_ssl: Mapping[str, Any] | bool | None = None
    #: ``lock_redis_wait_replicas``: replicas that must acknowledge each grant (0: off).
    redis_wait_replicas: int = 0
    #: ``lock_redis_wait_timeout``: seconds a grant waits for them.
    redis_wait_timeout: float = _durability.DEFAULT_WAIT_TIMEOUT
    #: ``lock_manager``: builds the app's manager instead of the settings above (None: they do).
    manager_factory: Callable[[], LockManager] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    #: ``lock_directory``: the lock-file folder itself (None: :meth:`default_directory`).
    directory: str | None = None
    #: ``lock_default_ttl``: lease seconds for tasks without ``lock_ttl``.
    default_ttl: float = 300.0
    #: ``lock_key_prefix``: Redis key prefix.
    key_prefix: str = "celery_lock"
    #: ``lock_fallback``: ``"file"`` (local lock files while Redis is unreachable) or None
    #: (fail closed).
    fallback: str | None = "file"
    #: ``lock_retry_interval``: seconds between Redis probes while falling back.
    retry_interval: float = 30.0
    #: ``lock_cleanup_interval``: seconds between ``celery_lock.cleanup`` beat runs; None
    #: leaves the beat entry out.
    cleanup_interval: float | None = 300.0
    #: ``lock_default_mode``: ``lock_mode`` of tasks that do not set one.
    default_mode: LockMode = LockMode.EXECUTION
    #: ``lock_default_countdown``: base seconds of a QUEUE waiter's safety-net re-queue for
    #: tasks without ``lock_countdown`` (the release wakes the waiter long before it is due).
    default_countdown: float = 30.0
    #: ``lock_default_max_requeues``: QUEUE re-queue cap for tasks that do not set one.
    default_max_requeues: int | None = None
    #: ``lock_default_on_duplicate``: EXECUTION duplicate handling for tasks that do not set it.
    default_on_duplicate: str = "skip"
    #: ``lock_default_renew``: renew leases while tasks run.
    default_renew: bool = True
    #: ``lock_default_coalesce``: coalesce duplicates at publish time (``lock_coalesce``).
    default_coalesce: bool = False
    #: ``broker_transport_options["visibility_timeout"]`` (Redis/SQS; 3600 when unset): QUEUE
    #: countdowns stay below a quarter of it, since a message held longer is redelivered
    #: (celery/celery#2599, #7009).
    visibility_timeout: float = 3600.0

    @property
    def done_ttl(self) -> float:
        """Seconds a finished job's marker (and a key's waiter line) lives: past the broker's
        ``visibility_timeout``, the longest a copy of the job can still arrive after it ran
        (a redelivery; a safety-net re-queue's countdown is at most a quarter of it)."""
        return self.visibility_timeout + 60.0

    @classmethod
    def from_app(cls, app: Celery) -> LockSettings:
        """Read and validate the app's settings.

        :raises ValueError: for an invalid value, naming the setting and the value.
        :raises TypeError: for a value of the wrong type (e.g. a non-bool ``lock_default_renew``).
        """
        conf = app.conf
        get = conf.get
        missing = object()
        redis_url = get("lock_redis_url", missing)
        broker_locks = _broker_redis_url(conf.broker_url)
        if redis_url is missing:
            redis_url = broker_locks
        elif redis_url is not None and (not isinstance(redis_url, str) or not redis_url):
            raise ValueError(f"setting lock_redis_url must be a URL or None, got {redis_url!r}")
        # The broker's transport and TLS options apply when the locks live where the broker
        # does (the default); the lock_redis_* settings win whenever they are set.
        follows = redis_url is not None and redis_url == broker_locks
        options = _options(
            get("lock_redis_transport_options", None), "lock_redis_transport_options"
        )
        if options is None and follows:
            options = _options(get("broker_transport_options", None), "broker_transport_options")
        ssl = _ssl(get("lock_redis_use_ssl", None), "lock_redis_use_ssl")
        if ssl is None and follows:
            ssl = _ssl(get("broker_use_ssl", None), "broker_use_ssl")
        if redis_url is not None:
            _check_url(redis_url, options)
        wait_replicas, wait_timeout = _durability.check(
            get("lock_redis_wait_replicas", 0),
            get("lock_redis_wait_timeout", _durability.DEFAULT_WAIT_TIMEOUT),
            _clients.DEFAULT_SOCKET_TIMEOUT,
        )
        factory = _factory(get("lock_manager", None), app)
        directory = get("lock_directory", None)
        if directory is not None:
            if not isinstance(directory, (str, os.PathLike)):
                raise TypeError(f"setting lock_directory must be a path, got {directory!r}")
            directory = os.fspath(directory)
        prefix = get("lock_key_prefix", cls.key_prefix)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"setting lock_key_prefix must be a non-empty str, got {prefix!r}")
        fallback = get("lock_fallback", cls.fallback)
        if fallback is not None:
            if not isinstance(fallback, str) or fallback.strip().lower() != "file":
                raise ValueError(f"setting lock_fallback must be 'file' or None, got {fallback!r}")
            fallback = "file"
        cleanup = get("lock_cleanup_interval", cls.cleanup_interval)
        transport = get("broker_transport_options", None) or {}
        return cls(
            redis_url=redis_url,
            redis_transport_options=options,
            redis_ssl=ssl,
            redis_wait_replicas=wait_replicas,
            redis_wait_timeout=wait_timeout,
            manager_factory=factory,
            directory=directory,
            default_ttl=_positive(get("lock_default_ttl", cls.default_ttl), "lock_default_ttl"),
            key_prefix=prefix,
            fallback=fallback,
            retry_interval=_positive(
                get("lock_retry_interval", cls.retry_interval), "lock_retry_interval"
            ),
            cleanup_interval=None
            if cleanup is None
            else _positive(cleanup, "lock_cleanup_interval"),
            default_mode=_mode(get("lock_default_mode", cls.default_mode), "lock_default_mode"),
            default_countdown=_non_negative(
                get("lock_default_countdown", cls.default_countdown), "lock_default_countdown"
            ),
            default_max_requeues=_requeue_cap(
                get("lock_default_max_requeues", cls.default_max_requeues),
                "lock_default_max_requeues",
            ),
            default_on_duplicate=_on_duplicate(
                get("lock_default_on_duplicate", cls.default_on_duplicate),
                "lock_default_on_duplicate",
            ),
            default_renew=_flag(get("lock_default_renew", cls.default_renew), "lock_default_renew"),
            default_coalesce=_flag(
                get("lock_default_coalesce", cls.default_coalesce), "lock_default_coalesce"
            ),
            visibility_timeout=_positive(
                transport.get("visibility_timeout", cls.visibility_timeout),
                "broker_transport_options['visibility_timeout']",
            ),
        )

    @property
    def lock_directory(self) -> str:
        """The lock-file folder: ``lock_directory``, else :meth:`default_directory`."""
        return self.directory if self.directory is not None else self.default_directory()

    def default_directory(self) -> str:
        """``<tempdir>/celery_lock-<uid>-<digest>``: private to this user and to this deployment.

        The digest covers the key prefix and the lock store (the Redis URL without credentials,
        or "files"), so two deployments on one host (production and staging, each with its own
        ``lock_redis_url`` or ``lock_key_prefix``) never share lock files, neither as their
        fallback locks nor as the hybrid's same-host shadow locks. Apps of one deployment (same
        store and prefix) share a folder, as they share their Redis keys.
        """
        store = "files" if self.redis_url is None else _without_credentials(self.redis_url)
        digest = hashlib.sha256(f"{store}\n{self.key_prefix}".encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"celery_lock-{os.geteuid()}-{digest}")

    def build_manager(
        self, on_transition: Callable[[str, BaseException | None], object] | None = None
    ) -> LockManager:
        """A new manager for these settings.

        ``lock_manager`` set: whatever its factory returns (``on_transition`` is not wired:
        the factory builds its own). Redis URL and ``fallback="file"``: a
        :class:`HybridLockManager` of Redis and files; Redis URL and ``fallback=None``: the
        hybrid without files, which fails closed (``LockBackendUnavailable``) but still opens
        its circuit, so an outage costs one WARNING and at most one timeout per task; no
        Redis URL: a :class:`FileLockManager`. Nothing connects here, except to a Cluster,
        whose slot map is read now; a Cluster that does not answer yet is an outage like any
        other (files or fail closed), never an error here.
        """
        if self.manager_factory is not None:
            return self.manager_factory()
        if self.redis_url is None:
            return FileLockManager(self.lock_directory, default_ttl=self.default_ttl)
        redis = RedisLockManager.from_url(
            self.redis_url,
            prefix=self.key_prefix,
            default_ttl=self.default_ttl,
            transport_options=self.redis_transport_options,
            ssl=self.redis_ssl,
            setting="lock_redis_transport_options",
            wait_replicas=self.redis_wait_replicas,
            wait_timeout=self.redis_wait_timeout,
        )
        files = (
            FileLockManager(self.lock_directory, default_ttl=self.default_ttl)
            if self.fallback == "file"
            else None
        )
        return HybridLockManager(
            redis, files, retry_interval=self.retry_interval, on_transition=on_transition
        )


@dataclasses.dataclass(frozen=True)
class TaskLockOptions:
    """One task's resolved, validated lock options."""

    mode: LockMode
    ttl: float
    countdown: float
    max_requeues: int | None
    on_duplicate: str
    renew: bool
    keys: KeyBuilder
    coalesce: bool = False

    @classmethod
    def resolve(
        cls,
        task_name: str,
        values: Mapping[str, Any],
        settings: LockSettings,
        run: Callable[..., Any],
    ) -> TaskLockOptions:
        """Resolve a task's options: its own ``values`` (None = unset) over ``settings``.

        :param values: the task's ``lock_*`` attributes (decorator keywords, subclass attributes
            and ``task_annotations`` already applied).
        :param run: the task's ``run`` (lock keys bind the arguments to its signature).
        :raises ValueError: for an invalid value, naming the task, the option and the value.
        :raises TypeError: for a value of the wrong type (e.g. a ``lock_key`` that is neither
            None, a str nor callable), naming the task and the option.
        """

        def pick(option: str, default: object) -> tuple[object, str]:
            # Defaults come from LockSettings, validated already; only the task's own values
            # can be wrong, and the error names the task and the option.
            value = values.get(option)
            return default if value is None else value, f"task {task_name!r}: {option}"

        return cls(
            mode=_mode(*pick("lock_mode", settings.default_mode)),
            ttl=_positive(*pick("lock_ttl", settings.default_ttl)),
            countdown=_non_negative(*pick("lock_countdown", settings.default_countdown)),
            max_requeues=_requeue_cap(*pick("lock_max_requeues", settings.default_max_requeues)),
            on_duplicate=_on_duplicate(*pick("lock_on_duplicate", settings.default_on_duplicate)),
            renew=_flag(*pick("lock_renew", settings.default_renew)),
            keys=KeyBuilder(task_name, run, values.get("lock_key")),
            coalesce=_flag(*pick("lock_coalesce", settings.default_coalesce)),
        )


# ---------------------------------------------------------------------------- per-app state


class _AppState:
    """What one app needs at run time: its settings and its manager (one per process)."""

    __slots__ = ("__weakref__", "generation", "manager", "mutex", "settings")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.settings: LockSettings | None = None
        self.manager: LockManager | None = None
        self.generation = -1


_states: weakref.WeakKeyDictionary[Celery, _AppState] = weakref.WeakKeyDictionary()
_states_mutex = threading.Lock()


def _state(app: Celery) -> _AppState:
    state = _states.get(app)
    if state is None:
        with _states_mutex:
            state = _states.get(app)
            if state is None:
                state = _states[app] = _AppState()
    return state


def get_settings(app: Celery) -> LockSettings:
    """The app's :class:`LockSettings` (read and validated on first use, then cached)."""
    state = _state(app)
    settings = state.settings
    if settings is None:
        with state.mutex:
            settings = state.settings
            if settings is None:
                settings = state.settings = LockSettings.from_app(app)
    return settings


def get_manager(app: Celery) -> LockManager:
    """The app's lock manager in this process.

    Built on first use and cached; a forked child (prefork pool, or any ``fork``) builds its
    own, so no process ever uses a connection or descriptor inherited from its parent (the fork
    check covers ``worker_process_init`` and forks Celery does not announce alike).
    """
    state = _state(app)
    manager = state.manager
    generation = _fork.generation()
    if manager is None or state.generation != generation:
        settings = get_settings(app)
        with state.mutex:
            manager = state.manager
            if manager is None or state.generation != generation:
                app_ref = weakref.ref(app)

                def on_transition(status: str, exc: BaseException | None) -> None:
                    sender = app_ref()
                    if sender is not None:
                        lock_fallback.send(sender=sender, state=status, exc=exc)

                manager = settings.build_manager(on_transition)
                # A release hands the key to the next waiting task by publishing its wake-up.
                from celery_lock import _wakeup  # noqa: PLC0415 - it imports Celery's canvas

                manager.set_handoff(_wakeup.publisher(app))
                state.manager, state.generation = manager, generation
    return manager


def warn_if_host_local(app: Celery) -> bool:
    """Log one WARNING when ``app``'s locks live only in local files (no Redis for locks).

    Called when a worker starts: such locks exclude only processes on one host, so a deployment
    with workers on two hosts runs duplicates, and nothing else would tell. Returns True when
    it warned.
    """
    settings = get_settings(app)
    if settings.redis_url is not None:
        return False
    logging.getLogger("celery_lock.config").warning(
        "celery_lock: the locks of app %r are local files in %s, because lock_redis_url is not "
        "set and the broker (%s) is not Redis: they exclude only processes on this host, so "
        "workers on other hosts can run the same task at once. Set lock_redis_url to a Redis "
        "server that all workers share (redis://, rediss://, unix://, sentinel://, "
        "redis+cluster://).",
        app.main,
        settings.lock_directory,
        _scheme(app.conf.broker_url),
        extra={"backend": "file"},
    )
    return True


def _scheme(url: object) -> str:
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if not isinstance(url, str) or not url:
        return "not set"
    return url.split("://", 1)[0] + "://" if "://" in url else url.split(";", 1)[0]


@_fork.in_child
def _reset_after_fork() -> None:
    global _states_mutex  # noqa: PLW0603
    # A lock held by another thread of the parent at fork time would never be released here.
    _states_mutex = threading.Lock()
    for state in list(_states.values()):
        state.mutex = threading.Lock()
