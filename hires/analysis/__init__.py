"""``hires analyze``: what the hierarchical residuals of a HiResNet carry.

See ``docs/analysis.md`` for every number and figure.
"""

from __future__ import annotations

from .cli import add_arguments, main
from .report import analyze
from .stats import ablation, addend_stats, hierarchical_blocks

__all__ = ["ablation", "add_arguments", "addend_stats", "analyze", "hierarchical_blocks", "main"]
