import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from flextron.elastic import ElasticModel, PositionChoices
from flextron.errors import FlextronError
from flextron.space import ElasticSpace
from helpers import LLAMA_KINDS, VOCAB, make_elastic, make_model


def tiny_elastic(kind: str) -> tuple[torch.nn.Module, ElasticModel]:
    return make_model(kind), make_elastic(kind)


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
        sub = em.space.sample(gen)
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


@pytest.mark.parametrize("hidden", [False, True], ids=["widths", "hidden size"])
def test_generation_with_cache_at_a_subnet(kind, hidden):
    em = make_elastic(kind, hidden=hidden)
    em.set_subnet(em.space.smallest() if hidden else em.space.centroid())
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


def depth_elastic(kind: str) -> ElasticModel:
    return make_elastic(kind, n_layers=4, min_layers=1)


def test_depth_space_at_full_size_matches_hf(kind):
    em = depth_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(em(input_ids=x).logits, make_model(kind, 0, 4)(input_ids=x).logits)


def test_whole_skipped_layer_equals_the_model_without_it(kind):
    em, ref = depth_elastic(kind), make_model(kind, 0, 4)
    sub = em.space.full()
    sub.mlp[2] = sub.attn[2] = 0
    em.set_subnet(sub)
    layers = em.family.blocks(ref)
    del layers[2]
    ref.config.num_hidden_layers = 3
    if getattr(ref.config, "layer_types", None):  # Gemma: each layer's attention kind is read by position
        ref.config.layer_types = [t for i, t in enumerate(ref.config.layer_types) if i != 2]
    x = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(em(input_ids=x, use_cache=False).logits, ref(input_ids=x, use_cache=False).logits)


def test_soft_one_hot_skip_equals_hard_skip(kind):
    em = depth_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 9))
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        sub = em.space.sample(gen)
        sub.mlp[0] = sub.attn[3] = 0
        em.set_subnet(sub)
        hard = em(input_ids=x).logits
        em.set_soft(one_hot(em.space.mlp, sub.mlp), one_hot(em.space.attn, sub.attn))
        soft = em(input_ids=x).logits
        assert (hard - soft).abs().max() < 1e-4, sub


def test_cached_decoding_across_skipped_attention_equals_full_recompute(kind):
    em = depth_elastic(kind)
    sub = em.space.full()
    sub.attn[0] = sub.mlp[1] = sub.attn[2] = sub.mlp[2] = 0  # layer 0 holds the cache length HF reads
    em.set_subnet(sub)
    x = torch.randint(0, VOCAB, (2, 8))
    out = em(input_ids=x[:, :4], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(4, 8):
        out = em(input_ids=x[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, 1) - em(input_ids=x, use_cache=False).logits).abs().max() < 1e-5
    assert cache.layers[0].keys.shape[-1] == 1  # a one-wide placeholder, no keys


def test_a_sub_network_below_the_floor_is_refused():
    em = make_elastic("llama", n_layers=4, min_layers=2)
    sub = em.space.full()
    sub.attn[:3] = [0, 0, 0]
    with pytest.raises(FlextronError, match="keeps the attention of 1 layers, below the elastic space's floor of 2"):
        em.set_subnet(sub)


def test_a_scoped_sub_network_restores_the_previous_one_in_order(kind):
    ref, em = tiny_elastic(kind)
    x = torch.randint(0, VOCAB, (2, 9))
    outer, inner = em.space.uniform(1, 1), em.space.smallest()
    em.set_subnet(outer)
    at_outer = em(input_ids=x).logits
    em.set_subnet(None)
    with em.subnet(outer) as active:
        assert active == em.current == outer
        with em.subnet(inner):
            assert em.current == inner
        assert em.current == outer
        assert torch.equal(em(input_ids=x).logits, at_outer)
    assert em.current == em.space.full()
    assert torch.equal(em(input_ids=x).logits, ref(input_ids=x).logits)


def test_a_scoped_sub_network_is_undone_by_an_exception():
    ref, em = tiny_elastic("llama")
    x = torch.randint(0, VOCAB, (1, 7))
    with pytest.raises(RuntimeError, match="boom"), em.subnet(em.space.smallest()):
        raise RuntimeError("boom")
    assert em.current == em.space.full()
    assert torch.equal(em(input_ids=x).logits, ref(input_ids=x).logits)


def test_a_scoped_sub_network_restores_a_soft_mix():
    _, em = tiny_elastic("llama")
    x = torch.randint(0, VOCAB, (1, 7))
    em.set_soft([torch.full((len(c),), 1 / len(c)) for c in em.space.mlp],
                [torch.full((len(c),), 1 / len(c)) for c in em.space.attn])
    mixed = em(input_ids=x).logits
    with em.subnet(em.space.smallest()):
        assert em.current == em.space.smallest()
    assert em.current is None
    assert torch.equal(em(input_ids=x).logits, mixed)


@pytest.mark.parametrize("hidden", [False, True], ids=["widths", "hidden sizes"])
def test_each_row_runs_its_own_sub_network_in_one_batch(kind, hidden):
    em = make_elastic(kind, n_layers=4, min_layers=1, hidden=hidden)  # in a hidden space rows differ in size too
    gen = torch.Generator().manual_seed(5)
    subs = [em.space.full(), em.space.smallest(), em.space.sample(gen), em.space.sample(gen)]
    subs[3].mlp[0] = subs[3].attn[3] = 0
    x = torch.randint(0, VOCAB, (len(subs), 9))
    alone = []
    for i, sub in enumerate(subs):
        with em.subnet(sub):
            alone.append(em(input_ids=x[i : i + 1]).logits)
    with em.rows(subs):
        together = em(input_ids=x).logits
        assert em.current is None
    assert (together - torch.cat(alone)).abs().max() < 1e-4
    assert em.current == em.space.full()  # the previous state is back


# Query heads trimmed inside KV groups (attn_unit="head"). The tiny llama-likes have 8 query heads in
# 4 groups (R = 2): choice 8 = all, 4 = one head per group, 1-3 = that many groups of one head.


def heads_reference(model: torch.nn.Module, heads: list[int], groups: list[int]) -> torch.nn.Module:
    """The HF model with only the given query heads and KV groups in every layer, cut by hand."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = c.to_dict() | {"num_attention_heads": len(heads), "num_key_value_heads": len(groups), "head_dim": d}
    ref = type(model)(type(c).from_dict(cfg)).eval()
    rows = lambda idx, at=0: torch.tensor([at + i * d + j for i in idx for j in range(d)])  # noqa: E731
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    state = {}
    for k, v in model.state_dict().items():
        if ".q_proj." in k or ".q_norm." in k and v.numel() == q:  # OLMo 2's q/k norms span the projection
            v = v[rows(heads)]
        elif ".k_proj." in k or ".v_proj." in k or ".k_norm." in k and v.numel() == kv:
            v = v[rows(groups)]
        elif ".qkv_proj." in k:  # Phi-3: q|k|v
            v = v[torch.cat([rows(heads), rows(groups, q), rows(groups, q + kv)])]
        elif ".o_proj." in k:
            v = v[:, rows(heads)]
        state[k] = v
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_query_head_choices_equal_the_hand_cut_model(kind):
    ref = make_model(kind)
    em = make_elastic(kind, attn_unit="head")
    assert em.space.attn == [[1, 2, 3, 4, 8]] * 2
    x = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(em(input_ids=x).logits, ref(input_ids=x).logits)
    # HF head h reads group h // 2: c = 4 keeps head 0 of every group, c = 2 groups 0-1 with one head.
    for c, heads, groups in ((4, [0, 2, 4, 6], [0, 1, 2, 3]), (2, [0, 2], [0, 1]), (1, [0], [0])):
        sub = em.space.full()
        sub.attn = [c, c]
        with em.subnet(sub):
            got = em(input_ids=x).logits
            assert em.blocks[0].attn.module.num_key_value_groups == 1
        want = heads_reference(ref, heads, groups)(input_ids=x).logits
        assert (got - want).abs().max() < 1e-5, c
    assert em.blocks[0].attn.module.num_key_value_groups == 2  # back at full width


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_query_head_hard_slice_equals_soft_one_hot_and_rows(kind):
    em = make_elastic(kind, n_layers=3, attn_unit="head")
    x = torch.randint(0, VOCAB, (4, 9))
    gen = torch.Generator().manual_seed(3)
    subs = [em.space.sample(gen) for _ in range(4)]
    alone = []
    for i, sub in enumerate(subs):
        with em.subnet(sub):
            hard = em(input_ids=x).logits
        em.set_soft(one_hot(em.space.mlp, sub.mlp), one_hot(em.space.attn, sub.attn))
        assert (hard - em(input_ids=x).logits).abs().max() < 1e-4, sub
        alone.append(hard[i : i + 1])
    with em.rows(subs):
        assert (em(input_ids=x).logits - torch.cat(alone)).abs().max() < 1e-4


def test_query_head_permutation_keeps_groups_together_and_the_function():
    ref, em = make_model("llama"), make_elastic("llama", attn_unit="head")
    x = torch.randint(0, VOCAB, (2, 10))
    gen = torch.Generator().manual_seed(4)
    scores = [torch.rand(8, generator=gen) for _ in em.blocks]
    perms = [b.attn_order(s) for b, s in zip(em.blocks, scores)]
    for p, s in zip(perms, scores):  # groups by summed score, heads by score inside each group
        groups = p.view(4, 2) // 2
        assert (groups == groups[:, :1]).all()
        assert torch.equal(groups[:, 0], torch.argsort(s.view(4, 2).sum(1), descending=True))
        assert (s[p].view(4, 2)[:, 0] >= s[p].view(4, 2)[:, 1]).all()
    em.permute_([torch.arange(b.mlp.n_units) for b in em.blocks], perms)
    assert (em(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4
    with pytest.raises(FlextronError, match="keep each KV group's query heads together"):
        em.blocks[0].permute_attn_(torch.tensor([1, 2, 0, 3, 4, 5, 6, 7]))


def test_query_head_cached_generation_equals_full_recompute():
    em = make_elastic("llama", attn_unit="head")
    sub = em.space.full()
    sub.attn = [4, 3]
    with em.subnet(sub):
        x = torch.randint(0, VOCAB, (1, 5))
        out = em.model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = x
        for _ in range(4):
            seq = torch.cat([seq, em(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_query_head_choices_one_kv_head():
    # Gemma-3-style: 4 query heads, one KV head; whole-group removal has nothing to remove.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    assert ElasticModel(copy.deepcopy(model)).space.attn == [[1]]  # wrapping changes the model in place
    em = ElasticModel(copy.deepcopy(model), attn_unit="head")
    assert em.space.attn == [[1, 2, 3, 4]]
    x = torch.randint(0, VOCAB, (1, 7))
    for c in (1, 2):  # (HF refuses a config of 3 heads in 32 features)
        with em.subnet(type(em.space.full())(mlp=[64], attn=[c])):
            got = em(input_ids=x).logits
        assert (got - heads_reference(model, list(range(c)), [0])(input_ids=x).logits).abs().max() < 1e-5


def test_query_head_space_refuses_unequal_groups():
    em = make_elastic("llama", attn_unit="head")
    with pytest.raises(FlextronError, match=r"attention choices \[6\] are not head counts"):
        em.set_space(ElasticSpace(mlp=em.space.mlp, attn=[[4, 6, 8]] * 2, attn_unit="head"))
    with pytest.raises(FlextronError, match="counts attention in groups"):
        em.set_space(ElasticSpace(mlp=em.space.mlp, attn=[[2, 4]] * 2))


def test_per_token_mlp_choices_equal_each_token_at_its_width(kind):
    # One layer: attention is the same whatever the MLP widths, so token t's logits are those of the
    # whole sequence run at token t's width.
    em = make_elastic(kind, n_layers=1)
    x = torch.randint(0, VOCAB, (2, 8))
    gen = torch.Generator().manual_seed(6)
    picks = PositionChoices.sample(em.space, gen, 2, 8)
    with em.choices(picks):
        mixed = em(input_ids=x).logits
    assert em.current == em.space.full()  # the previous state is back
    widths = em.space.mlp[0]
    for b in range(2):
        attn = em.space.attn[0][picks.attn[0][b, 0]]
        for w in set(picks.mlp[0][b].tolist()):
            with em.subnet(type(em.space.full())(mlp=[widths[w]], attn=[attn])):
                alone = em(input_ids=x[b : b + 1]).logits[0]
            at = picks.mlp[0][b] == w
            assert (mixed[b][at] - alone[at]).abs().max() < 1e-4
