"""NKI kernels for B'MOJO (NKI 0.2.0, Neuron SDK 2.28).

Kernels import NKI only through `nki_kernels.compat`, so moving to another NKI
version touches one file.
"""

from nki_kernels.compat import NKI_AVAILABLE, NKI_IMPLEMENTATION, NKI_UNAVAILABLE_REASON

__all__ = ["NKI_AVAILABLE", "NKI_IMPLEMENTATION", "NKI_UNAVAILABLE_REASON"]
