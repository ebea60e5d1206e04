"""Tests use tiny networks: one thread each is as fast, and subprocess tests that run two
trainings side by side on two cores do not oversubscribe them."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
