"""`shardckpt.cli`, the public path of the command and its library functions (docs/CLI.md):
shardckpt.tools.cli."""
from shardckpt.tools.cli import *  # noqa: F401,F403
from shardckpt.tools.cli import main  # noqa: F401
