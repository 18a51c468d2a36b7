import sys

from pacsd_installer.cli import main

sys.exit(main())
