"""`python -m fluidlm.train` / `torchrun --nproc-per-node=N -m fluidlm.train --config ...`."""

import sys

from fluidlm.train.cli import main

sys.exit(main())
