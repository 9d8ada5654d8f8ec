"""``python -m infinite.server [args]`` is ``infinite serve [args]``."""

import sys

from infinite.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
