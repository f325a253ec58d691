"""`python -m trieflow.operator ...` is `trieflow operator ...` (for images without the script)."""

import sys

from trieflow.cli import app

app(args=["operator", *sys.argv[1:]], prog_name="trieflow")
