import sys

from pacsd_watchdog.cli import main

sys.exit(main())
