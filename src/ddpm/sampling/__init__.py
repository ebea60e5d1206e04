"""From a run folder to images: load the model, run a sampler in batches, record frames."""
from .generate import LoadedModel, SampleConfig, Samples, generate, load_model, make_schedule, resolve_device

__all__ = ["LoadedModel", "SampleConfig", "Samples", "generate", "load_model", "make_schedule", "resolve_device"]
