"""Real model shapes with random weights: a Llama-3.2-1B-shaped model cut to 2 layers and a
Qwen2.5-0.5B-shaped one, through convert -> 2 training steps (AdamW, in a subprocess whose peak
RSS is checked against a bound counted from the shapes) -> export."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flextron import api
from flextron.elastic import ElasticModel
from flextron.options import TrainOptions
from flextron.train.memory import GIB, estimate_memory
from helpers import make_tokenizer, word_text

SHAPES = {
    "llama-3.2-1b": (LlamaForCausalLM, LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                   num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                                                   head_dim=64, tie_word_embeddings=True, max_position_embeddings=256)),
    # Qwen2.5-0.5B's sizes on the Llama classes: transformers 5 gives a qwen2 directory the Qwen2 BPE
    # tokenizer class, which the tests' word-level tokenizer is not.
    "qwen2.5-0.5b": (LlamaForCausalLM, LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                                   num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                                                   head_dim=64, tie_word_embeddings=True, max_position_embeddings=256)),
}
ARGS = dict(max_steps=2, seq_len=32, micro_batch=1, n_random=0, warmup_steps=1, eval_limit=0, save_every=2,
            dtype="fp32", teacher_dtype="bf16", lr=1e-4)
# One training step in a subprocess; prints its peak RSS.
_STEP = """
import json, sys
from flextron import api
from flextron.options import TrainOptions
from flextron.train.memory import peak_rss_bytes
api.train(sys.argv[1], sys.argv[2], TrainOptions(**json.loads(sys.argv[3])), [sys.argv[4]], device="cpu",
          progress=False)
print(peak_rss_bytes())
"""


@pytest.mark.scale
@pytest.mark.parametrize("name", SHAPES)
def test_real_shape_convert_train_export(name, tmp_path):
    cls, config = SHAPES[name]
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    data = tmp_path / "data.txt"
    data.write_text(word_text(3000))
    bound = estimate_memory(ElasticModel(model), TrainOptions(**ARGS), teacher_bytes=2, autocast_bytes=4)
    weights = bound.weights
    del model
    ckpt = api.convert(str(tmp_path / "hf"), tmp_path / "ckpt", device="cpu", progress=False,
                       calib_sequences=4, calib_seq_len=32, calib_data=str(data))
    run = subprocess.run([sys.executable, "-c", _STEP, str(ckpt), str(tmp_path / "run"), json.dumps(ARGS), str(data)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    # The estimate, plus a checkpoint's gathered copy of the weights and ~1.5 GiB of Python, torch, transformers.
    print(f"{name}: peak RSS of training {peak / GIB:.2f} GiB; {bound.summary()}")
    assert peak < bound.total + weights + 1.5 * GIB, (peak / GIB, bound.summary())

    final = tmp_path / "run" / "checkpoints" / "step-0000002"
    out = api.export(final, "0.5", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.vocab_size == config.vocab_size
    assert sum(p.numel() for p in exported.parameters()) < weights // 4  # fewer parameters than the full model
    ids = torch.randint(0, 128, (1, 16))
    assert torch.isfinite(exported(input_ids=ids).logits).all()
