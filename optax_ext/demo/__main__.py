"""``python -m optax_ext.demo``."""

import sys

from optax_ext.demo.cli import main

sys.exit(main())
