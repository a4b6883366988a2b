import sys

from uvclab.ui.cli import main

sys.exit(main())
