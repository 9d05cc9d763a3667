"""Registry of model families: adding one is a file here and a line in FAMILIES."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from ..errors import ModelFileError
from . import glm, glm2, glm4, glm4_moe, glm4_moe_lite, llama

FAMILIES: dict[str, ModuleType] = {m.ARCH: m for m in (glm, glm2, glm4, glm4_moe, glm4_moe_lite, llama)}


def family_for_hf(cfg: Mapping[str, Any], source: object) -> ModuleType:
    for module in FAMILIES.values():
        if module.accepts_hf(cfg):
            return module
    kind = cfg.get("model_type") or cfg.get("architectures")
    raise ModelFileError(source, f"unknown architecture {kind!r}; supported: ChatGLM-6B, ChatGLM2/3, GLM-4, CodeGeeX2, "
                                 "GLM-4-0414/Z1, GLM-4.5/4.6, GLM-4.7-Flash, LLaMA, Baichuan-7B/Baichuan2-7B, "
                                 "InternLM")


def family_for_gguf(arch: str, source: object) -> ModuleType:
    for module in FAMILIES.values():
        if arch in module.GGUF_ARCHS:
            return module
    known = sorted(a for m in FAMILIES.values() for a in m.GGUF_ARCHS)
    raise ModelFileError(source, f"unknown GGUF architecture {arch!r}; supported: {', '.join(known)}")
