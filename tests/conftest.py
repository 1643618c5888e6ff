import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from s3_server import s3_server  # noqa: E402,F401  (session fixture: a real Ceph radosgw on loopback)


def pytest_collection_modifyitems(config, items):
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
