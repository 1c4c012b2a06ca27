import pytest
import torch

from flextron.elastic import ElasticModel
from flextron.importance import measure_importance, random_importance, sort_by_importance
from helpers import VOCAB, make_elastic, make_model

# The norms over the residual stream of each tiny model (by their last name): pre- and post-norms, the final norm.
STREAM_NORMS = {"llama": {"input_layernorm", "post_attention_layernorm", "norm"},
                "gemma3": {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                           "post_feedforward_layernorm", "norm"},
                "gpt2": {"ln_1", "ln_2", "ln_f"}}


def hidden_elastic(kind: str):
    """A tiny elastic model with hidden sizes 32, 48 and 64."""
    em = make_elastic(kind)
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    return em


@pytest.mark.parametrize("attn_unit", ["group", "head"])
def test_scores_are_sorted_and_function_is_kept(kind, attn_unit):
    ref = make_model(kind)
    em = ElasticModel(make_model(kind), attn_unit=attn_unit)
    seqs = torch.randint(0, VOCAB, (6, 16))
    imp = measure_importance(em, seqs, batch_size=4, progress=False)
    assert [s.numel() for s in imp.mlp] == [b.mlp.n_units for b in em.blocks]
    assert [s.numel() for s in imp.attn] == [b.attn.n_units for b in em.blocks]
    assert all((s > 0).all() for s in imp.mlp + imp.attn)
    sorted_imp = sort_by_importance(em, imp)
    for s in sorted_imp.mlp + ([] if em.blocks[0].head_units else sorted_imp.attn):
        assert (s[:-1] >= s[1:]).all()
    for b, s in zip(em.blocks, sorted_imp.attn if em.blocks[0].head_units else []):
        # Heads: groups by descending summed score, heads by descending score inside each group.
        per_group = s.view(b.geometry.n_kv_heads, -1)
        assert (per_group[:, :-1] >= per_group[:, 1:]).all()
        assert (per_group.sum(1)[:-1] >= per_group.sum(1)[1:]).all()
    x = torch.randint(0, VOCAB, (2, 10))
    assert (em(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4
    # Measuring again on the permuted model gives the sorted scores.
    again = measure_importance(em, seqs, batch_size=4, progress=False)
    for a, b in zip(again.mlp + again.attn, sorted_imp.mlp + sorted_imp.attn):
        assert torch.allclose(a, b, rtol=1e-4)


def test_dead_neuron_and_group_sort_last():
    em = ElasticModel(make_model("llama"))
    with torch.no_grad():
        em.blocks[0].mlp.outs[1].weight[5].zero_()  # up_proj row 5: neuron 5's activation is 0
        em.blocks[0].attn.outs[2].weight[0:8].zero_()  # v_proj of KV group 0: its heads output 0
    imp = measure_importance(em, torch.randint(0, VOCAB, (4, 12)), progress=False)
    assert imp.mlp[0][5] == 0 and imp.mlp[0].argmin() == 5
    assert imp.attn[0][0] == 0
    sort_by_importance(em, imp)
    assert (em.blocks[0].mlp.outs[1].weight[-1] == 0).all()
    assert (em.blocks[0].attn.outs[2].weight[-8:] == 0).all()


def test_output_score_is_what_each_attention_unit_adds_through_the_output_projection(kind):
    em = ElasticModel(make_model(kind))
    seqs = torch.randint(0, VOCAB, (3, 10))
    inp = em.blocks[1].attn.inp
    seen = []
    handle = inp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    imp = measure_importance(em, seqs, batch_size=2, progress=False, attn_score="output")
    handle.remove()
    w = inp.weight.detach() if inp.conv1d else inp.weight.detach().T  # [in, out]
    per_seq = []
    for x in torch.cat(seen):  # [T, in]: one sequence
        per_seq.append(torch.stack([(x[:, u * inp.unit:(u + 1) * inp.unit] @ w[u * inp.unit:(u + 1) * inp.unit])
                                    .norm(dim=-1).mean() for u in range(inp.n_units)]))
    assert torch.allclose(imp.attn[1], torch.stack(per_seq).norm(dim=0), rtol=1e-4)


def test_heads_inside_groups_are_scored_by_output_whole_groups_by_input():
    seqs = torch.randint(0, VOCAB, (4, 12))
    for unit, rule in (("head", "output"), ("group", "input")):
        em = ElasticModel(make_model("llama"), attn_unit=unit)
        inp = em.blocks[0].attn.inp
        with torch.no_grad():  # unit 0's activations are unchanged, but nothing of it reaches the residual stream
            inp.weight[:, :inp.unit].zero_()
        default = measure_importance(em, seqs, progress=False)
        assert all(torch.equal(a, b) for a, b in
                   zip(default.attn, measure_importance(em, seqs, progress=False, attn_score=rule).attn))
        assert (default.attn[0][0] == 0) == (rule == "output") and (default.attn[0][1:] > 0).all()
    with pytest.raises(ValueError, match="attn_score"):
        measure_importance(em, seqs, progress=False, attn_score="outputs")


def test_random_importance_is_seeded():
    em = ElasticModel(make_model("llama"))
    a, b = random_importance(em, 3), random_importance(em, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.mlp + a.attn, b.mlp + b.attn))
    assert a.hidden is None and "hidden" not in a.to_dict()
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 1.0), 16))
    c = random_importance(em, 3)  # the channels are drawn last: the other scores are those of the old space
    assert all(torch.equal(x, y) for x, y in zip(a.mlp + a.attn, c.mlp + c.attn)) and a.layers == c.layers
    assert c.hidden.shape == (em.hidden_size,) and torch.equal(c.hidden, random_importance(em, 3).hidden)
    assert not torch.equal(c.hidden, random_importance(em, 4).hidden)


@pytest.mark.parametrize("kind", sorted(STREAM_NORMS))
def test_hidden_scores_are_the_magnitude_of_the_normalised_stream(kind):
    """Per norm over the stream, each sequence's mean |output| per channel, L2 over sequences; summed over norms."""
    em, ref = hidden_elastic(kind), make_model(kind)
    seqs = torch.randint(0, VOCAB, (5, 12))
    outs = {}
    norms = [(n, m) for n, m in ref.named_modules() if n.rsplit(".", 1)[-1] in STREAM_NORMS[kind]]
    assert len(norms) == len(STREAM_NORMS[kind]) * 2 - 1  # per block, and the final norm once
    for name, m in norms:
        m.register_forward_hook(lambda m, a, out, name=name: outs.setdefault(name, []).append(out.detach()))
    with torch.no_grad():
        ref(input_ids=seqs)
    want = sum(torch.cat(outs[name]).abs().mean(dim=1).norm(dim=0) for name, _ in norms)
    imp = measure_importance(em, seqs, batch_size=2, progress=False)
    assert torch.allclose(imp.hidden, want, rtol=1e-5)
    assert imp.to_dict()["hidden"] == imp.hidden.tolist()


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_channels_sorted_by_importance_keep_the_function(kind):
    em, ref = hidden_elastic(kind), make_model(kind)
    seqs = torch.randint(0, VOCAB, (4, 12))
    imp = sort_by_importance(em, measure_importance(em, seqs, batch_size=2, progress=False))
    assert (imp.hidden[:-1] >= imp.hidden[1:]).all() and not torch.equal(
        em.model.get_input_embeddings().weight, ref.get_input_embeddings().weight)  # the channels moved
    x = torch.randint(0, VOCAB, (2, 10))
    assert (em(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4
    again = measure_importance(em, seqs, batch_size=2, progress=False)  # the permuted model scores in order
    assert torch.allclose(again.hidden, imp.hidden, rtol=1e-4)


def test_a_space_without_hidden_choices_scores_no_channels():
    em = make_elastic("llama")
    imp = measure_importance(em, torch.randint(0, VOCAB, (2, 8)), progress=False)
    assert imp.hidden is None and "hidden" not in imp.to_dict()
    before = em.model.get_input_embeddings().weight.clone()
    sort_by_importance(em, imp)
    assert torch.equal(em.model.get_input_embeddings().weight, before)


def test_block_importance_ranks_a_sub_layer_that_adds_nothing_first(kind):
    em = ElasticModel(make_model(kind, n_layers=3))
    with torch.no_grad():  # layer 1's MLP and layer 2's attention now add exactly 0 to the residual stream
        em.blocks[1].mlp.inp.weight.zero_()
        em.blocks[2].attn.inp.weight.zero_()
        for part in (em.blocks[1].mlp, em.blocks[2].attn):
            if part.inp.bias is not None:
                part.inp.bias.zero_()
    imp = measure_importance(em, torch.randint(0, VOCAB, (4, 12)), progress=False)
    assert imp.layers["mlp"][1] == pytest.approx(0.0, abs=1e-6) and min(imp.layers["mlp"][::2]) > 1e-4
    assert imp.layers["attn"][2] == pytest.approx(0.0, abs=1e-6) and min(imp.layers["attn"][:2]) > 1e-4
    order = imp.skip_order()
    assert order["mlp"][0] == 1 and order["attn"][0] == 2
    assert sort_by_importance(em, imp).layers == imp.layers  # sorting units leaves layer scores alone
