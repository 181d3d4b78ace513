import sys

from autobuild.cli import main

sys.exit(main())
