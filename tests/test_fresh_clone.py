"""What a new user does first: the README's example command in a fresh checkout.

The README's order is: run the example, then the tests. So the example's own command must work
in a checkout that has no ``.venv`` yet, installing only what ``example_project/run`` installs
(never the test extras, which happen to bring packages such as ``packaging`` along and so hide
a missing dependency: issue 12, kombu's Redis transport importing ``packaging``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests._redis_server import RedisServer, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


def _checkout_copy(dest: Path) -> None:
    """Copy what a clone would hold: tracked and untracked-but-not-ignored files (no .venv,
    no caches), so uncommitted work is tested as it would be once committed."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        skip_or_fail("needs git and a git checkout to know which files a clone holds")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],  # type: ignore[list-item]
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted in the work tree is still listed as cached
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _new_user_env(**extra: str) -> dict[str, str]:
    """The environment of a shell that never activated our virtualenv."""
    drop = ("PYTHON", "VIRTUAL_ENV", "COV_", "COVERAGE", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.pop("EXAMPLE_REDIS", None)
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.celery
@pytest.mark.redis
def test_readme_example_command_works_in_a_fresh_checkout(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """``bash example_project/run`` in a fresh checkout, Redis mode, with nothing installed:
    it makes its own virtualenv, installs celery_lock without test extras, and the demo passes
    all its checks against real workers, beat and Redis."""
    clone = tmp_path / "clone"
    _checkout_copy(clone)
    assert not (clone / ".venv").exists()
    env = _new_user_env(
        REDIS_URL=own_redis_server.url, EXAMPLE_REDIS="on", EXAMPLE_RUN_DIR=str(tmp_path / "run")
    )
    proc = subprocess.run(
        ["bash", "example_project/run"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "redis: broker, results and locks on" in output, output
    assert "FAIL" not in output, output
    assert "facts hold" in output, output
    # Only what the example installs: had the test extras been there, a missing runtime
    # dependency could hide behind them.
    python = clone / ".venv" / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('pytest') is None)"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "True"
