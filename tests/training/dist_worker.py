"""Run by torchrun from test_distributed.py: train CONFIG in RUN and save this rank's weights."""
import os
import sys
from pathlib import Path

import torch

from ddpm.config import RunConfig
from ddpm.training.train import train

torch.set_num_threads(1)
config, run, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
res = train(RunConfig.load(config), run, device="cpu", progress=False, tensorboard=False,
            resume=len(sys.argv) > 4 and sys.argv[4] == "--resume")
assert res.model is not None
torch.save({"step": res.step, "main": res.main, "weights": res.model.state_dict()},
           out / f"rank{os.environ['RANK']}.pt")
