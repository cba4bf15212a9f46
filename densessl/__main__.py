"""`python -m densessl ...`: the same as the `densessl` command."""
import sys

from densessl.cli import main

sys.exit(main())
