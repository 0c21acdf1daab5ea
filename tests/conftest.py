import os
from pathlib import Path

import pytest
import torch

# Tests never reach for the network (torchvision downloads stay off).
os.environ["FL_SIM_OFFLINE"] = "1"
# Every federation a test starts (in this process, or in an experiments.run subprocess, which
# inherits the environment) runs on the in-process engine: the real ServerApp and ClientApp
# exchanging real Messages, without Ray's start. Tests whose point is Ray say engine="ray".
os.environ.setdefault("FL_SIM_ENGINE", "inprocess")
# Fast and repeatable on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark images not found at {SHARED_DATA}")
    return SHARED_DATA
