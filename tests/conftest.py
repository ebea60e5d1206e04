"""Tests use tiny networks: one thread each is as fast, and subprocess tests that run two
trainings side by side on two cores do not oversubscribe them."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "DDPM_CACHE_DIR" not in os.environ:  # `--precision auto`'s verdicts: never the user's cache
    import tempfile
    os.environ["DDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import make_images  # noqa: E402


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("imgs"))
