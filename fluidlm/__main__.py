import sys

from fluidlm.cli import main

sys.exit(main())
