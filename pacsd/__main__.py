import sys

from pacsd.cli import main

sys.exit(main())
