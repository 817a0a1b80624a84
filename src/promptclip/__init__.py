"""promptclip: prompt tuning of CLIP (DAPT, DPC and the CoOp family).

Public names are imported on first use, so `import promptclip` and the command line start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "CLIP": "promptclip.clip.model",
    "ArchConfig": "promptclip.clip.model",
    "load_clip": "promptclip.clip.weights",
    "available_archs": "promptclip.clip.weights",
    "save_clip": "promptclip.clip.weights",
    "get_prompt_model": "promptclip.methods.base",
    "PromptModel": "promptclip.methods.base",
    "tokenize": "promptclip.clip.tokenizer",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'promptclip' has no attribute {name!r}")
