"""Family adapters and layout-based detection."""

from torch import nn

from flextron.errors import FlextronError
from flextron.families.base import AttnGeometry, Family, Proj
from flextron.families.gpt2 import GPT2
from flextron.families.llama import LLAMA

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2)}
SUPPORTED_CLASSES = tuple(c for f in FAMILIES.values() for c in f.classes)

__all__ = ["FAMILIES", "SUPPORTED_CLASSES", "AttnGeometry", "Family", "Proj", "detect_family"]


def detect_family(model: nn.Module) -> Family:
    """The family whose module layout the model has; an error naming what is missing otherwise."""
    gaps = {f.name: f.missing(model) for f in FAMILIES.values()}
    for name, missing in gaps.items():
        if not missing:
            return FAMILIES[name]
    closest = min(gaps, key=lambda n: len(gaps[n]))
    raise FlextronError(
        f"unsupported architecture {type(model).__name__}: its layout matches no family "
        f"(closest: {closest}, missing {', '.join(gaps[closest][:3])}); supported: "
        f"{', '.join(SUPPORTED_CLASSES)} and models with the same module layout"
    )
