"""Shared fixtures: example jobs copied into a temporary sweep, and one local site on
127.0.0.1 per test session (a real aiohttp server in a thread of its own)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE_JOB = EXAMPLES / "base_job"


def read_base() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(BASE_JOB.glob("*.json"))}


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a job folder from the base job, with per-file overrides (None deletes a file)."""

    def make(name: str = "job", root: Path | None = None, **files: Any) -> Path:
        folder = (root or tmp_path / "jobs") / name
        folder.mkdir(parents=True)
        content: dict[str, Any] = {**read_base(), **{k.replace("_json", ".json"): v
                                                     for k, v in files.items()}}
        for fname, obj in content.items():
            if obj is None:
                continue
            text = obj if isinstance(obj, str) else json.dumps(obj)
            (folder / fname).write_text(text)
        return folder

    return make


@pytest.fixture
def example_sweep(tmp_path: Path) -> Iterator[Path]:
    dest = tmp_path / "sweep"
    shutil.copytree(EXAMPLES / "sweep", dest)
    yield dest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
