import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from conftest import make_model
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import FAMILIES, SUPPORTED_CLASSES, detect_family


@pytest.mark.parametrize("kind,family", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "llama"),
                                         ("qwen3", "llama"), ("gpt2", "gpt2")])
def test_detect_by_layout(kind, family):
    assert detect_family(make_model(kind)) is FAMILIES[family]


def test_geometry_of_gqa_and_mha():
    llama = ElasticModel(make_model("llama")).blocks[0].geometry
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim, llama.heads_per_unit) == (8, 4, 8, 2)
    gpt2 = ElasticModel(make_model("gpt2")).blocks[0].geometry
    assert (gpt2.n_heads, gpt2.n_kv_heads, gpt2.head_dim) == (4, 4, 16)


def test_unsupported_layout_names_what_is_missing_and_what_is_supported():
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(FlextronError) as err:
        detect_family(opt)
    msg = str(err.value)
    assert "unsupported architecture OPTForCausalLM" in msg and "missing" in msg
    for cls in SUPPORTED_CLASSES:
        assert cls in msg
    assert "\n" not in msg


def test_unrelated_module_is_refused():
    with pytest.raises(FlextronError, match="unsupported architecture Linear"):
        detect_family(torch.nn.Linear(2, 2))
