"""`python -m rome_locate`: the `rome-locate` command line."""

import sys

from .cli import main

sys.exit(main())
