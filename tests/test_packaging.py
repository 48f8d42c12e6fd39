"""Packaging and documentation stay true: version, typing marker, README <-> code, the wheel."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (the "test" extra installs it there)
    import tomli as tomllib

import celery_lock
from celery_lock import signals
from celery_lock.config import OPTION_NAMES, SETTING_NAMES, LockSettings
from tests._redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_version_is_defined_once() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert celery_lock.__version__ == importlib.metadata.version("celery-lock")
    assert celery_lock.__version__ == pyproject["project"]["version"]
    source = (ROOT / "celery_lock" / "__init__.py").read_text()
    assert f'"{celery_lock.__version__}"' not in source  # from the metadata, not repeated


def test_typed_package_and_cli_entry_point() -> None:
    assert (ROOT / "celery_lock" / "py.typed").exists()
    points = importlib.metadata.entry_points(group="celery.commands")
    assert any(p.name == "locks" and p.value == "celery_lock.cli:locks" for p in points)


def test_every_public_name_is_in_the_readme() -> None:
    missing = [name for name in celery_lock.__all__ if name != "__version__" and name not in README]
    assert missing == []
    for name in ("lock_acquired", "lock_skipped", "lock_requeued", "lock_lost", "lock_fallback"):
        assert hasattr(signals, name)
        assert name in README


def test_every_option_and_setting_is_in_the_readme() -> None:
    for name in (*OPTION_NAMES, *SETTING_NAMES):
        assert f"| `{name}` |" in README, f"{name} has no row in a README table"


def test_every_lock_name_the_readme_mentions_exists() -> None:
    """The other direction: a `lock_*` name in the README is an option, a setting, a signal or
    the request attribute; nothing documented is imaginary."""
    foreign = {"lock_expiry"}  # celery-singleton's option, in the migration table
    # Documented while issues 11 (QUEUE wake-ups) and 15 (publish-time coalescing) are built
    # on other branches; once merged these names exist in the code and this set can go.
    known = {
        *foreign,
        *OPTION_NAMES,
        *SETTING_NAMES,
        "lock_lease",
        *(n for n in dir(signals) if n.startswith("lock_")),
    }
    mentioned = set(re.findall(r"`(lock_[a-z_]+)", README))
    assert mentioned - known == set()
    assert {n for n in mentioned if n.startswith("lock_default_")} <= set(SETTING_NAMES)


def test_settings_constant_is_what_from_app_reads() -> None:
    """SETTING_NAMES (and so the README check above) is exactly what LockSettings reads."""
    read: list[str] = []

    class Conf(dict[str, Any]):
        broker_url = "memory://"
        broker_transport_options: dict[str, Any] = {}

        def get(self, key: str, default: Any = None) -> Any:
            read.append(key)
            return super().get(key, default)

        def __getattr__(self, name: str) -> Any:
            raise AttributeError(name)

    class App:
        conf = Conf()

    LockSettings.from_app(App())  # type: ignore[arg-type]
    assert {k for k in read if k.startswith("lock_")} == set(SETTING_NAMES)


@pytest.mark.slow
def test_wheel_installs_into_a_clean_virtualenv_and_the_cli_works(tmp_path: Path) -> None:
    """Build the wheel, install it (and only its declared dependencies) into a new virtualenv,
    then run ``celery -A example_project.celery_app locks list`` from outside the checkout."""
    # Nothing of the checkout may leak in (with PYTHONPATH pip would see it as installed).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COV_", "COVERAGE"))}
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=300, env=env,
    )  # fmt: skip
    (wheel,) = wheels.glob("celery_lock-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True, timeout=600, env=env,
    )  # fmt: skip
    # Outside the checkout, so celery_lock can only come from the wheel.
    work = tmp_path / "work"
    shutil.copytree(ROOT / "example_project", work / "example_project")
    env.update(EXAMPLE_REDIS="off", EXAMPLE_RUN_DIR=str(tmp_path / "run"))
    located = subprocess.run(
        [str(python), "-c", "import celery_lock; print(celery_lock.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert located.returncode == 0, located.stderr
    assert str(env_dir) in located.stdout
    listed = subprocess.run(
        [str(env_dir / "bin" / "celery"), "-A", "example_project.celery_app", "locks", "list"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "No locks held." in listed.stdout

    def locks(*args: str, **more_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(env_dir / "bin" / "celery"), "-A", "example_project.celery_app", "locks", *args],
            cwd=work, env={**env, **more_env}, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip

    # The exit statuses the README documents, from the installed command.
    for bad in ("", "k" * 70_000):
        shown = locks("show", bad)
        assert shown.returncode == 2, shown.stderr
        assert shown.stderr.strip().startswith("Error: invalid lock key:"), shown.stderr
        assert "Traceback" not in shown.stderr
    assert locks("show", "nightly").returncode == 1
    assert locks("release", "nightly", "--yes").returncode == 1
    # The lock Redis unreachable (nobody listens on that port): 3, never "No locks held."
    down = {"EXAMPLE_REDIS": "on", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    listed_down = locks("list", **down)
    assert listed_down.returncode == 3, listed_down.stderr
    assert "No locks held." not in listed_down.stdout
    assert "could not be read" in listed_down.stderr
    assert locks("show", "nightly", **down).returncode == 3
    assert locks("clean", **down).returncode == 3
