"""Errors pickle with their attributes; modes and argument checks name the bad value."""

from __future__ import annotations

import math
import pickle

import pytest

from celery_lock import (
    LockBackendUnavailable,
    LockError,
    LockKeyError,
    LockLost,
    LockMode,
    LockNotAcquired,
    LockNotOwned,
)
from celery_lock._validate import check_key, check_timeout, check_ttl

ALL_ERRORS = [
    LockError,
    LockNotAcquired,
    LockBackendUnavailable,
    LockNotOwned,
    LockLost,
    LockKeyError,
]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_round_trip_through_pickle_with_attributes(cls: type[LockError]) -> None:
    exc = cls("it broke", key="k1", backend="redis", task_name="proj.t", holder="abc")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(exc, protocol=protocol))
        assert type(copy) is cls
        assert str(copy) == "it broke"
        assert copy.key == "k1"
        assert copy.backend == "redis"
        assert copy.task_name == "proj.t"  # type: ignore[attr-defined]
        assert copy.holder == "abc"  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", ALL_ERRORS)
@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_errors_cross_celerys_result_backend(cls: type[LockError], serializer: str) -> None:
    """Celery's JSON backend stores exc.args and rebuilds with cls(*args): attributes survive."""
    from celery import Celery
    from celery.backends.base import BaseBackend

    app = Celery("t", set_as_current=False)
    app.conf.result_accept_content = ["json", "pickle"]
    backend = BaseBackend(app, serializer=serializer)
    exc = cls("held", key="k", task_name="proj.t", holder_task_id="abc", fence=7)
    stored = backend.encode(backend.prepare_exception(exc))
    copy = backend.exception_to_python(backend.decode(stored))
    assert type(copy) is cls
    assert str(copy) == "held"
    assert (copy.key, copy.task_name, copy.holder_task_id, copy.fence) == ("k", "proj.t", "abc", 7)  # type: ignore[attr-defined]


def test_unencodable_attributes_keep_the_message() -> None:
    """What JSON cannot encode arrives as a repr string: the message still gets through."""
    copy = LockError("held", "{'when': <object>}")
    assert str(copy) == "held"
    assert copy.key is None


def test_reserved_attribute_names_are_refused() -> None:
    with pytest.raises(TypeError, match="reserved"):
        LockError("x", args=1)


def test_error_hierarchy_and_builtin_bases() -> None:
    assert issubclass(LockBackendUnavailable, ConnectionError)
    assert issubclass(LockLost, LockNotOwned)
    assert issubclass(LockKeyError, TypeError)
    for cls in ALL_ERRORS:
        assert issubclass(cls, LockError)
    assert LockError("x").key is None
    assert "k" in repr(LockNotAcquired("m", key="k"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (LockMode.QUEUE, LockMode.QUEUE),
        ("queue", LockMode.QUEUE),
        ("QUEUE", LockMode.QUEUE),
        (" Execution ", LockMode.EXECUTION),
    ],
)
def test_mode_coercion(value: object, expected: LockMode) -> None:
    assert LockMode.coerce(value) is expected
    assert LockMode("queue") is LockMode.QUEUE
    assert str(LockMode.QUEUE) == "queue"


@pytest.mark.parametrize("value", ["wait", "", None, 1, LockMode])
def test_bad_mode_names_value_and_allowed(value: object) -> None:
    with pytest.raises(ValueError, match=r"invalid lock mode .*'queue', 'execution'") as info:
        LockMode.coerce(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("key", [1, b"k", None, ("a",)])
def test_non_str_key_is_type_error(key: object) -> None:
    with pytest.raises(TypeError, match="lock key must be a str"):
        check_key(key)


@pytest.mark.parametrize("key", ["", "a\x00b", "x" * 70000])
def test_bad_str_key_is_value_error(key: str) -> None:
    with pytest.raises(ValueError, match="lock key"):
        check_key(key)


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, -math.inf, "5", None, True, 0.0001])
def test_bad_ttl_names_value(ttl: object) -> None:
    with pytest.raises(ValueError, match="ttl must be") as info:
        check_ttl(ttl)
    assert repr(ttl) in str(info.value)


def test_good_ttl_and_timeout() -> None:
    assert check_ttl(5) == 5.0
    assert check_ttl(0.05) == 0.05
    assert check_timeout(None) is None
    assert check_timeout(0) == 0.0


@pytest.mark.parametrize("timeout", [-0.1, math.nan, "1", False])
def test_bad_timeout(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        check_timeout(timeout)
