"""Integrations with other libraries, each imported on first use (the library itself is then imported).

``ik.integrations.transformers.register()`` makes ``attn_implementation="internlm_kernels"`` available to Hugging
Face transformers models.
"""
import importlib

_MODULES = ("transformers",)


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
