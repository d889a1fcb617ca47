"""``python -m ptpeft_kernels.train``: see ``--help``."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
