"""``python -m reglue.cli``: the ``reglue`` command (as under ``accelerate launch -m reglue.cli``)."""

import sys

from reglue.cli import main

sys.exit(main())
