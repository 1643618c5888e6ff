"""`python -m shardckpt ...` runs the command-line tool (shardckpt/cli.py)."""
import sys

from .cli import main

sys.exit(main())
