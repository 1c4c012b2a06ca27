"""The CUDA subset (`pytest -m cuda`, run by benchmarks/gpu.py); skipped where no GPU is."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from flextron import api
from flextron.elastic import ElasticModel
from flextron.options import TrainOptions
from flextron.train.losses import chunked_distill_loss, kd_loss
from helpers import make_model, make_tokenizer, word_text

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_convert_in_bf16_on_cuda_holds_no_fp32_copy(tmp_path):
    # Weights of ~270 MB in fp32: large enough that an fp32 copy would dwarf cuBLAS's workspace (~32 MB),
    # which alone exceeded a tiny model's fp32 bytes on an H200.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    (tmp_path / "calib.txt").write_text(word_text(3000))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    torch.cuda.reset_peak_memory_stats()
    ckpt = api.convert(str(tmp_path / "hf"), tmp_path / "ckpt", device="cuda", dtype="bf16", multiple=8,
                       calib_sequences=4, calib_seq_len=32, calib_data=str(tmp_path / "calib.txt"),
                       progress=False)
    assert torch.cuda.max_memory_allocated() < fp32_bytes
    assert all(t.dtype == torch.bfloat16 for t in load_file(ckpt / "model.safetensors").values())


def test_chunked_loss_matches_full_logits_under_bf16_autocast():
    em = ElasticModel(make_model("llama", seed=0)).cuda()
    teacher = ElasticModel(make_model("llama", seed=1)).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
            t_hidden = teacher(input_ids=ids, head=lambda h, out: h)
        logits = em(input_ids=ids).logits
        full = kd_loss(logits, t_logits) + 0.5 * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                                 ids[:, 1:].flatten())
        head = teacher.model.get_output_embeddings()
        loss, _, _ = em(input_ids=ids, head=lambda h, out: chunked_distill_loss(h, t_hidden, ids, out, head, 1.0, 0.5,
                                                                                chunk=48))
    assert torch.allclose(loss, full, rtol=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in em.parameters() if p.grad is not None)


def test_training_steps_on_cuda_with_a_bf16_teacher(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    data = tmp_path / "data.txt"
    data.write_text(word_text(4000))
    calib = {"calib_sequences": 4, "calib_seq_len": 32, "calib_data": str(data)}
    ckpt = api.convert(str(tmp_path / "hf"), tmp_path / "ckpt", device="cuda", multiple=8, **calib,
                       progress=False)
    cfg = TrainOptions(max_steps=2, seq_len=32, micro_batch=2, warmup_steps=1, eval_limit=0)  # bf16 autocast
    summary = api.train(ckpt, tmp_path / "run", cfg, [str(data)], device="cuda", progress=False)
    assert summary["steps"] == 2
