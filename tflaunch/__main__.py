"""``python -m tflaunch``."""
import sys

from tflaunch.cli import main

if __name__ == "__main__":
    sys.exit(main())
