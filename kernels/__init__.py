"""Width-subset GEMMs for elastic layers (installed as ``flexcli.kernels``).

``reference`` holds the plain-PyTorch implementation: the test oracle and the CPU fallback.
"""

from .reference import Selection, subset_linear

__all__ = ["Selection", "subset_linear"]
