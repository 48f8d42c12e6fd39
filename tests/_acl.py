"""The minimal ACL line that docs/redis.md documents, for tests that use it exactly."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "redis.md"


def documented_acl() -> list[str]:
    """The arguments of the ``ACL SETUSER`` line in docs/redis.md (password: ``lockpw``)."""
    lines = [
        line
        for line in DOCS.read_text(encoding="utf-8").splitlines()
        if line.startswith("ACL SETUSER ")
    ]
    assert len(lines) == 1, lines
    return lines[0].replace(">PASSWORD", ">lockpw").split()[2:]
