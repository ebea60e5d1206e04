"""From a run folder to images: load the model, run a sampler in batches, record frames."""
from ..config import SampleConfig
from ..core.schedules import make_schedule
from ..runtime.device import resolve_device
from .generate import LoadedModel, Samples, SamplingCancelled, StepEvent, generate, load_model
from .editing import RePaintConfig, edit, inpaint

__all__ = ["LoadedModel", "RePaintConfig", "SampleConfig", "Samples", "SamplingCancelled", "StepEvent", "edit",
           "generate", "inpaint", "load_model", "make_schedule", "resolve_device"]
