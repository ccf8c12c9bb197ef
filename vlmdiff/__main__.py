"""`python -m vlmdiff` (and `accelerate launch -m vlmdiff ...`): the `vlmdiff` command."""
import sys

from vlmdiff.cli import main

sys.exit(main())
