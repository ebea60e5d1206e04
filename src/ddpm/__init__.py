"""ddpm: denoising diffusion probabilistic models in PyTorch, as a library and a command."""
import os

# Before torch loads OpenMP: spinning worker threads stall 3-4x when anything else shares the
# CPU (bench/levers.py --env, BENCHMARKS.md); the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig, preset
from .data.readers import load_dataset, load_fashion_mnist, load_image_folder
from .core.diffusion import Denoiser, q_sample, training_losses
from .errors import DdpmError
from .pictures.forward import noise_figure
from .nn import UNet
from .sampling.generate import generate, load_model
from .core.schedules import NoiseSchedule
from .training.train import train
from .pictures.viz import save_gif, save_grid

__version__ = "0.1.0"
__all__ = [
    "Checkpoint", "DataConfig", "DdpmError", "Denoiser", "DiffusionConfig", "ModelConfig", "NoiseSchedule",
    "RunConfig", "SampleConfig", "TrainConfig", "UNet", "generate", "load_checkpoint", "load_dataset",
    "load_fashion_mnist", "load_image_folder", "load_model", "noise_figure", "preset", "q_sample",
    "save_checkpoint", "save_gif", "save_grid", "train", "training_losses",
]
