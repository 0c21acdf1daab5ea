import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never reach for the network (torchvision downloads stay off).
os.environ["FL_SIM_OFFLINE"] = "1"
# Every federation a test starts (in this process, or in an experiments.run subprocess, which
# inherits the environment) runs on the in-process engine: the real ServerApp and ClientApp
# exchanging real Messages, without Ray's start. Tests whose point is Ray say engine="ray".
os.environ.setdefault("FL_SIM_ENGINE", "inprocess")
# One thread per test process, and `make test` runs one pytest worker per core (pytest-xdist):
# the tests' tensors are small, and two threads per process on two cores spent four times the
# CPU for the same tests (tests/test_dlg.py, test_inverting.py, test_rgap.py: 204 s of CPU at
# two threads, 54 s at one, on a loaded machine). OMP_NUM_THREADS reaches the processes the
# tests start (experiments.run, the deployment, the sweeps' cells).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The runs' attack workers at the tests' own priority, not the lowest (experiments.runner.attack_nice):
# with two pytest workers per core the cores are never idle, and niced attacks waited behind them.
os.environ.setdefault("FL_SIM_ATTACK_NICE", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# `make test` hands whole modules to its workers (pytest-xdist's --dist loadfile: a module's
# fixtures, e.g. the Ray head of test_sweep_ray.py, are set up once) and the longest modules go
# first, so that no long one starts last while the other workers sit idle (longest processing
# time first). The order: wall-clock seconds per module in a suite run (docs/development.md);
# the modules not named follow in their usual order.
LONGEST_FIRST = (
    "test_audit.py",
    "test_deploy.py",
    "test_sweep_ray.py",
    "test_interrupt.py",
    "test_sweep.py",
    "test_demo.py",
    "test_flwr_run.py",
    "test_compose.py",
    "test_fedavg_attacks.py",
    "test_defences.py",
    "test_rgap.py",
    "test_engine.py",
    "test_active.py",
    "test_faults.py",
    "test_attack_hooks.py",
    "test_api.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's order kept


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark images not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_leaked_global_state():
    """Every test starts from the same process-wide state, whatever ran before it.

    torch's thread count and default dtype are settings a test (or the code it calls in-process)
    must put back: a test that leaves either changed is restored and then fails at teardown, naming
    what it changed. The global RNGs (torch, numpy, random) are only restored: drawing from them
    or seeding them is what tests do, but the next test must not depend on it."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    leaked = []
    if torch.get_num_threads() != threads:
        leaked.append(f"torch.set_num_threads({torch.get_num_threads()}), was {threads}")
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"torch.set_default_dtype({torch.get_default_dtype()}), was {dtype}")
        torch.set_default_dtype(dtype)
    torch.set_rng_state(rngs[0])
    np.random.set_state(rngs[1])
    random.setstate(rngs[2])
    if leaked:
        pytest.fail("the test left global state changed (now restored): " + "; ".join(leaked), pytrace=False)
