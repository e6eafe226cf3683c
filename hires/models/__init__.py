"""HiResNet models: ResNets, ResNeXts and a plain CNN, with hierarchical residuals.

``create_model("hiresnet18", num_classes=10, sources="all", side="output")`` builds
a model by name, ``list_models()`` lists the names. :mod:`hires.models.hierarchy`
states which projections exist and the analysis interface of the blocks.
"""

from .blocks import BasicBlock, Bottleneck
from .hierarchy import HierarchicalBlock, projection_sources
from .network import HiResNet
from .registry import ARCHITECTURES, create_model, is_plain, list_models

__all__ = ["ARCHITECTURES", "BasicBlock", "Bottleneck", "HiResNet", "HierarchicalBlock", "create_model",
           "is_plain", "list_models", "projection_sources"]
