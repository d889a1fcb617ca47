"""``python -m ptpeft_kernels.analysis`` is the same command as ``python -m ptpeft_kernels.analyze``."""

from .cli import main

raise SystemExit(main())
