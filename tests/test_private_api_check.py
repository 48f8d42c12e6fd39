"""The CI check against private APIs of our dependencies (.ci/check_private_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / ".ci" / "check_private_api.py"
ALLOW = ROOT / ".ci" / "private-api-allow.txt"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(CHECKER), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def reported(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if not line.startswith("note:")]


def test_reports_a_private_attribute_and_a_private_import(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "mod.py").write_text(
        "from celery._state import _task_stack\n"
        "import redis._parsers\n"
        "from kombu import _private\n"
        "\n"
        "class Ours:\n"
        "    __slots__ = ('_slot',)\n"
        "\n"
        "    def __init__(self) -> None:\n"
        "        self._mine = 1\n"
        "\n"
        "def use(x, ours: Ours) -> object:\n"
        "    ours._mine, ours._slot, x.__dict__\n"
        "    getattr(x, '_sock', None)\n"
        "    _sock = x._sock  # a local of that name does not make it ours\n"
        "    return _sock\n"
    )
    empty = tmp_path / "allow.txt"
    empty.write_text("")
    result = run("--library", library, "--also", tmp_path / "none", "--allow", empty)
    assert result.returncode == 1
    lines = reported(result)
    assert len(lines) == 5, result.stdout
    assert lines[0].endswith("mod.py:1: import of celery._state._task_stack")
    assert lines[1].endswith("mod.py:2: import of redis._parsers")
    assert lines[2].endswith("mod.py:3: import of kombu._private")
    assert lines[3].endswith("mod.py:13: private attribute x._sock (via getattr)")
    assert lines[4].endswith("mod.py:14: private attribute x._sock")


def test_allow_list_entries_need_a_reason_and_silence_only_their_use(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "mod.py").write_text("def f(conn):\n    return conn._sock, conn._fd\n")
    path = (library / "mod.py").as_posix()  # outside the repository: reported as it is
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{path}:_sock  # checked against redis-py 8.2\n{path}:_fd\n")
    result = run("--library", library, "--also", tmp_path / "none", "--allow", allow)
    assert result.returncode == 1
    assert any("without a reason" in line for line in reported(result))
    allow.write_text(f"{path}:_sock  # checked against redis-py 8.2\n{path}:_gone  # old\n")
    result = run("--library", library, "--also", tmp_path / "none", "--allow", allow)
    assert result.returncode == 1
    assert [line.rsplit(": ", 1)[1] for line in reported(result)] == ["private attribute conn._fd"]
    assert f"note: allow-list entry {path}:_gone matches nothing; remove it" in result.stdout


def test_the_package_uses_only_what_the_allow_list_names() -> None:
    """The real tree passes, and every allow-list entry is a use that is really there."""
    assert run().returncode == 0
    entries = [
        line.split("#", 1)[0].strip()
        for line in ALLOW.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all("#" in line for line in ALLOW.read_text().splitlines() if line.strip())
    assert run("--keys").stdout.split() == sorted(entries)
