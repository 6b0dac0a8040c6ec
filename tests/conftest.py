"""Shared test fixtures.

Tests are deterministic and CPU-only. Real exemplar meshes come from ``../shared/exemplars`` (or
``$TSJAX_EXEMPLARS``); tests that need them skip with a message when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# CLIs run in-process by the tests (python -m tsjax.optimize's main) use the persistent compilation cache;
# keep it inside the checkout (ignored by git) rather than in the user's ~/.cache.
os.environ.setdefault("TSJAX_COMPILE_CACHE", str(REPO / ".pytest_cache" / "tsjax-xla"))


def _exemplar_root() -> Path:
    env = os.environ.get("TSJAX_EXEMPLARS")
    return Path(env) if env else REPO.parent / "shared" / "exemplars"


@pytest.fixture(scope="session")
def exemplars_root() -> Path:
    root = _exemplar_root()
    if not root.is_dir():
        pytest.skip(f"real exemplar sets not found at {root} (set TSJAX_EXEMPLARS to run these tests)")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
