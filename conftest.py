"""Root conftest: Celery's own pytest fixtures (pytest_plugins is only allowed here)."""

pytest_plugins = ("celery.contrib.pytest",)
