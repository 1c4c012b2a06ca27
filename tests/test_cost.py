import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flextron.cost import ANALYTIC, MB, analytic_table, memory_parts, subnet_cost
from flextron.footprint import Deployment, compute_bytes, kv_bytes
from flextron.latency_table import LatencyTable
from flextron.space import Subnet
from helpers import VOCAB, make_elastic, two_graph_table

H, HEAD_DIM, REP = 64, 8, 2  # tiny Llama-like: 8 query heads in 4 KV groups


def llama_layer(w: int, a: int, bias: bool) -> int:
    q = o = a * REP * HEAD_DIM
    kv = a * HEAD_DIM
    attn = H * (q + 2 * kv) + o * H + ((q + 2 * kv) if bias else 0)
    return attn + 3 * H * w + 2 * H  # gate, up, down + two RMSNorms


@pytest.mark.parametrize("kind,bias", [("llama", False), ("qwen2", True)])
def test_params_of_heterogeneous_subnet_equal_hand_count(kind, bias):
    em = make_elastic(kind)
    sub = Subnet(mlp=[24, 72], attn=[1, 3])
    cost = subnet_cost(em, sub, context=100)
    embed = VOCAB * H
    head = 0 if em.config.tie_word_embeddings else VOCAB * H
    layers = llama_layer(24, 1, bias) + llama_layer(72, 3, bias)
    assert cost.params == embed + head + H + layers
    assert cost.params_nonembed == layers + H
    weights = sum(H * (a * REP * HEAD_DIM * 2 + 2 * a * HEAD_DIM) + 3 * H * w for w, a in ((24, 1), (72, 3)))
    attn = 4 * HEAD_DIM * REP * (1 + 3) * 100
    assert cost.flops_per_token == 2 * (weights + VOCAB * H) + attn
    assert cost.kv_bytes_per_token == 2 * (1 + 3) * HEAD_DIM * 2


@pytest.mark.parametrize("cls,cfg_cls,kind", [(LlamaForCausalLM, LlamaConfig, "llama"),
                                               (Qwen2ForCausalLM, Qwen2Config, "qwen2")])
def test_uniform_subnet_params_equal_a_standalone_model(cls, cfg_cls, kind):
    em = make_elastic(kind)
    for w, a in ((24, 1), (48, 2), (96, 4)):
        cfg = em.config.to_dict() | {"intermediate_size": w, "num_attention_heads": a * REP, "num_key_value_heads": a}
        standalone = cls(cfg_cls(**cfg))
        sub = Subnet(mlp=[w, w], attn=[a, a])
        assert subnet_cost(em, sub).params == sum(p.numel() for p in standalone.parameters())


def test_gpt2_params_equal_hand_count():
    em = make_elastic("gpt2")
    w, a = 128, 2  # 4 heads of 16 in the tiny GPT-2
    hd = 16
    cost = subnet_cost(em, Subnet(mlp=[w, w], attn=[a, a]))
    layer = (H * 3 * a * hd + 3 * a * hd) + (a * hd * H + H) + (H * w + w) + (w * H + H) + 4 * H
    embed = VOCAB * H + 256 * H  # token and position embeddings; lm_head is tied
    assert cost.params == embed + 2 * layer + 2 * H
    assert cost.params_nonembed == 2 * layer + 2 * H


def test_skipped_sub_layers_cost_nothing_by_hand_count():
    em = make_elastic("qwen2", n_layers=3, min_layers=1)  # q/k/v biases
    sub = Subnet(mlp=[24, 0, 0], attn=[0, 3, 0])  # layer 2 skipped whole
    cost = subnet_cost(em, sub, context=100)
    attn_only = llama_layer(0, 3, True) - 2 * H  # no MLP weights at width 0; norms stay in the count
    mlp_only = llama_layer(24, 0, True) - 2 * H
    norms = 2 * H + H  # the norms of the two sub-layers that run, and the final norm
    assert cost.params_nonembed == attn_only + mlp_only + norms
    weights = H * (3 * REP * HEAD_DIM * 2 + 2 * 3 * HEAD_DIM) + 3 * H * 24
    assert cost.flops_per_token == 2 * (weights + VOCAB * H) + 4 * HEAD_DIM * REP * 3 * 100
    assert cost.kv_bytes_per_token == 2 * 3 * HEAD_DIM * 2  # skipped attention layers keep no KV cache
    assert cost.decode_bytes_per_token == 2 * (weights + 3 * REP * HEAD_DIM + 2 * 3 * HEAD_DIM + norms
                                               + VOCAB * H)


def test_a_table_knows_the_full_and_smallest_costs_of_its_space():
    em = make_elastic("llama", n_layers=4, min_layers=2)
    table = analytic_table(em, "params")
    assert table.space == em.space
    assert table.full == subnet_cost(em).params_nonembed == table(em.space.full())
    assert table.smallest == subnet_cost(em, em.space.smallest()).params_nonembed < table.full


@pytest.mark.parametrize("kind,bias", [("llama", False), ("qwen2", True)])
def test_query_head_choices_cost_their_heads_and_groups_by_hand_count(kind, bias):
    em = make_elastic(kind, attn_unit="head")
    sub = Subnet(mlp=[24, 72], attn=[2, 4])  # 2 groups of one head; 4 groups of one head

    def layer(w: int, heads: int, groups: int) -> int:
        q = o = heads * HEAD_DIM
        kv = groups * HEAD_DIM
        return H * (q + 2 * kv) + o * H + ((q + 2 * kv) if bias else 0) + 3 * H * w + 2 * H

    cost = subnet_cost(em, sub, context=100)
    assert cost.params_nonembed == layer(24, 2, 2) + layer(72, 4, 4) + H
    assert cost.kv_bytes_per_token == 2 * (2 + 4) * HEAD_DIM * 2
    weights = sum(H * (heads * HEAD_DIM * 2 + 2 * groups * HEAD_DIM) + 3 * H * w
                  for w, heads, groups in ((24, 2, 2), (72, 4, 4)))
    assert cost.flops_per_token == 2 * (weights + VOCAB * H) + 4 * HEAD_DIM * (2 + 4) * 100
    # Same query heads as the group choice 2 (4 heads), half the KV cache: one head per group.
    cfg = em.config.to_dict() | {"intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4}
    standalone = (LlamaForCausalLM(LlamaConfig(**cfg)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**cfg)))
    assert subnet_cost(em, Subnet(mlp=[48, 48], attn=[4, 4])).params == sum(
        p.numel() for p in standalone.parameters())


def with_hidden(em):
    """`em` with hidden sizes 32, 48 and 64 (of 64)."""
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    return em


def test_hidden_subnet_params_equal_the_stock_model_of_that_hidden_size(kind):
    """A uniform sub-network at hidden size d is the stock model with `hidden_size=d`: its parameter
    count, embeddings and LM head (tied or not, as the source) included, and GPT-2's position embeddings."""
    em = with_hidden(make_elastic(kind))
    table = analytic_table(em, "params")
    for d, w, a in ((32, 24, 2), (48, 72, 3), (32, 96, 1), (64, 48, 2)):
        if kind == "gpt2":  # head size = n_embd / n_head: 16 channels a head
            w, a = 8 * w // 3, d // 16
            change = {"n_embd": d, "n_inner": w, "n_head": a}
        else:
            change = {"hidden_size": d, "head_dim": HEAD_DIM, "intermediate_size": w,
                      "num_attention_heads": a * REP, "num_key_value_heads": a}
        stock = type(em.model)(type(em.config)(**em.config.to_dict() | change))
        sub = Subnet(mlp=[w, w], attn=[a, a], hidden=em.space.hidden_at(em.space.hidden.index(d)))
        expected = sum(p.numel() for p in stock.parameters())
        # The params metric of a space with hidden sizes counts the embeddings: a budget sees them shrink.
        assert subnet_cost(em, sub).params == table(sub) == expected
        embeddings = {id(p): p for m in stock.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        embeddings[id(stock.lm_head.weight)] = stock.lm_head.weight
        assert subnet_cost(em, sub).params_nonembed == expected - sum(p.numel() for p in embeddings.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_flops_and_decode_bytes_at_a_hidden_size_by_hand_count(kind):
    """At hidden size d every projection reads or writes d channels, the norms keep d weights and the LM
    head d columns (its 2 V d FLOPs and V d weights read per token); the embeddings are not read, and
    attention over the context and the KV cache do not change with d."""
    em = with_hidden(make_elastic(kind))
    d, ctx = 32, 100
    if kind == "llama":
        sub, hd, rep = Subnet(mlp=[24, 72], attn=[1, 3], hidden=d), HEAD_DIM, REP
        weights = sum(d * (a * rep * hd * 2 + 2 * a * hd) + 3 * d * w for w, a in ((24, 1), (72, 3)))
        small = 2 * 2 * d + d  # two RMSNorms a layer and the final one
        embeddings = 2 * VOCAB * d  # untied
    else:  # GPT-2: 16-channel heads, fused c_attn, biases, LayerNorms with biases, tied head, position embeddings
        sub, hd, rep = Subnet(mlp=[64, 192], attn=[1, 3], hidden=d), 16, 1
        weights = sum(d * 3 * a * hd + a * hd * d + 2 * d * w for w, a in ((64, 1), (192, 3)))
        small = sum(3 * a * hd + d + w + d for w, a in ((64, 1), (192, 3))) + 2 * (2 * 2 * d) + 2 * d
        embeddings = VOCAB * d + 256 * d
    cost = subnet_cost(em, sub, context=ctx)
    assert cost.flops_per_token == 2 * (weights + VOCAB * d) + 4 * hd * rep * (1 + 3) * ctx
    assert cost.decode_bytes_per_token == 2 * (weights + small + VOCAB * d)
    assert cost.kv_bytes_per_token == 2 * (1 + 3) * hd * 2
    assert cost.params_nonembed == weights + small
    assert cost.params == weights + small + embeddings == analytic_table(em, "params")(sub)


def test_a_space_without_hidden_sizes_prices_as_before_and_the_full_hidden_size_alike():
    """A table's hidden sizes are one table each, the full one's terms its own. At the full hidden size
    a space with hidden sizes prices every metric as the space without (params: the embeddings added)."""
    em = make_elastic("qwen2")
    old = {m: analytic_table(em, m) for m in ANALYTIC}
    with_hidden(em)
    embeddings = subnet_cost(em).params - subnet_cost(em).params_nonembed
    for m in ANALYTIC:
        assert old[m].by_hidden == () and old[m].at_hidden(0) is old[m]
        const, mlp, attn = old[m].hidden_tensors()
        assert const.tolist() == [old[m].const] and torch.equal(mlp[0], old[m].tensors()[0])
        new = analytic_table(em, m)
        full = new.at_hidden(2)
        assert (full.mlp, full.attn) == (new.mlp, new.attn) == (old[m].mlp, old[m].attn)
        assert full.const == new.const == old[m].const + (embeddings if m == "params" else 0)
        const, mlp, attn = new.hidden_tensors()
        assert mlp.shape == (3, 2, 4) and const.tolist() == [new.at_hidden(i).const for i in range(3)]
        assert all(torch.equal(attn[i], new.at_hidden(i).tensors()[1]) for i in range(3))
        # Nothing grows as the hidden size shrinks; the KV cache alone stays as it is.
        assert (const.diff() >= 0).all() and (mlp.diff(dim=0) >= 0).all() and (attn.diff(dim=0) >= 0).all()
        assert (m == "kv_bytes") == bool((attn[0] == attn[2]).all())
    assert new.smallest == new(em.space.smallest()) == new.at_hidden(0)(dataclasses.replace(
        em.space.smallest(), hidden=None))


def test_f32_memory_is_four_bytes_a_parameter_plus_kv_cache_and_buffers(kind):
    """At f32 every tensor llama.cpp holds is 4 bytes a value: the memory of a sub-network is 4 x all its
    parameters (embeddings included, at its hidden size) beside its KV cache and buffers."""
    em = make_elastic(kind, hidden=kind != "gpt2")
    deployment = Deployment("f32", 1000, 2)
    memory = analytic_table(em, "memory_mb", deployment=deployment)
    subnets = [em.space.full(), em.space.uniform(1, 2), Subnet(mlp=[em.space.mlp[0][0], em.space.mlp[1][2]],
                                                                attn=[1, 3])]
    subnets += [dataclasses.replace(s, hidden=h) for s in subnets for h in (em.space.hidden or [])[:-1]]
    for sub in subnets:
        kv = sum(kv_bytes(b.attn_heads(a)[1], b.geometry.head_dim, deployment) for b, a in zip(em.blocks, sub.attn))
        everything = subnet_cost(em, sub).params
        assert memory(sub) * MB == pytest.approx(4 * everything + kv + compute_bytes(em, sub.hidden, deployment))
    # 2 x 1024 cells (1000 padded to 256) of keys and values, f16, of each KV head kept.
    assert kv_bytes(3, 8, deployment) == 2 * 2 * 1024 * 3 * 8 * 2


def test_memory_follows_the_weight_type_and_the_model_deployment():
    em = make_elastic("llama")
    sub = Subnet(mlp=[24, 72], attn=[1, 3])
    f32, q8 = (analytic_table(em, "memory_mb", deployment=Deployment(t, 512))(sub) for t in ("f32", "q8_0"))
    assert q8 < f32
    em.deployment = Deployment("q8_0", 512)
    assert analytic_table(em, "memory_mb")(sub) == q8 and subnet_cost(em, sub).memory_bytes == round(q8 * MB)
    longer = analytic_table(em, "memory_mb", deployment=Deployment("q8_0", 1024))(sub)
    assert (longer - q8) * MB >= 512 * 2 * 2 * (1 + 3) * 8  # the KV cache of 512 more cells, at least


def test_memory_parts_split_the_table_into_the_gguf_tensors_its_kv_heads_and_buffers(tmp_path):
    """Weights: the bytes of the tensors of the GGUF the sub-network is written as (what llama.cpp loads);
    KV cache: keys and values of the KV heads its layers hold, one stand-in group in a skipped first
    attention included (deci); the rest the buffers. Together the table's total."""
    import gguf

    from flextron.gguf import write_gguf
    from helpers import make_bpe_tokenizer

    em = make_elastic("llama", min_layers=1)
    deployment = Deployment("q8_0", 1000, 2)
    for sub in (em.space.full(), Subnet(mlp=[96, 48], attn=[0, 2])):
        parts = memory_parts(em, sub, deployment)
        reader = gguf.GGUFReader(write_gguf(em, make_bpe_tokenizer(), sub, tmp_path / "m.gguf", "q8_0",
                                            overwrite=True)["path"])
        arch = reader.fields["general.architecture"].contents()
        kv_heads = reader.fields[f"{arch}.attention.head_count_kv"].contents()
        assert parts["weights"] == sum(int(t.n_bytes) for t in reader.tensors)
        assert parts["kv"] == 2 * 2048 * sum(kv_heads if isinstance(kv_heads, list) else [kv_heads] * 2) * 8 * 2
        assert parts["buffers"] == compute_bytes(em, None, deployment)
        assert sum(parts[k] for k in ("weights", "kv", "buffers")) == parts["total"]
        assert parts["total"] == round(analytic_table(em, "memory_mb", deployment=deployment)(sub) * MB)


def test_a_measured_table_prices_a_hidden_size_in_proportion_until_one_is_timed():
    """A table profiled without hidden sizes, on a space that has them: at d every term is the full size's
    times d / D, in the graph a sub-network runs in (llama.cpp: a uniform one in the family's own)."""
    em = make_elastic()
    data = two_graph_table(em)[0].to_dict()
    with_hidden(em)
    em.latency = LatencyTable(data, em)
    for metric in ("latency_ms", "prefill_ms"):
        table = em.latency.table(metric)
        for sub in (em.space.full(), em.space.smallest(), Subnet(mlp=[96, 48], attn=[4, 2]),
                    Subnet(mlp=[24, 24], attn=[1, 1])):
            at_full = table(dataclasses.replace(sub, hidden=None))
            for i, d in enumerate(em.space.hidden):
                hidden = dataclasses.replace(sub, hidden=em.space.hidden_at(i))
                assert table(hidden) == pytest.approx(at_full * d / 64)
                assert table.at_hidden(i)(hidden) == table(hidden)
        small = Subnet(mlp=[24, 24], attn=[1, 1], hidden=32)  # uniform: the stock graph's fit prices it
        assert em.latency.runs_in_stock(small)
        at_full = table.stock(dataclasses.replace(small, hidden=None))
        assert table(small) == table.at_hidden(0)(small) == pytest.approx(at_full / 2)
        assert table(small) != dataclasses.replace(table, stock=None)(small)
