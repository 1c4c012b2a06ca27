"""flextron: turn a pretrained Hugging Face causal LM into a many-in-one elastic model."""

__version__ = "0.1.0"

# Registers the per-layer export architectures with transformers' Auto classes.
from flextron import export as _export  # noqa: E402,F401
