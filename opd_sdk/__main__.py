"""`python -m opd_sdk ...` is `opd ...` (what `accelerate launch -m` and `torchrun -m` run)."""

import sys

from opd_sdk.app.cli import main

sys.exit(main())
