"""``python -m lazy_monitor`` is the ``lazy-monitor`` command."""

import sys

from lazy_monitor.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
