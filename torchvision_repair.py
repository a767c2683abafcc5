"""Lets a CPU build of torch import a CUDA build of torchvision.

PyPI's torchvision 0.28.0 is a CUDA build; with the CPU torch its ``_C``
extension does not load and its meta registrations fail on the missing
``torchvision::nms``/``qnms`` schemas, which breaks ``import timm`` and the
transformers model imports. This module installs a lazy import hook (through
``torchvision_repair.pth``, so it runs in every interpreter, Ray workers
included): when ``torchvision`` is first imported, and only if its ``_C``
cannot be loaded, the two schemas are defined so the pure-Python parts import.
On a matching install it does nothing. This project never calls torchvision's
C++ ops.

A top-level module of its own, importing only the standard library (and torch
when torchvision loads), so the hook that runs at every interpreter start
loads none of this project's packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import pathlib
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive


def _define_missing_ops(package_dir: pathlib.Path) -> None:
    global _library
    import torch

    if _library is not None:
        return
    for ext in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(ext))
            return  # matching build: nothing to repair
        except (OSError, RuntimeError):
            break
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined elsewhere
        return
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # run once, then get out of the way
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin:
            _define_missing_ops(pathlib.Path(spec.origin).parent)
        return spec


def install() -> None:
    """Register the hook (idempotent); a no-op once torchvision is imported."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
