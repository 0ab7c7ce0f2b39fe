import sys

from floe.entrypoints.cli import main

sys.exit(main())
