import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flextron.cost import analytic_table, subnet_cost
from flextron.space import Subnet
from helpers import VOCAB, make_elastic

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
