"""Wake-ups of waiting QUEUE jobs: the payload a waiter leaves in the lock store, and the
hand-off that publishes it when a release gives the waiter its turn.

A waiter's payload is its own message, as a Celery signature (same task id, arguments, routing,
links and headers), serialized with the task's serializer (``kombu.serialization``) and stored
as ASCII: ``<content type>\\n<content encoding>\\n<base64 body>``. The releasing process (a
worker child after the run, the worker's main process after breaking a dead child's lock, or
``celery locks release``) decodes it, accepting only the app's ``accept_content``, and publishes
it with no countdown. The waiter also keeps its safety-net copy in the broker, so a wake-up that
is never published (the releaser died, the store lost the line) only delays it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import weakref
from typing import TYPE_CHECKING, Any, Final

from celery import signature
from kombu.serialization import dumps, loads, prepare_accept_content

from celery_lock.signals import lock_woken

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery import Celery, Task
    from celery.canvas import Signature

__all__ = ["decode", "encode", "publisher"]

logger = logging.getLogger("celery_lock.task")

#: Option of ``apply_async`` that the library's own re-publishing passes, so that coalescing
#: (which would hand back the waiting call itself) never swallows it.
BYPASS: Final = {"lock_coalesce": False}


def encode(task: Task[Any, Any], message: Signature[Any]) -> bytes:
    """The payload of ``message`` (a signature of ``task``) for :meth:`LockManager.claim`."""
    content_type, encoding, body = dumps(dict(message), serializer=task.serializer)
    raw: Any = body
    if not isinstance(raw, bytes):
        raw = raw.encode(encoding)
    return b"%s\n%s\n%s" % (
        content_type.encode("ascii"),
        encoding.encode("ascii"),
        base64.b64encode(raw),
    )


def decode(app: Celery, payload: bytes) -> Signature[Any]:
    """The signature in ``payload``; only content types the app accepts are loaded.

    :raises ValueError: for a payload that is not one of ours.
    :raises kombu.exceptions.ContentDisallowed: for a content type the app does not accept.
    """
    try:
        content_type, encoding, body = payload.split(b"\n", 2)
        raw = base64.b64decode(body, validate=True)
        text_type, text_encoding = content_type.decode("ascii"), encoding.decode("ascii")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a celery_lock wake-up payload: {payload[:40]!r}") from exc
    fields = loads(
        raw,
        text_type,
        text_encoding,
        accept=prepare_accept_content(app.conf.accept_content),
    )
    if not isinstance(fields, dict) or not isinstance(fields.get("task"), str):
        raise ValueError(f"not a celery_lock wake-up payload: {payload[:40]!r}")
    return signature(fields, app=app)


def publisher(app: Celery) -> Callable[[str, str, bytes], None]:
    """The hand-off callback of ``app``'s lock manager: publish the waiter's wake-up.

    It holds the app weakly: the manager is cached per app in a weak-keyed table, and a strong
    reference from the cached value back to its key would keep every app that ever took a lock
    alive, with its manager, connections and prober thread, after ``app.close()``.
    """
    app_ref = weakref.ref(app)

    def hand_off(key: str, task_id: str, payload: bytes) -> None:
        app = app_ref()
        if app is None:
            # The manager outlived its app (someone kept it): the waiter's safety-net copy
            # still runs it; the manager logs this as a failed wake-up.
            raise RuntimeError(f"the Celery app of lock {key!r} no longer exists")
        message = decode(app, payload)
        task = app.tasks.get(message.task or "")
        # Through the task's own apply_async when this process knows it (a LockedTask must not
        # coalesce its own wake-up), else by name.
        options: dict[str, Any] = {"countdown": None, "eta": None}
        if hasattr(type(task), "lock_coalesce"):
            options.update(BYPASS)
        message.apply_async(**options)
        logger.info(
            "%s[%s] woken: lock %s is its turn",
            message.task,
            task_id,
            key,
            extra={"lock_key": key, "task_id": task_id, "task_name": message.task},
        )
        lock_woken.send(sender=task, task_id=task_id, key=key)

    return hand_off
