"""Families, declared by HF `model_type`: a model is never matched to a family by its module names."""

from torch import nn

from flextron.errors import FlextronError
from flextron.families.base import AttnGeometry, Branch, Family, Proj
from flextron.families.gpt2 import GPT2
from flextron.families.llama import GEMMA, LLAMA, OLMO2
from flextron.families.phi3 import PHI3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GEMMA, OLMO2, PHI3, GPT2)}
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}
PER_LAYER_PREFIX = "flextron_"  # model types of flextron's per-layer exports: flextron_<base model type>

__all__ = ["FAMILIES", "MODEL_TYPES", "AttnGeometry", "Branch", "Family", "Proj",
           "detect_family"]


def detect_family(model: nn.Module, name: str | None = None) -> Family:
    """The family declared for the model's `model_type`; `name` forces a declared family onto a
    model type that is not in the table (`flextron convert --family`, which then checks it
    numerically). Either way the model must have the family's modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base_type = model_type.removeprefix(PER_LAYER_PREFIX) if isinstance(model_type, str) else None
    what = f"{type(model).__name__} (model_type {model_type!r})"
    if name is not None:
        family = FAMILIES.get(name)
        if family is None:
            raise FlextronError(f"unknown family {name!r}; declared families: {', '.join(FAMILIES)}")
    else:
        family = MODEL_TYPES.get(base_type)
        if family is None:
            raise FlextronError(
                f"unsupported model {what}; supported model types: {', '.join(MODEL_TYPES)} "
                f"(pass --family {'|'.join(FAMILIES)} to treat it as one, checked numerically before "
                "anything is written)"
            )
    missing = family.missing(model)
    if missing:
        raise FlextronError(f"{what} does not have the {family.name} family's layout: it lacks "
                            f"{', '.join(missing[:3])}")
    return family
