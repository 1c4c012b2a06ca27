import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, make_elastic, make_model
from flextron.config import ElasticSpace, Subnet
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError


def tiny_elastic(kind: str) -> tuple[torch.nn.Module, ElasticModel]:
    return make_model(kind), make_elastic(kind)


def random_subnet(space: ElasticSpace, gen: torch.Generator) -> Subnet:
    pick = lambda cs: [c[torch.randint(len(c), (1,), generator=gen).item()] for c in cs]  # noqa: E731
    return Subnet(mlp=pick(space.mlp), attn=pick(space.attn))


def one_hot(choices: list[list[int]], chosen: list[int]) -> list[torch.Tensor]:
    return [F.one_hot(torch.tensor(c.index(x)), len(c)).float() for c, x in zip(choices, chosen)]


def test_full_width_matches_hf(kind):
    ref, em = tiny_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(em(input_ids=x).logits, ref(input_ids=x).logits)


def test_permutation_preserves_function(kind):
    ref, em = tiny_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 12))
    gen = torch.Generator().manual_seed(1)
    em.permute_([torch.randperm(b.mlp.n_units, generator=gen) for b in em.blocks],
                [torch.randperm(b.attn.n_units, generator=gen) for b in em.blocks])
    assert not torch.equal(em.blocks[0].mlp.inp.weight, ref.get_parameter(
        {"gpt2": "transformer.h.0.mlp.c_proj.weight"}.get(kind, "model.layers.0.mlp.down_proj.weight")))
    assert (em(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4


def test_hard_slice_equals_soft_one_hot(kind):
    _, em = tiny_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 12))
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        sub = random_subnet(em.space, gen)
        em.set_subnet(sub)
        hard = em(input_ids=x).logits
        em.set_soft(one_hot(em.space.mlp, sub.mlp), one_hot(em.space.attn, sub.attn))
        soft = em(input_ids=x).logits
        assert (hard - soft).abs().max() < 1e-4, sub


def test_soft_mask_mixes_nested_prefixes():
    _, em = tiny_elastic("llama")
    x = torch.randint(0, VOCAB, (1, 6))
    k = len(em.space.mlp[0])
    em.set_soft([torch.full((k,), 1 / k)] * 2, [F.one_hot(torch.tensor(len(c) - 1), len(c)).float()
                                              for c in em.space.attn])
    mask = em.blocks[0].mlp.inp.mask
    widths = em.space.mlp[0]
    # Neuron u is kept by every choice wider than u: mask = (#choices with width > u) / k.
    expected = torch.tensor([sum(w > u for w in widths) / k for u in range(widths[-1])])
    assert torch.allclose(mask, expected)
    em(input_ids=x)  # runs


def test_slicing_shrinks_compute_and_kv_cache():
    _, em = tiny_elastic("llama")
    sub = em.space.smallest()
    em.set_subnet(sub)
    x = torch.randint(0, VOCAB, (1, 5))
    out = em(input_ids=x, use_cache=True)
    k = out.cache.layers[0].keys
    assert k.shape[1] == sub.attn[0]  # KV heads in the cache = active KV groups
    seen = []
    h = em.blocks[0].mlp.inp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    em(input_ids=x)
    h.remove()
    assert seen == [sub.mlp[0]]


def test_generation_with_cache_at_a_subnet(kind):
    _, em = tiny_elastic(kind)
    em.set_subnet(em.space.centroid())
    x = torch.randint(0, VOCAB, (1, 5))
    out = em.model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # Greedy decoding with a KV cache must equal re-running the full prefix each step.
    seq = x
    for _ in range(4):
        nxt = em(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_invalid_choice_is_refused():
    _, em = tiny_elastic("llama")
    bad = em.space.full()
    bad.mlp[1] = 50
    with pytest.raises(FlextronError, match="layer 1 MLP width 50 is not in the elastic space"):
        em.set_subnet(bad)


def test_space_must_end_at_full_size():
    _, em = tiny_elastic("llama")
    with pytest.raises(FlextronError, match="must equal the layer's size"):
        em.set_space(ElasticSpace(mlp=[[8, 48]] * 2, attn=[[1, 4]] * 2))
