import sys

from maxlm.cli import main

sys.exit(main())
