"""`python -m floe.replica`: see floe/replica/main.py."""

import sys

from floe.replica.main import main

if __name__ == "__main__":
    sys.exit(main())
