"""The model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

Every base architecture is registered twice: the HiResNet (``hi`` prefix, default
``sources="all"``) and its plain twin (``sources="none"``, the base model itself).
Keyword arguments override the architecture's configuration (any argument of
:class:`~hires.models.network.HiResNet`, e.g. ``num_classes``, ``sources``,
``side``, ``fused``, ``stem``, or ``planes`` / ``stem_width`` for a narrow model).
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field

from .network import HiResNet

__all__ = ["ARCHITECTURES", "create_model", "is_plain", "list_models"]

_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class Architecture:
    """A base architecture: its plain name, its HiResNet name and its configuration."""

    plain: str
    hierarchical: str
    description: str
    config: dict = field(default_factory=dict)


ARCHITECTURES = (
    Architecture("plain18", "hiplain18", "plain CNN, ResNet-18 layout without short shortcuts",
                 dict(block="basic", depths=(2, 2, 2, 2), planes=_WIDTHS, shortcuts=False)),
    Architecture("resnet18", "hiresnet18", "ResNet-18 (BasicBlock, 2-2-2-2)",
                 dict(block="basic", depths=(2, 2, 2, 2), planes=_WIDTHS)),
    Architecture("resnet34", "hiresnet34", "ResNet-34 (BasicBlock, 3-4-6-3)",
                 dict(block="basic", depths=(3, 4, 6, 3), planes=_WIDTHS)),
    Architecture("resnet50", "hiresnet50", "ResNet-50 (Bottleneck, 3-4-6-3)",
                 dict(block="bottleneck", depths=(3, 4, 6, 3), planes=_WIDTHS)),
    Architecture("resnext29_8x64d", "hiresnext29_8x64d", "CIFAR ResNeXt-29 8x64d (3 stages of 3)",
                 dict(block="bottleneck", depths=(3, 3, 3), planes=_WIDTHS[:3], groups=8, base_width=64)),
    Architecture("resnext50_32x4d", "hiresnext50_32x4d", "ResNeXt-50 32x4d (3-4-6-3)",
                 dict(block="bottleneck", depths=(3, 4, 6, 3), planes=_WIDTHS, groups=32, base_width=4)),
)

_BY_NAME = {name: (arch, name == arch.plain) for arch in ARCHITECTURES for name in (arch.plain, arch.hierarchical)}
_ARGUMENTS = [p for p in inspect.signature(HiResNet).parameters]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _BY_NAME if fnmatch.fnmatch(n, pattern))


def is_plain(name: str) -> bool:
    """Whether the registered model ``name`` is a plain twin (no projections)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _BY_NAME[name][1]


def create_model(name: str, **kwargs) -> HiResNet:
    """Build the registered model ``name``; ``kwargs`` override its configuration.

    Raises ValueError for an unknown name (listing the valid ones), for a plain twin
    asked for projections, and (from the model) for bad ``sources``/``side``/``stem``;
    TypeError for an unknown keyword.
    """
    plain = is_plain(name)
    arch = _BY_NAME[name][0]
    unknown = sorted(set(kwargs) - set(_ARGUMENTS))
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown argument(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(_ARGUMENTS)}")
    if plain and kwargs.get("sources", "none") != "none":
        raise ValueError(f"{name} is the plain twin (sources='none'); for sources={kwargs['sources']!r} "
                         f"create {arch.hierarchical!r}")
    return HiResNet(**{**arch.config, "sources": "none" if plain else "all", **kwargs})
