"""python -m mgssl COMMAND [ARGS ...]: the `mgssl` console command."""
import sys

from mgssl.cli import main

sys.exit(main())
