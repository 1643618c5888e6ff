"""`shardckpt.dcp`, the public path of the DCP drop-in: shardckpt.integrations.dcp (Writer, Reader)."""
from shardckpt.integrations.dcp import *  # noqa: F401,F403
from shardckpt.integrations.dcp import Reader, Writer  # noqa: F401
