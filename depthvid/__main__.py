import sys

from depthvid.cli import main

sys.exit(main())
