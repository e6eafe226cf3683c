"""Fused hierarchical projection (avgpool -> 1x1 conv -> BatchNorm -> residual add)."""

from .backends import available_backends
from .fuse import fuse
from .module import HierarchicalProjection, project_source
from .pooling import pool_source
from .projection import fused_projection, fused_projections, projection_reference

__all__ = ["HierarchicalProjection", "available_backends", "fuse", "fused_projection", "fused_projections",
           "pool_source", "project_source", "projection_reference"]
