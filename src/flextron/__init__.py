"""flextron: turn a pretrained Hugging Face causal LM into a many-in-one elastic model."""

__version__ = "0.1.0"
