"""Model families and elasticity: descriptors (which tensors carry which unit), sizes, the elastic spec."""

from .dims import Dims
from .family import Architecture, LayerSizes, all_architectures, by_family, detect, supported_names

__all__ = [
    "Architecture",
    "Dims",
    "LayerSizes",
    "all_architectures",
    "by_family",
    "detect",
    "supported_names",
]
