"""`python -m train ...`: the same as `spark train ...`."""

import sys

from train.cli import main

sys.exit(main())
