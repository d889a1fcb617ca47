"""The ``cuda`` backend: the compiled kernels of ``ptpeft_kernels._C`` (sources in ``csrc/``).

Imported lazily by :mod:`ptpeft_kernels.backends` the first time the cuda backend is
considered on a machine with a GPU, so importing ``ptpeft_kernels`` never needs the
extension. Importing this package registers the implementations; they call
``torch.ops.ptpeft_cuda.*``, which exist once :func:`load_reason` has loaded the library.
"""

from . import adapter, lora, prefix_attention  # noqa: F401  (registration side effects)
from ._library import load_reason

__all__ = ["load_reason"]
