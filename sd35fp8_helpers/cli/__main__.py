"""``python -m sd35fp8_helpers.cli`` = ``sd35fp8`` (what the GPU machine runs, with no console script)."""

import sys

from . import main

sys.exit(main())
