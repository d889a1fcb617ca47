"""The ``triton`` backend: importing this package registers its implementations.

Imported lazily by :mod:`ptpeft_kernels.backends` the first time the triton backend is
considered, so importing ``ptpeft_kernels`` never imports Triton.
"""

from . import adapter, lora, prefix_attention  # noqa: F401  (registration side effects)
