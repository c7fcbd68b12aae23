"""`python -m prostate_kernels ...` (also what torchrun -m runs): the prostate-kernels command."""

import sys

from prostate_kernels.cli import main

sys.exit(main())
