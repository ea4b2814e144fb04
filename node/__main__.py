"""`python -m node` is the `pigeon` command."""

import sys

from node.cli import main

sys.exit(main())
