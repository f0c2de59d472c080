"""`python -m rome_locate` (and `torchrun ... -m rome_locate`): the `rome-locate` CLI."""

import sys

from .cli import main

sys.exit(main())
