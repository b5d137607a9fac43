"""`python -m fluidlm.eval ...` / `torchrun --nproc-per-node=N -m fluidlm.eval ...` (= `fluidlm eval`)."""

import sys

from fluidlm.eval.cli import main

sys.exit(main())
