"""`python -m deepseekmoe ...` (what torchrun launches) is the `deepseekmoe` command."""

import sys

from deepseekmoe.cli import main

sys.exit(main())
