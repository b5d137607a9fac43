"""`python -m fluidlm.launch --config FILE --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT ...`"""

import sys

from fluidlm.launch.cli import main

sys.exit(main())
