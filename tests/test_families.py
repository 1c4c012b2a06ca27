"""The family matrix: every declared block layout against transformers' own model.

References come from transformers' modules only: a skipped sub-layer is the HF model with that
sub-layer's output set to zero by a forward hook (behind a sandwich or post-norm, the trailing norm
of zero is zero, so the branch adds nothing)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from flextron import api
from flextron.assets import load_hf
from flextron.checkpoint import load_checkpoint
from flextron.cli import main
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import FAMILIES, MODEL_TYPES, detect_family
from flextron.importance import measure_importance, sort_by_importance
from flextron.space import Subnet
from helpers import (
    FAMILY_KINDS,
    LLAMA_KINDS,
    NEW_KINDS,
    VOCAB,
    hf_logits,
    make_elastic,
    make_model,
    make_tokenizer,
    scale_output,
    word_text,
)

DECLARED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "granite": "llama",
            "smollm3": "llama", "gemma2": "gemma", "gemma3": "gemma", "olmo2": "olmo2", "phi3": "phi3",
            "gpt2": "gpt2"}
# transformers' names: per kind, the decoder layers, each layer's attention and MLP, and the module whose
# output each branch adds to the residual stream (the trailing norm of sandwich and post-norm blocks).
LAYERS = {"gpt2": "transformer.h"}
SUBLAYERS = {"gpt2": ("attn", "mlp")}
BRANCH_OUT = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}


def hf_layer(model, kind: str, i: int):
    return model.get_submodule(LAYERS.get(kind, "model.layers"))[i]


def hf_sublayer(model, kind: str, i: int, which: str):
    return getattr(hf_layer(model, kind, i), SUBLAYERS.get(kind, ("self_attn", "mlp"))[which == "mlp"])


def test_every_declared_kind_gets_its_family():
    for kind, family in DECLARED.items():
        assert detect_family(make_model(kind)) is FAMILIES[family], kind
    assert set(DECLARED) == set(FAMILY_KINDS)


@pytest.mark.parametrize("unit", ["group", "head"])
@pytest.mark.parametrize("which", ["attn", "mlp"])
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_a_skipped_sub_layer_equals_transformers_with_its_output_zeroed(kind, which, unit):
    if unit == "head" and kind == "gpt2":
        pytest.skip("multi-head attention: head units equal group units")
    em, ref = make_elastic(kind, n_layers=3, min_layers=1, attn_unit=unit), make_model(kind, 0, 3)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(em(input_ids=x, use_cache=False).logits, hf_logits(ref, x))
        sub = em.space.full()
        getattr(sub, which)[1] = 0
        with em.subnet(sub):
            got = em(input_ids=x, use_cache=False).logits
    want = hf_logits(ref, x, [(hf_sublayer(ref, kind, 1, which), scale_output(0.0))])
    assert (got - want).abs().max() < 1e-5
    assert (got - hf_logits(ref, x)).abs().max() > 1e-3  # the skip does change the model


@pytest.mark.parametrize("kind", ["gemma3", "olmo2", "llama"])
def test_a_soft_skip_weight_scales_what_the_branch_adds(kind):
    """Router training mixes "skip" with a width: the branch adds (1 - w_skip) times its output, behind
    the post-norm where there is one (a norm would undo a scale of its input)."""
    em, ref = make_elastic(kind, n_layers=3, min_layers=1), make_model(kind, 0, 3)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))

    def weights(choices, layer_weight):
        return [layer_weight if i == 1 else F.one_hot(torch.tensor(len(c) - 1), len(c)).float()
                for i, c in enumerate(choices)]

    k = len(em.space.mlp[1])
    mix = torch.zeros(k)
    mix[0], mix[-1] = 0.7, 0.3  # 70 % skip, 30 % full width
    em.set_soft(weights(em.space.mlp, mix), weights(em.space.attn, F.one_hot(torch.tensor(len(em.space.attn[1]) - 1),
                                                                             len(em.space.attn[1])).float()))
    with torch.no_grad():
        got = em(input_ids=x, use_cache=False).logits
    out = BRANCH_OUT.get(kind, (None, None))[1]
    branch = getattr(hf_layer(ref, kind, 1), out) if out else hf_sublayer(ref, kind, 1, "mlp")
    assert (got - hf_logits(ref, x, [(branch, scale_output(0.3))])).abs().max() < 1e-5


@pytest.mark.parametrize("unit", ["group", "head"])
@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_importance_permutation_keeps_transformers_function(kind, unit):
    em, ref = make_elastic(kind, n_layers=3, min_layers=1, attn_unit=unit), make_model(kind, 0, 3)
    x = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    imp = sort_by_importance(em, measure_importance(em, x, batch_size=2, progress=False))
    assert all(torch.all(s[:-1] >= s[1:]) for s in imp.mlp + (imp.attn if unit == "group" else []))
    with torch.no_grad():
        assert (em(input_ids=x, use_cache=False).logits - hf_logits(ref, x)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["gemma3", "olmo2", "phi3", "llama"])
def test_block_importance_reads_the_residual_stream_and_what_the_branch_adds(kind):
    """Per layer and branch: mean over tokens of 1 - cos(x, x + f), x the stream entering the branch and f
    what it adds, both read from transformers' model (f of the attention: the layer's output with its MLP
    zeroed, minus the layer's input)."""
    em, ref = make_elastic(kind, n_layers=3, min_layers=1), make_model(kind, 0, 3)
    x = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    scores = measure_importance(em, x, batch_size=2, progress=False).layers
    seen = {}
    for i in range(3):
        layer = hf_layer(ref, kind, i)
        grab = layer.register_forward_hook(
            lambda m, args, kwargs, out: seen.update(h_in=args[0] if args else kwargs["hidden_states"],
                                                     h_out=out[0] if isinstance(out, tuple) else out),
            with_kwargs=True)
        hf_logits(ref, x)
        h_in, h_out = seen["h_in"], seen["h_out"]
        hf_logits(ref, x, [(hf_sublayer(ref, kind, i, "mlp"), scale_output(0.0))])
        h_mid = seen["h_out"]
        grab.remove()
        for kind_, (a, b) in {"attn": (h_in, h_mid), "mlp": (h_mid, h_out)}.items():
            want = (1 - F.cosine_similarity(a, b, dim=-1)).mean().item()
            assert scores[kind_][i] == pytest.approx(want, rel=1e-3, abs=1e-6), (kind_, i)


def test_unknown_model_type_is_refused_in_one_line_naming_the_supported_ones():
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(FlextronError) as err:
        detect_family(opt)
    msg = str(err.value)
    assert "unsupported model OPTForCausalLM (model_type 'opt')" in msg and "--family" in msg
    assert all(t in msg for t in MODEL_TYPES) and "\n" not in msg


def test_a_forced_family_must_have_its_modules():
    with pytest.raises(FlextronError, match="does not have the olmo2 family's layout: it lacks model.layers"):
        detect_family(make_model("gpt2"), "olmo2")
    with pytest.raises(FlextronError, match="unknown family 'bert'"):
        detect_family(make_model("llama"), "bert")
    # A Gemma 3 forced to be "llama" is accepted by its modules (the numerical check in convert refuses it).
    assert detect_family(make_model("gemma3"), "llama") is FAMILIES["llama"]


def test_unrelated_module_is_refused():
    with pytest.raises(FlextronError, match="unsupported model Linear"):
        detect_family(torch.nn.Linear(2, 2))


def test_geometry_of_gqa_mha_and_fused_qkv():
    for kind, want in (("llama", (8, 4, 8, 2)), ("phi3", (8, 4, 8, 2)), ("gpt2", (4, 4, 16, 1))):
        g = ElasticModel(make_model(kind)).blocks[0].geometry
        assert (g.n_heads, g.n_kv_heads, g.head_dim, g.heads_per_unit) == want, kind


def test_phi3_fused_projections_are_cut_block_by_block():
    em = make_elastic("phi3", attn_unit="head")
    sub = Subnet(mlp=[24, 48], attn=[2, 4])
    with em.subnet(sub):
        qkv = em.blocks[0].attn.outs[0]
        gate_up = em.blocks[0].mlp.outs[0]
        # 2 query heads (head 0 of groups 0 and 1), 2 KV heads, 2 value heads of 8; gate and up 24 each.
        assert qkv.take(qkv.weight, 0).shape[0] == 6 * 8 and gate_up.take(gate_up.weight, 0).shape[0] == 48
        assert em.blocks[0].attn.module.config.num_attention_heads == 2
    assert em.blocks[0].attn.module.config.num_attention_heads == 8


@pytest.fixture
def saved(tmp_path):
    """save(kind) -> a tiny HF directory of that kind (3 layers, word-level tokenizer) and a text file."""
    text = tmp_path / "text.txt"
    text.write_text(word_text(3000))

    def save(kind: str, model_type: str | None = None):
        d = tmp_path / kind
        make_model(kind, 0, 3).save_pretrained(d)
        make_tokenizer().save_pretrained(d)
        if model_type is not None:  # a model type transformers knows and flextron does not declare
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
        return d

    return save, text


def convert_args(model_dir, out, text, *extra) -> list[str]:
    return ["convert", str(model_dir), "--out", str(out), "--calib-data", str(text), "--calib-sequences", "4",
            "--calib-seq-len", "16", "--multiple", "8", "--device", "cpu", *extra]


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_every_family_runs_the_pipeline_end_to_end(kind, saved, tmp_path):
    """convert (importance, depth, query-head units), train, route (static and adaptive), eval, per-layer
    export that reloads as the routed sub-network, and generation."""
    save, text = saved
    ckpt, run = tmp_path / "ck", tmp_path / "run"
    assert main(convert_args(save(kind), ckpt, text, "--depth", "--attn-unit", "head")) == 0
    assert json.loads((ckpt / "flextron.json").read_text())["family"] == DECLARED[kind]
    assert main(["train", str(ckpt), "--out", str(run), "--max-steps", "1", "--seq-len", "16", "--micro-batch", "2",
                 "--eval-limit", "0", "--dtype", "fp32", "--no-activation-checkpointing", "--data", str(text),
                 "--device", "cpu"]) == 0
    final = run / "checkpoints" / "step-0000001"
    common = ["--data", str(text), "--steps", "4", "--joint-steps", "1", "--seq-len", "16", "--micro-batch", "2",
              "--eval-limit", "1", "--budgets", "0.6,1.0", "--metric", "params", "--dtype", "fp32", "--device", "cpu"]
    assert main(["route", str(final), *common]) == 0
    assert main(["route", str(final), "--adaptive", *common]) == 0
    assert main(["eval", str(final), "--budgets", "1.0,0.6", "--limit", "1", "--seq-len", "16",
                 "--out", str(tmp_path / "ev.json")]) == 0
    assert main(["eval", str(final), "--adaptive", "--budgets", "0.6", "--limit", "1", "--seq-len", "16"]) == 0
    em, _, _ = load_checkpoint(final)
    sub = em.space.smallest()
    api.export(final, None, tmp_path / "e", subnet=sub.to_dict())
    exported, _, _ = load_hf(str(tmp_path / "e"))
    x = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad(), em.subnet(sub):
        assert (exported(input_ids=x).logits - em(input_ids=x).logits).abs().max() < 1e-4
    assert api.generate(final, "w3 w4", budget="0.6", max_new_tokens=3, raw=True, device="cpu") is not None


def test_a_forced_family_is_checked_against_transformers_before_anything_is_written(saved, tmp_path, capsys):
    save, text = saved
    gemma = save("gemma3")
    # Gemma 1 is not declared: refused in one line that names --family; forced as llama (its pre-norm block), it runs.
    gemma1 = save("llama", model_type="gemma")
    assert main(convert_args(gemma1, tmp_path / "g1", text)) == 2
    assert "unsupported model" in capsys.readouterr().err and not (tmp_path / "g1").exists()
    assert main(convert_args(gemma1, tmp_path / "g1", text, "--family", "llama", "--depth")) == 0
    assert json.loads((tmp_path / "g1" / "flextron.json").read_text())["family"] == "llama"
    capsys.readouterr()
    # Gemma 3 forced into the pre-norm block: the MLP skip disagrees with transformers, nothing is written.
    assert main(convert_args(gemma, tmp_path / "wrong", text, "--family", "llama")) == 2
    err = capsys.readouterr().err
    assert "does not compute this Gemma3ForCausalLM: MLP skip" in err and err.count("\n") == 1
    assert not (tmp_path / "wrong").exists()
