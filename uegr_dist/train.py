"""`python -m uegr_dist.train` == `uegr-train` (also usable as `accelerate launch -m uegr_dist.train`)."""

import sys

from uegr_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
