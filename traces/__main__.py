"""``python -m traces``: see :mod:`traces.cli`."""
import sys

from traces.cli import main

sys.exit(main())
