"""flextron: turn a pretrained Hugging Face causal LM into a many-in-one elastic model."""

# Registers the per-layer export architectures with transformers' Auto classes.
from flextron import export as _export  # noqa: F401
from flextron.version import __version__

__all__ = ["__version__"]
