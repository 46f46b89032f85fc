import sys

from hgsim.cli import main

sys.exit(main())
