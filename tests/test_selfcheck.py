"""The numerical self-checks of a family (flextron.selfcheck): here, the hidden-size check convert runs."""

import pytest
import torch
import torch.nn.functional as F

from flextron.errors import FlextronError
from flextron.selfcheck import check_hidden
from helpers import make_elastic


def hidden_elastic(kind: str, dtype: torch.dtype = torch.float32):
    em = make_elastic(kind).to(dtype)
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    return em


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_family_passes_the_hidden_check(kind, dtype):
    em = hidden_elastic(kind, dtype)
    em.train()
    check_hidden(em)
    assert em.training and em.current == em.space.full()  # the model is left as it was


def test_a_norm_over_the_stream_that_flextron_does_not_cut_fails_the_hidden_check():
    em = hidden_elastic("llama")

    def weightless_norm(module, args, out):  # a LayerNorm without weights over the residual stream
        return F.layer_norm(out, out.shape[-1:])

    em.family.blocks(em.model)[0].register_forward_hook(weightless_norm)
    with pytest.raises(FlextronError, match="does not run this LlamaForCausalLM at hidden size 32: its first 32 "
                                            "channels and the masked stream differ by") as e:
        check_hidden(em)
    assert "\n" not in str(e.value)
