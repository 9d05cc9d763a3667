"""Shared fixtures: the reference data beside the checkout and the real default model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference data folder {SHARED} is absent (it sits beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from chatglm.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (it is a test extra: make install)")
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """A llama.cpp source tree (LLAMA_CPP_SRC): its own HF-to-GGUF converter, gguf-py and real chat templates."""
    import os

    src = Path(os.environ.get("LLAMA_CPP_SRC", "/nonexistent"))
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "models" / "templates").is_dir():
        pytest.skip("LLAMA_CPP_SRC does not name a llama.cpp source tree (for one: `pip download --no-deps "
                    "--no-binary :all: llama-cpp-python` and unpack the sdist's vendor/llama.cpp)")
    return src
