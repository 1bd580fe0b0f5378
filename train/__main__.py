import sys

from mgssl.train.cli import main

sys.exit(main())
