"""`python -m floe.bench ...` (the same as `floe bench ...`)."""

import sys

from floe.bench import main

sys.exit(main(sys.argv[1:]))
