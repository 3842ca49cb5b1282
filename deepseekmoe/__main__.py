"""`python -m deepseekmoe ...` (what torchrun launches) is the `deepseekmoe` command."""

import sys

from .cli import main

sys.exit(main())
