"""alibi-detect imports `transformers` at module level, for text embeddings (models/pytorch/embedding.py) and
tokenizers (saving/loading.py, saving/saving.py). No driftloop detector uses either, and that import costs ~2 s
and ~90 MiB per process here: it brings torch.distributed.tensor, torch._dynamo and sympy with it (the footprint
bench measures alibi-detect's import). `defer_transformers()`, called before alibi-detect's first import in a
process, puts a stand-in under that name whose names import the real package the moment one is used."""

from __future__ import annotations

import importlib
import sys
import types

_NAMES = ("AutoModel", "AutoConfig", "AutoTokenizer")  # what alibi-detect's torch path imports from transformers


def defer_transformers() -> None:
    if "transformers" in sys.modules or "alibi_detect" in sys.modules:
        return  # already imported (for real or deferred), or too late to matter
    stub = types.ModuleType("transformers")
    stub.__dict__["_driftloop_deferred"] = True

    def real() -> types.ModuleType:
        if sys.modules.get("transformers") is stub:
            del sys.modules["transformers"]
        return importlib.import_module("transformers")

    class Deferred:
        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, attr: str):
            return getattr(getattr(real(), self._name), attr)

        def __call__(self, *args, **kwargs):
            return getattr(real(), self._name)(*args, **kwargs)

    class _TokenizerCheck(type):
        def __instancecheck__(cls, obj) -> bool:  # a tokenizer exists only once the real package is imported
            mod = sys.modules.get("transformers")
            return mod is not None and mod is not stub and isinstance(obj, mod.PreTrainedTokenizerBase)

    for name in _NAMES:
        setattr(stub, name, Deferred(name))
    stub.PreTrainedTokenizerBase = _TokenizerCheck("PreTrainedTokenizerBase", (), {})

    def other(name: str):  # any other name: the real package (PEP 562); the import system's own probes are no use
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(real(), name)

    stub.__getattr__ = other
    sys.modules["transformers"] = stub
