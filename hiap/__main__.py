"""``python -m hiap ...`` (and ``torchrun -m hiap ...``): the ``hiap`` command line."""

import sys

from hiap.app.cli import main

sys.exit(main())
