import sys

from rtune.cli import main

if __name__ == "__main__":  # not when a spawned process (the demo's trainer) imports the main module
    sys.exit(main())
