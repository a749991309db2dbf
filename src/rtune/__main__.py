import sys

from rtune.cli import main

sys.exit(main())
