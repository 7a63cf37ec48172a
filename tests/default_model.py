"""Where the tests find the embedded default model (`MODELQL_TEST_DEFAULT_MODEL` overrides it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_model_dir() -> Path | None:
    from modelql import defaults as D

    p = Path(os.environ.get("MODELQL_TEST_DEFAULT_MODEL") or D.DEFAULT_MODEL_DIR)
    return p if (p / "config.json").exists() else None
