"""`python -m shardckpt ...` runs the command-line tool (shardckpt/cli.py)."""
import sys

from shardckpt.tools.cli import main

sys.exit(main())
