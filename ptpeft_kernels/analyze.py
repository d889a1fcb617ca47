"""``python -m ptpeft_kernels.analyze``: representation-space comparison of adapters with their base model.

See ``python -m ptpeft_kernels.analyze --help``; the implementation is in
:mod:`ptpeft_kernels.analysis.cli`.
"""

from .analysis.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
