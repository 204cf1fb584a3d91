"""`python -m uegr_dist.demo` == `uegr-demo`."""

import sys

from uegr_dist.demo.run import main

sys.exit(main())
