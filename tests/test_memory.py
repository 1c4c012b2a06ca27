import subprocess
import sys

from flextron.elastic import ElasticModel
from flextron.options import TrainOptions
from flextron.train.memory import estimate_memory, peak_rss_bytes
from helpers import make_model


def test_memory_estimate_against_a_hand_count():
    em = ElasticModel(make_model("llama"))  # vocab 128, hidden 64, MLP 96, 2 layers, 8 q / 4 KV heads of 8
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64  # q, k, v, o, gate/up/down, two norms
    params = 2 * 128 * 64 + 2 * layer + 64  # untied embeddings and output layer, final norm
    cfg = TrainOptions(max_steps=1, seq_len=32, micro_batch=2, loss_chunk=16)
    est = estimate_memory(em, cfg, world=1, teacher_bytes=2, autocast_bytes=2)
    assert (est.weights, est.grads, est.optimizer, est.teacher) == (4 * params, 4 * params, 8 * params, 2 * params)
    assert est.activations == 64 * 2 * 2 * (8 * 64 + 3 * 96) + 2 * 64 * 64 * 4
    assert est.loss == 6 * 16 * 128 * 4 + 128 * 64 * 4
    assert est.total == sum((est.weights, est.grads, est.optimizer, est.teacher, est.activations, est.loss))

    fsdp = estimate_memory(em, TrainOptions(max_steps=1, seq_len=32, micro_batch=2, loss_chunk=16, fsdp=True,
                                            activation_checkpointing=True), world=2, teacher_bytes=2)
    assert (fsdp.weights, fsdp.optimizer) == (4 * params // 2, 8 * params // 2)
    assert fsdp.teacher == 2 * (layer + (params - 2 * layer))  # blocks sharded, the rest whole
    assert fsdp.activations == 64 * 2 * 4 * 64 + 2 * 64 * 64 * 4
    assert "GiB" in fsdp.summary()


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    # ru_maxrss survives exec: a child of this (deliberately large) process would report our peak.
    big = bytearray(b"\x01" * (1 << 30))
    assert peak_rss_bytes() >= len(big)
    code = "from flextron.train.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < len(big) // 2
