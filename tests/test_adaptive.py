"""Input-adaptive routing: grouped per-token MLP execution equals a per-token reference, the
attention chosen for a request holds through generation, and the KV cache has the routed size."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.adaptive import AdaptiveLM, AdaptiveRouting, calibrate, causal_chunks
from flextron.budgets import cost_table, select_subnet
from flextron.options import RouteOptions
from flextron.routers import AdaptiveRouters, Routers, StaticRouter
from flextron.space import Budget, Subnet
from helpers import make_elastic, prompt_sensitive

GRID = (0.4, 0.7, 1.0)


def routed(kind: str = "llama", seed: int = 0, hidden: bool = False) -> AdaptiveRouting:
    """Untrained adaptive routers; with `hidden`, on a space with hidden sizes 32, 48, 64, under an
    untrained static router (whose sub-network at each grid budget fixes the hidden size)."""
    em = make_elastic(kind, hidden=hidden)
    torch.manual_seed(seed)
    if hidden:
        em.routers = Routers(StaticRouter(em.space, GRID, hidden=16), "params", RouteOptions(budgets=GRID, hidden=16))
    routers = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, GRID, hidden=16)
    with torch.no_grad():  # spread the untrained routers' choices over all widths
        for lin in routers.token_out:
            lin.weight.mul_(30)
    return AdaptiveRouting(em, routers, cost_table(em, "params")).attach()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_grouped_mlp_equals_per_token_reference(kind):
    routing = routed(kind)
    em = routing.em
    ids = torch.randint(0, 128, (2, 12))
    routing.start(0.7, ids)
    block = em.blocks[0]
    x = torch.randn(2, 12, em.config.hidden_size)
    with torch.no_grad():
        got = block.mlp.module(x)
        choice = routing.token_choices[0]
        assert len(choice.unique()) > 1  # several widths in one batch
        ref = []
        for t, k in enumerate(choice.tolist()):
            block.mlp.set_hard(em.space.mlp[0][k])
            ref.append(type(block.mlp.module).forward(block.mlp.module, x.view(-1, x.shape[-1])[t : t + 1]))
        block.mlp.set_hard(block.mlp.n_units)
    torch.testing.assert_close(got.view(-1, got.shape[-1]), torch.cat(ref), atol=1e-5, rtol=1e-5)
    assert routing.mlp_counts[0].sum() == 24


@pytest.mark.parametrize("hidden", [False, True])
def test_attention_is_fixed_per_request_and_the_cache_has_the_routed_size(hidden):
    routing = routed(seed=3, hidden=hidden)
    em = routing.em
    prompt = torch.randint(0, 128, (1, 10))
    (widths,) = routing.start(0.4, prompt)
    if hidden:  # 40% is out of reach at the full hidden size; the KV cache does not depend on it
        assert em.axis.active < em.hidden_size
    g = em.blocks[0].geometry
    seen = []
    hook = em.blocks[0].attn.outs[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        out = em.model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                return_dict_in_generate=True)
    hook.remove()
    q_width = widths[0] * g.heads_per_unit * g.head_dim
    assert len(seen) == 5 and set(seen) == {q_width}  # prefill + 4 decode steps, one width
    cache = out.past_key_values
    for layer, units in enumerate(widths):
        keys = cache.layers[layer].keys
        assert keys.shape[1] == units * g.n_kv_heads // em.blocks[layer].attn.n_units
    assert out.sequences.shape[1] == 15


def test_training_mode_sends_gradients_to_both_routers_and_costs_are_consistent():
    routing = routed()
    em = routing.em
    ids = torch.randint(0, 128, (3, 16))
    routing.start(0.7, ids, tau=1.0, generator=torch.Generator().manual_seed(0))
    logits = em(input_ids=ids).logits
    ratio = routing.expected_ratio()
    (logits.logsumexp(-1).mean() + ratio + routing.balance()).backward()
    r = routing.routers
    assert r.token_in[0].weight.grad.abs().sum() > 0 and r.request[0].weight.grad.abs().sum() > 0
    smallest = cost_table(em, "params").smallest / routing.full
    assert smallest <= routing.realised_fraction() <= 1.0 and smallest <= ratio.item() <= 1.0


@pytest.mark.parametrize("kind", ["llama", "gemma3", "olmo2"])
def test_the_quality_loss_reaches_the_token_routers_through_the_gate_also_behind_a_post_norm(kind):
    """The straight-through gate multiplies what the MLP adds; behind a post-norm (Gemma, OLMo 2) it
    multiplies the norm's output, which would otherwise undo it and cut the quality loss's gradient."""
    routing = routed(kind)
    saved = [block.mlp.inp.weight.detach().clone() for block in routing.em.blocks]
    with torch.no_grad():  # MLP outputs well above the norms' epsilon, as in trained models
        for block in routing.em.blocks:
            block.mlp.inp.weight.mul_(100)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    routing.start(0.7, ids, tau=1.0, generator=torch.Generator().manual_seed(0))
    routing.em(input_ids=ids).logits.logsumexp(-1).mean().backward()  # no budget or balance term
    assert all(lin.weight.grad.norm() > 1e-4 for lin in routing.routers.token_in)  # 1e-6 when the norm undid it
    routing.detach()
    with torch.no_grad():  # detached: no gate left on the norms
        after = routing.em(input_ids=ids).logits
        for block, weight in zip(routing.em.blocks, saved):
            block.mlp.inp.weight.copy_(weight)
        assert torch.equal(routing.em(input_ids=ids).logits, make_elastic(kind)(input_ids=ids).logits)
    assert after.isfinite().all()


def test_adaptive_lm_scores_each_sequence_as_its_own_request():
    routing = routed(seed=5)
    lm = AdaptiveLM(routing, 0.7)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        both = lm(input_ids=ids).logits
        alone = torch.cat([lm(input_ids=ids[i : i + 1]).logits for i in range(2)])
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)
    assert len(lm.costs) == 3 and all(0 < c <= 1 for c in lm.costs)
    routing.detach()
    assert "forward" not in vars(routing.em.blocks[0].mlp.module)


@pytest.mark.parametrize("hidden", [False, True])
def test_perplexity_scoring_chooses_widths_from_earlier_tokens_only(hidden):
    """Scored as generated: token t is predicted at the widths a request whose prompt is the first
    2**floor(log2 t) tokens runs at (per-chunk routing); a later token changes no width and no earlier score.
    On a hidden space at a budget routed at a smaller hidden size, the same."""
    routing = routed(seed=0 if hidden else 2, hidden=hidden)  # seeds under which the second half changes widths
    prompt_sensitive(routing.routers)
    fraction = 0.4 if hidden else 0.7
    em, lm = routing.em, AdaptiveLM(routing, fraction)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (1, 16), generator=g)
    other = torch.cat([ids[:, :8], torch.randint(0, 128, (1, 8), generator=g)], 1)  # the second half changed
    assert routing.start(fraction, ids) != routing.start(fraction, other)  # given them, the router reads those tokens
    if hidden:  # 40% is out of reach at the full hidden size
        assert em.axis.active < em.hidden_size
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
        widths = routing.attn_onehot.clone()  # the last chunk's, chosen from the first 8 tokens
        changed = lm(input_ids=other).logits
        assert torch.equal(routing.attn_onehot, widths)
        torch.testing.assert_close(changed[:, :8], logits[:, :8], atol=1e-5, rtol=1e-5)
        # The logits at t - 1 predict token t; the last ones (t = 16, past the window) are the last
        # chunk's, at the widths of its 8-token prompt.
        for t in range(1, 17):
            routing.start(fraction, ids[:, : min(2 ** (t.bit_length() - 1), 8)])
            ref = em(input_ids=ids[:, :t]).logits[:, -1]
            torch.testing.assert_close(logits[:, t - 1], ref, atol=1e-5, rtol=1e-5)
    assert len(lm.costs) == 2 and all(0 < c <= 1 for c in lm.costs)
    assert causal_chunks(16) == [(1, 1), (2, 3), (4, 7), (8, 16)] and causal_chunks(2) == [(1, 2)]
    for length in range(1, 40):  # every position's logits once, in order, each after its prompt
        chunks = causal_chunks(length)
        assert [p - 1 for p, _ in chunks] == [0] + [end for _, end in chunks[:-1]] and chunks[-1][1] == length


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_hidden_space_routes_each_grid_budget_at_its_static_sub_networks_hidden_size(kind):
    """The hidden size is fixed per budget, the static sub-network's there (the final norm reads that
    many channels), the full one again once detached; the token routers read the d channels as their
    first d input columns; the realised cost is the mean over tokens of each token's sub-network at d
    (the table's own pricing); a task's row runs at the widths its context chose."""
    routing = routed(kind, hidden=True)
    em, routers, table = routing.em, routing.routers, cost_table(routing.em, "params")
    seen = []
    em.model.get_submodule(em.family.final_norm).register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    ids = torch.randint(0, 128, (1, 12))
    sizes = []
    with torch.no_grad():
        for fraction in GRID:
            seen.clear()
            (attn,) = routing.start(fraction, ids)
            em(input_ids=ids)
            d = select_subnet(em, Budget(fraction=fraction)).hidden
            assert seen == [d or em.hidden_size]
            sizes.append(seen[0])
            mlp = [c.tolist() for c in routing.token_choices]
            tokens = [table(Subnet(mlp=[cs[mlp[i][t]] for i, cs in enumerate(em.space.mlp)], attn=attn, hidden=d))
                      for t in range(12)]
            assert routing.realised_fraction() == pytest.approx(sum(tokens) / 12 / table.full, rel=1e-6)
            x, b = torch.randn(5, seen[0]), routing._budget
            first = torch.nn.functional.linear(x, routers.token_in[1].weight[:, : seen[0]], routers.token_in[1].bias)
            ref = routers.token_out[1](torch.nn.functional.gelu(first + routers.token_budget(b).view(2, -1)[1]))
            torch.testing.assert_close(routers.token_logits(1, x, b), ref.masked_fill(~routers.mlp_mask[1], -torch.inf))
        assert min(sizes) < em.hidden_size
        context = ids[:, :5]
        lm = AdaptiveLM(routing, GRID[0])
        got = lm(input_ids=ids, prompt_lengths=[5]).logits
        routing.start(GRID[0], context)
        torch.testing.assert_close(got, em(input_ids=ids).logits)
        routing.detach()
        seen.clear()
        em(input_ids=ids)
    assert seen == [em.hidden_size]


def test_calibration_on_a_hidden_space_meets_each_budget_at_its_hidden_size():
    """Each grid budget's shift is calibrated at its hidden size: the routing then realises at most the
    budget, priced at that size (40% is out of reach at the full one)."""
    routing = routed(hidden=True, seed=1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with routing.attached():
        realised = calibrate(routing, ids)
        for fraction, got in zip(GRID, realised):
            assert got <= fraction
            lm = AdaptiveLM(routing, fraction)
            with torch.no_grad():
                lm(input_ids=ids, prompt_lengths=[16] * 4)
            assert lm.costs[-1] == pytest.approx(got)


def test_attached_routing_restores_the_static_sub_network_even_after_an_error():
    routing = routed()
    routing.detach()
    em, sub = routing.em, routing.em.space.uniform(1, 2)
    ids = torch.randint(0, 128, (1, 10))
    em.set_subnet(sub)
    with torch.no_grad():
        before = em(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="boom"), routing.attached():
        assert "forward" in vars(em.blocks[0].mlp.module) and em.current == em.space.full()
        routing.start(0.4, ids)
        raise RuntimeError("boom")
    assert "forward" not in vars(em.blocks[0].mlp.module) and em.current == sub
    with torch.no_grad():
        assert torch.equal(em(input_ids=ids).logits, before)


def test_report_compares_with_the_smallest_sub_network_where_tokens_skipped_below_it():
    from flextron.budgets import smallest_fraction
    from flextron.evaluate import adaptive_router_report
    from flextron.options import RouteOptions
    from flextron.routers import Routers, StaticRouter

    em = make_elastic("llama", n_layers=4, min_layers=2)  # the floor binds sub-networks, not tokens
    lowest = smallest_fraction(em, "params")
    grid = (lowest, 1.0)
    em.routers = Routers(StaticRouter(em.space, grid, hidden=16), "params", RouteOptions(budgets=grid, hidden=16))
    em.routers.adaptive = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, grid, hidden=16)
    with torch.no_grad():  # every token skips every MLP, every request every attention
        for lin in (*em.routers.adaptive.token_out, em.routers.adaptive.request[-1]):
            lin.weight.zero_()
            lin.bias.zero_()
        for lin in em.routers.adaptive.token_out:
            lin.bias[0] = 50.0
        em.routers.adaptive.request[-1].bias.view(len(em.blocks), -1)[:, 0] = 50.0
    (row,) = adaptive_router_report(em, torch.randint(0, 128, (2, 16)), [lowest], None, False)
    assert row.realised_fraction < lowest <= row.static_fraction_of_full + 1e-9 and row.static_ppl > 0


@pytest.mark.parametrize("attn_unit", ["group", "head"])
def test_adaptive_cli_route_eval_generate_and_errors(elastic_ckpt, tmp_path, capsys, attn_unit):
    from flextron.checkpoint import load_checkpoint
    from flextron.cli import main
    from helpers import make_model, make_tokenizer, word_text

    ckpt = elastic_ckpt(attn_unit=attn_unit)
    data = tmp_path / "data.txt"
    data.write_text(word_text(3000))
    common = ["--data", str(data), "--steps", "6", "--joint-steps", "1", "--seq-len", "16", "--micro-batch", "2",
              "--eval-limit", "1", "--budgets", "0.5,1.0", "--metric", "params", "--dtype", "fp32", "--device", "cpu"]
    assert main(["route", str(ckpt), "--adaptive", *common]) == 2  # static routers come first
    assert "no static routers" in capsys.readouterr().err
    assert main(["route", str(ckpt), *common]) == 0
    assert main(["eval", str(ckpt), "--adaptive", "--budgets", "0.5", "--limit", "1", "--seq-len", "32"]) == 2
    assert "no adaptive routers" in capsys.readouterr().err
    assert main(["route", str(ckpt), "--adaptive", *common]) == 0
    assert "Input-adaptive routing" in capsys.readouterr().out
    em, _, manifest = load_checkpoint(ckpt)
    assert em.routers.adaptive is not None and manifest["adaptive_routing"]["steps"] == 6
    assert em.attn_unit == attn_unit and em.blocks[0].head_units == (attn_unit == "head")
    original = tmp_path / "original"
    make_model("llama").save_pretrained(original)
    make_tokenizer().save_pretrained(original)
    assert main(["eval", str(ckpt), "--adaptive", "--budgets", "0.5,1.0", "--limit", "2", "--seq-len", "32",
                 "--tasks", "ppl,chat", "--chat-limit", "2", "--chat-tokens", "3", "--ppl-data", str(data),
                 "--original", str(original),
                 "--out", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [r["budget"] for r in rows] == [0.5, 1.0] and all(0 < r["realised_fraction"] <= 1 for r in rows)
    assert all(r["chat"]["n"] == 2 and r["ppl_data"] > 1 for r in rows)
    assert "adaptive, " in capsys.readouterr().out  # the chat table's size: the realised cost
    assert main(["generate", str(ckpt), "w3 w4 w5", "--budget", "0.5", "--adaptive", "--max-new-tokens", "4",
                 "--raw", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) >= 1


def test_depth_tokens_may_skip_an_mlp_and_a_request_an_attention():
    em = make_elastic("llama", n_layers=4, min_layers=1)
    torch.manual_seed(1)
    routers = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, GRID, hidden=16)
    with torch.no_grad():
        for lin in routers.token_out:
            lin.weight.mul_(30)
        routers.request[-1].weight.zero_()
        routers.request[-1].bias.zero_()
        routers.request[-1].bias.view(4, 5)[:, -1] = 1.0  # full attention everywhere...
        routers.request[-1].bias.view(4, 5)[0, 0] = 5.0  # ...but layer 0's is skipped
    routing = AdaptiveRouting(em, routers, cost_table(em, "params")).attach()
    ids = torch.randint(0, 128, (1, 12))
    assert routing.start(0.7, ids)[0][0] == 0
    x = torch.randn(1, 12, em.config.hidden_size)
    with torch.no_grad():  # move the skip logit of layer 1 so that about half of the tokens take it
        logits = routers.token_logits(1, x.view(12, -1), routing._budget)
        margin = logits[:, 1:].max(-1).values - logits[:, 0]
        routers.token_out[1].bias[0] += margin.median() + 1e-4
        got = em.blocks[1].mlp.module(x).view(12, -1)
    skip = routing.token_choices[1] == 0
    assert skip.any() and (~skip).any()
    assert torch.equal(got[skip], torch.zeros_like(got[skip])) and (got[~skip] != 0).any(-1).all()
    with torch.no_grad():  # cached decoding across the skipped attention equals recomputing the prefix
        out = em(input_ids=ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            steps.append(em(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True).logits)
        full = em(input_ids=ids, use_cache=False).logits
    # Each call routes its own tokens; a token's MLP width does not depend on the other tokens.
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
