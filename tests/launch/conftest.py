"""Fixtures of the launch tests: the tiny corpus of the trainer tests."""

from __future__ import annotations

from tests.trainer.conftest import dataset  # noqa: F401  the session-scoped tiny corpus

