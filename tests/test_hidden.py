import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from flextron.errors import FlextronError
from helpers import VOCAB, make_elastic, make_model

SIZES = (0.5, 0.75, 1.0)  # of 64 channels, multiples of 16: 32, 48, 64


def hidden_elastic(kind: str, min_layers: int | None = None, n_layers: int = 2):
    em = make_elastic(kind, n_layers=n_layers, min_layers=min_layers)
    em.set_space(em.space.with_hidden(em.hidden_size, SIZES, 16))
    return em


def one_hot(choices: list, chosen) -> torch.Tensor:
    return F.one_hot(torch.tensor(choices.index(chosen)), len(choices)).float()


def test_hidden_space_at_full_size_matches_hf(kind):
    em, ref = hidden_elastic(kind), make_model(kind)
    assert em.space.hidden == [32, 48, 64]
    x = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(em(input_ids=x).logits, ref(input_ids=x).logits)


def test_channel_permutation_preserves_function(kind):
    em, ref = hidden_elastic(kind), make_model(kind)
    x = torch.randint(0, VOCAB, (2, 10))
    before = ref.get_input_embeddings().weight.clone()
    em.permute_hidden_(torch.randperm(em.hidden_size, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(em.model.get_input_embeddings().weight, before)
    assert (em(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4


def test_hard_slice_equals_soft_one_hot_with_every_choice(kind):
    em = hidden_elastic(kind, min_layers=1, n_layers=3)
    x = torch.randint(0, VOCAB, (2, 9))
    gen = torch.Generator().manual_seed(4)
    seen = set()
    for _ in range(6):
        sub = em.space.sample(gen)
        seen.add(sub.hidden)
        em.set_subnet(sub)
        hard = em(input_ids=x).logits
        mlp = [one_hot(c, w) for c, w in zip(em.space.mlp, sub.mlp)]
        attn = [one_hot(c, a) for c, a in zip(em.space.attn, sub.attn)]
        em.set_soft(mlp, attn, one_hot(em.space.hidden, sub.hidden or em.hidden_size))
        assert (hard - em(input_ids=x).logits).abs().max() < 1e-4, sub
    assert len(seen) > 1


@pytest.mark.parametrize("kind, norm_cls", [("llama", LlamaRMSNorm), ("gemma3", Gemma3RMSNorm), ("gpt2", None)])
def test_norm_statistics_are_over_the_kept_channels(kind, norm_cls):
    """A norm at hidden size d is transformers' own norm of size d on the first d channels (hard), and
    the same padded with zeros under a one-hot mask (soft)."""
    em = hidden_elastic(kind)
    norm = em.axis.norms[0]
    d, x = 32, torch.randn(2, 5, em.hidden_size)
    ref = torch.nn.LayerNorm(d, eps=norm.eps) if norm_cls is None else norm_cls(d, eps=getattr(
        norm, "variance_epsilon", getattr(norm, "eps", None)))
    with torch.no_grad():
        ref.weight.copy_(norm.weight[:d])
        if norm_cls is None:
            ref.bias.copy_(norm.bias[:d])
    expected = ref(x[..., :d])
    em.axis.set_hard(d)
    assert torch.allclose(norm(x[..., :d]), expected, atol=1e-6)
    mask = (torch.arange(em.hidden_size) < d).float()
    em.axis.set_soft(mask)
    soft = norm(x * mask)
    assert torch.allclose(soft[..., :d], expected, atol=1e-5) and not soft[..., d:].any()


def test_hard_slice_narrows_the_residual_stream_and_the_head():
    em = hidden_elastic("llama")
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
             for m in (em.blocks[0].attn.outs[0], em.blocks[1].mlp.outs[0], em.model.lm_head)]
    with em.subnet(em.space.uniform(3, 3, hidden_index=0)):
        logits = em(input_ids=torch.randint(0, VOCAB, (1, 4))).logits
    for h in hooks:
        h.remove()
    assert seen == [32, 32, 32] and logits.shape[-1] == VOCAB


def test_a_hidden_size_weight_it_cannot_cut_is_refused():
    em = make_elastic("llama")
    em.model.model.extra = torch.nn.Parameter(torch.zeros(em.hidden_size))
    with pytest.raises(FlextronError, match="does not know how to cut.*model.extra"):
        em.set_space(em.space.with_hidden(em.hidden_size, SIZES, 16))


def test_hidden_choices_are_checked():
    em = make_elastic("llama")
    sub = em.space.full()
    sub.hidden = 32
    with pytest.raises(FlextronError, match="hidden size 32 is not in the elastic space"):
        em.set_subnet(sub)
    with pytest.raises(FlextronError, match="largest hidden size 48 must equal the model's 64"):
        em.set_space(em.space.with_hidden(48, SIZES, 16))
    with pytest.raises(FlextronError, match="no hidden-size choices"):
        em.permute_hidden_(torch.arange(em.hidden_size))
