"""`python -m resnet_fast.train ...`: the same as `resnet-fast train ...`."""
import sys

from . import main

sys.exit(main())
