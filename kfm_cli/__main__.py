"""``python -m kfm_cli ...`` (what torchrun and the Slurm script run): the same as ``kfm ...``."""

import sys

from kfm_cli.main import main

sys.exit(main())
