"""Lock keys for task calls: bound arguments in canonical, type-tagged JSON, hashed.

This module is part of the lock layer: it never imports Celery. :class:`KeyBuilder` turns one
call's arguments into the lock key, once, when the task starts; the key then lives on the lease
and release never recomputes it (celery-once computes it at publish and again in the worker, so a
tuple that arrives as a list makes the release miss the lock, which then lives out its TTL).

Canonical form (:func:`canonical_json`), decided once and documented here:

- Arguments are bound to the task's signature with defaults applied, so ``f(1, b=2)``,
  ``f(1, 2)`` and ``f(1)`` (with ``b=2`` the default) are the same call (celery-once PR #128,
  celery-singleton PR #39 asked for this).
- Types are kept apart: ``1``, ``1.0``, ``True`` and ``"1"`` are four different keys. A value
  arrives in the worker with the type the serializer gives it, and ``1`` versus ``1.0`` is a
  difference a task can observe (``range(x)``), so it is not erased.
- Dict key order is ignored; dict keys keep their types (``{1: x}`` ≠ ``{"1": x}``).
- ``tuple`` and ``list`` are the same (JSON turns one into the other in transit), and so are
  ``set`` and ``frozenset``; set elements are ordered canonically.
- ``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, ``Decimal`` and
  ``bytes``/``bytearray`` are tagged with their type (the kombu JSON types, plus timedelta).
  Datetimes compare by ISO text, so the same instant in two time zones is two keys; a
  ``Decimal`` keeps its exponent (``Decimal("1.0")`` ≠ ``Decimal("1.00")``).
- Anything else (model instances, arbitrary objects) is refused with :class:`LockKeyError`
  naming the task and the argument, and suggesting ``lock_key``: a ``str()``-based key is how
  celery-once ended up with memory addresses in keys (celery-once#93) and collisions (#19).

The key is ``f"{task_name}:{sha256 hexdigest}"``; a ``lock_key`` format string or callable gives
``f"{task_name}:{its result}"`` (always namespaced by the task name).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import inspect
import json
import math
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from celery_lock._validate import check_key
from celery_lock.errors import LockKeyError

__all__ = ["KeyBuilder", "LockKeyError", "canonical_json"]

#: ``lock_key`` as a task option: None, a format string, or a callable returning a str.
KeySpec = str | Callable[..., str] | None

_encode_plain: Final = json.JSONEncoder().encode
_SUPPORTED: Final = (
    "datetime, date, time, timedelta, UUID, Decimal, bytes, set, frozenset, "
    "and str, int, float, bool, None, list, tuple and dict of them"
)


class _Unsupported(TypeError):
    """Internal: the first unsupported value; containers prepend their part of its path."""

    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value
        self.path = ""

    def within(self, segment: str) -> _Unsupported:
        self.path = segment + self.path
        return self


def canonical_json(value: object) -> str:
    """Return the canonical, type-tagged JSON text of ``value`` (see the module docstring).

    Every JSON object in the output is a one-member tag object (``{"uuid": "..."}``), so no
    plain value can produce the encoding of a tagged one.

    :raises TypeError: for a value of an unsupported type, or a self-referencing or absurdly
        deeply nested structure.
    """
    try:
        return _encode(value)
    except _Unsupported as exc:
        raise TypeError(
            f"value{exc.path} has unsupported type {type(exc.value).__name__}; supported: "
            f"{_SUPPORTED}"
        ) from None
    except RecursionError:
        raise TypeError("value is self-referencing or nested too deeply") from None


def _encode(value: object) -> str:
    # Most frequent types first; bool before int (bool is an int subclass). Paths for error
    # messages are only built when an error travels up, never on the normal path.
    if value is None or isinstance(value, (str, bool)):
        return _encode_plain(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        # repr round-trips exactly and always differs from an int's text ("1.0" vs "1").
        if math.isfinite(value):
            return float.__repr__(value)
        return _encode_plain({"float": float.__repr__(value)})
    if isinstance(value, (list, tuple)):
        parts = []
        for index, item in enumerate(value):
            try:
                parts.append(_encode(item))
            except _Unsupported as exc:
                raise exc.within(f"[{index}]") from None
        return "[" + ",".join(parts) + "]"
    if isinstance(value, dict):
        items = []
        for name, item in value.items():
            try:
                items.append((_encode(name), _encode(item)))
            except _Unsupported as exc:
                raise exc.within(f"[{name!r:.40}]") from None
        items.sort()
        return '{"dict":[' + ",".join(f"[{k},{v}]" for k, v in items) + "]}"
    if isinstance(value, (set, frozenset)):
        try:
            members = sorted(_encode(item) for item in value)
        except _Unsupported as exc:
            raise exc.within(" member") from None
        return '{"set":[' + ",".join(members) + "]}"
    tagged = _tag(value)
    if tagged is None:
        raise _Unsupported(value)
    return _encode_plain({tagged[0]: tagged[1]})


def _tag(value: object) -> tuple[str, object] | None:
    if isinstance(value, datetime.datetime):
        return "datetime", value.isoformat()
    if isinstance(value, datetime.date):
        return "date", value.isoformat()
    if isinstance(value, datetime.time):
        return "time", value.isoformat()
    if isinstance(value, datetime.timedelta):
        return "timedelta", [value.days, value.seconds, value.microseconds]
    if isinstance(value, uuid.UUID):
        return "uuid", str(value)
    if isinstance(value, decimal.Decimal):
        return "decimal", str(value)
    if isinstance(value, (bytes, bytearray)):
        return "bytes", base64.b64encode(bytes(value)).decode("ascii")
    return None


class KeyBuilder:
    """Builds the lock key of one task's calls; made once per task, used on every call.

    :param task_name: the task name every key is namespaced by.
    :param func: the function the arguments are bound to (a bound ``run`` method excludes
        ``self``, so ``bind=True`` tasks key on their own arguments only).
    :param lock_key: None (hash of the bound arguments), a format string over parameter names
        (``"account:{account_id}"``) or a callable called as ``lock_key(*args, **kwargs)``.
    :raises TypeError: ``lock_key`` is neither None, a str nor callable.
    :raises ValueError: a format string that is empty, malformed, uses positional fields, or
        names a parameter ``func`` does not have.
    """

    __slots__ = ("_callable", "_format", "_signature", "task_name")

    def __init__(self, task_name: str, func: Callable[..., Any], lock_key: KeySpec = None) -> None:
        self.task_name = task_name
        self._callable: Callable[..., str] | None = None
        self._format: str | None = None
        try:
            self._signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):  # some builtins and C callables have no signature
            self._signature = None
        if lock_key is None:
            return
        if isinstance(lock_key, str):
            self._format = self._check_format(lock_key)
        elif callable(lock_key):
            self._callable = lock_key
        else:
            raise TypeError(
                f"task {task_name!r}: lock_key must be None, a format string or a callable, "
                f"got {type(lock_key).__name__}: {lock_key!r:.80}"
            )

    def _check_format(self, fmt: str) -> str:
        where = f"task {self.task_name!r}: lock_key {fmt!r}"
        if not fmt:
            raise ValueError(f"{where} is empty; use None for the default key")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{where} is not a valid format string: {exc}") from None
        params = None if self._signature is None else self._signature.parameters
        for field in fields:
            # "{account.id}" and "{items[0]}" name the parameter before the first "." or "[".
            head = field.split(".", 1)[0].split("[", 1)[0]
            if not head or head.isdigit():
                raise ValueError(
                    f"{where} uses a positional field {{{field}}}; name the parameter instead"
                )
            if params is not None and head not in params:
                raise ValueError(
                    f"{where} names {head!r}, which is not a parameter of the task "
                    f"(parameters: {', '.join(params) or 'none'})"
                )
        return fmt

    def key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The lock key for one call.

        :raises LockKeyError: the arguments do not fit the signature, an argument has an
            unsupported type, or the ``lock_key`` callable failed or returned a non-str.
        """
        if self._callable is not None:
            return self._checked(self._from_callable(self._callable, args, kwargs))
        arguments = self._bind(args, kwargs)
        if self._format is not None:
            try:
                return self._checked(f"{self.task_name}:{self._format.format_map(arguments)}")
            except LockKeyError:
                raise
            except (LookupError, AttributeError, ValueError) as exc:
                raise LockKeyError(
                    f"task {self.task_name!r}: lock_key {self._format!r} cannot be formatted "
                    f"with these arguments: {exc!r}",
                    task_name=self.task_name,
                ) from exc
        try:
            text = _encode(arguments)
        except _Unsupported as exc:
            raise LockKeyError(
                f"task {self.task_name!r}: cannot build a lock key: argument{exc.path} has "
                f"unsupported type {type(exc.value).__name__} (supported: {_SUPPORTED}); set "
                f'lock_key to a format string such as "{{account_id}}" or a callable',
                task_name=self.task_name,
            ) from None
        except RecursionError:
            raise LockKeyError(
                f"task {self.task_name!r}: cannot build a lock key: an argument is "
                "self-referencing or nested too deeply; set lock_key",
                task_name=self.task_name,
            ) from None
        digest = hashlib.sha256(text.encode("ascii")).hexdigest()
        return f"{self.task_name}:{digest}"

    def _checked(self, key: str) -> str:
        """A key built from the call's own values (format string, callable) must still be one
        the managers accept; say which task and option produced it when it is not."""
        try:
            return check_key(key)
        except ValueError as exc:
            spec = self._format if self._format is not None else self._callable
            raise LockKeyError(
                f"task {self.task_name!r}: lock_key {spec!r} produced an unusable key for "
                f"these arguments ({exc}); hash long values or use a callable lock_key",
                task_name=self.task_name,
            ) from exc

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self._signature is None:
            return {"args": list(args), "kwargs": dict(kwargs)}
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise LockKeyError(
                f"task {self.task_name!r}: the arguments do not match its signature: {exc}",
                task_name=self.task_name,
            ) from exc
        bound.apply_defaults()
        return dict(bound.arguments)

    def _from_callable(
        self, func: Callable[..., object], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str:
        try:
            value = func(*args, **kwargs)
        except Exception as exc:
            raise LockKeyError(
                f"task {self.task_name!r}: lock_key callable {func!r} raised {exc!r}",
                task_name=self.task_name,
            ) from exc
        if not isinstance(value, str) or not value:
            raise LockKeyError(
                f"task {self.task_name!r}: lock_key callable {func!r} must return a non-empty "
                f"str, got {value!r:.80}",
                task_name=self.task_name,
            )
        return f"{self.task_name}:{value}"
