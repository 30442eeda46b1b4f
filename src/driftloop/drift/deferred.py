"""What alibi-detect imports and a detector-loading process (the monitor) need not pay for; the footprint bench
measures alibi-detect's import both ways.

- `transformers`, imported at module level for text embeddings (models/pytorch/embedding.py) and tokenizers
  (saving/loading.py, saving/saving.py). No driftloop detector uses either, and that import costs ~2 s and ~90 MiB
  per process here: it brings torch.distributed.tensor, torch._dynamo and sympy with it. `defer_transformers()`,
  called before alibi-detect's first import in a process, puts a stand-in under that name whose names import the
  real package the moment one is used.
- `torch`, which alibi-detect's utils/frameworks.py imports only to learn whether its pytorch backend is there; of
  driftloop's detectors only mmd, lsdd and mmd_online use that backend. `import_alibi_detect(need_torch=False)`
  imports alibi-detect with torch hidden (it reads the backend as absent): ~180 MiB and ~1.5 s less per monitor.
  A later call that needs torch imports alibi-detect again, with it."""

from __future__ import annotations

import importlib
import importlib.abc
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


TORCH_KINDS = {"mmd", "lsdd", "mmd_online"}  # the detectors that run on alibi-detect's pytorch backend


class _HideTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while alibi-detect imports)", name=name)
        return None


def import_alibi_detect(need_torch: bool):
    """alibi-detect's `load_detector`, imported with torch hidden unless `need_torch`, torch is already imported,
    or alibi-detect already is. alibi-detect imported without torch and now needed with it is imported again
    (detectors loaded before keep the classes they were built with)."""
    defer_transformers()
    frameworks = sys.modules.get("alibi_detect.utils.frameworks")
    if need_torch and frameworks is not None and not getattr(frameworks, "has_pytorch", True):
        for name in [m for m in sys.modules if m == "alibi_detect" or m.startswith("alibi_detect.")]:
            del sys.modules[name]
    if not need_torch and "alibi_detect" not in sys.modules and "torch" not in sys.modules:
        hide = _HideTorch()
        sys.meta_path.insert(0, hide)
        try:
            importlib.import_module("alibi_detect.saving")
        finally:
            sys.meta_path.remove(hide)
    from alibi_detect.saving import load_detector

    return load_detector
