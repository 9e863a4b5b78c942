"""`python -m rbee_control.queen` is `queen-rbee`."""

import sys

from .cli import main

sys.exit(main())
