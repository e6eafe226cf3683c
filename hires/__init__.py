"""HiResNets: hierarchical residual networks on the fused projection op."""

# Models (issue 3).
from .models import create_model, list_models

__all__ = ["create_model", "list_models"]
