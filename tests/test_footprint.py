"""What a sub-network occupies in llama.cpp, against llama.cpp itself: the tensor types and bytes its
quantizer writes (`llama_model_quantize`), the model size, KV cache and buffers it reports allocating."""

import ctypes
import re

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flextron.assets import _GEMMA3_PARTS, _GGUF, package_file
from flextron.cost import MB, analytic_table
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.footprint import Deployment, compute_bytes, kv_bytes, tensor_bytes, tensor_type, use_more_bits
from flextron.gguf import write_gguf
from flextron.options import OUTTYPES
from flextron.space import ElasticSpace, Subnet
from helpers import make_bpe_tokenizer, make_elastic, make_model

llama_cpp = pytest.importorskip("llama_cpp")

QUANTIZER = ("q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m")
FALLBACKS = {"q6_k": {"q8_0"}, "q5_k_m": {"q5_1", "q8_0"}, "q4_k_m": {"q5_0", "q8_0"}}  # from q4_k, q5_k, q6_k
HEAD = 64  # a head size q8_0 / q4_0 KV caches and flash attention take


def mixed_model() -> ElasticModel:
    """A 4-layer Llama of hidden size 256 (the k-quants' block) whose MLP widths 80-320 and hidden size 128
    are not whole 256-blocks (80 and 240 not even 32-blocks); skippable sub-layers down to 2 layers."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=320, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD, max_position_embeddings=256)
    em = ElasticModel(LlamaForCausalLM(cfg).eval())
    space = ElasticSpace.default(4, 320, 2, multiple=8).with_depth(2).with_hidden(256, (0.5, 1.0), 64)
    em.set_space(space)
    return em


SUBNETS = {"full": Subnet(mlp=[320] * 4, attn=[2] * 4),  # llama's own graph
           "per_layer": Subnet(mlp=[320, 240, 160, 80], attn=[2, 1, 2, 1]),  # deci
           "skips": Subnet(mlp=[320, 0, 160, 80], attn=[2, 1, 0, 1]),  # deci's zero FFN in layer 1
           "hidden": Subnet(mlp=[240, 240, 240, 240], attn=[1, 1, 1, 1], hidden=128)}


def written(em: ElasticModel, subnet: Subnet, weight_type: str, path) -> str:
    """`subnet` as a GGUF at `weight_type`: flextron's writer, quantized by llama.cpp for its quantizer types."""
    if weight_type in ("f32", "f16", "bf16", "q8_0"):
        write_gguf(em, make_bpe_tokenizer(), subnet, path, weight_type)
        return path
    source = path.with_suffix(".f32.gguf")
    write_gguf(em, make_bpe_tokenizer(), subnet, source, "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{weight_type.upper()}")
    params.nthread = 1
    with quiet():
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) == 0
    return path


class quiet:
    """llama.cpp's log within the block, collected instead of printed (`lines`)."""

    def __enter__(self):
        self.lines = []

        @llama_cpp.llama_log_callback
        def keep(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self.callback = keep  # kept alive while installed
        llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def reported(path, deployment: Deployment) -> dict[str, float]:
    """What llama.cpp allocates for the GGUF at `deployment` (its defaults otherwise: 512-token micro-batch,
    flash attention): the model size (bytes, exact) and the KV, output and compute buffers it logs (MiB,
    2 decimals, as bytes)."""
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max = deployment.context * deployment.batch, deployment.batch
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = getattr(llama_cpp, f"GGML_TYPE_{deployment.kv_type.upper()}")
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    with quiet() as log:
        ctx = llama_cpp.llama_init_from_model(model, params)
    out = {"model": llama_cpp.llama_model_size(model)}
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    for line in log.lines:
        if m := re.search(r"(\w+) buffer size =\s*([0-9.]+) MiB", line):
            out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2)) * 2**20
    return out


def counters(names: list[str]) -> dict[str, tuple[int, int]]:
    """What llama.cpp's k-quant mixes read per tensor (llama-quant.cpp): its place among the attn_v /
    attn_qkv tensors (in layer order) and their number; for ffn_down, its layer and the block count."""
    layer = {n: int(n.split(".")[1]) for n in names if n.startswith("blk.")}
    wv = sorted((n for n in names if ".attn_v." in n or ".attn_qkv." in n), key=layer.get)
    return {n: (wv.index(n), len(wv)) if n in wv else (layer.get(n, 0), max(layer.values()) + 1) for n in names}


def assert_types_and_bytes(reader: gguf.GGUFReader, weight_type: str) -> set[str]:
    """Every tensor of the GGUF at the type and size `tensor_type` predicts; returns the types seen."""
    tensors = reader.tensors
    names = [t.name for t in tensors]
    place = counters(names)
    tied = "output.weight" not in names
    for t in tensors:
        shape = tuple(int(n) for n in t.shape)
        assert tensor_type(t.name, shape, weight_type, *place[t.name], tied) == t.tensor_type.name.lower(), t.name
        assert tensor_bytes(t.name, shape, weight_type, *place[t.name], tied) == t.n_bytes, t.name
    return {t.tensor_type.name.lower() for t in tensors}


@pytest.mark.parametrize("weight_type", QUANTIZER)
def test_tensor_types_and_bytes_equal_what_llama_cpp_writes(weight_type, tmp_path):
    em = mixed_model()
    seen = set()
    for case in ("full", "per_layer", "hidden"):
        path = written(em, SUBNETS[case], weight_type, tmp_path / f"{case}.gguf")
        seen |= assert_types_and_bytes(gguf.GGUFReader(path), weight_type)
    assert "f16" in seen  # rows of 80 and 240 values are not whole 32-blocks
    assert FALLBACKS.get(weight_type, set()) <= seen  # rows of 128, 160 or 320 values are not whole 256-blocks
    if weight_type.endswith("_m"):
        assert "q6_k" in seen  # the mix: attn_v and ffn_down of some layers, the output layer


def test_use_more_bits_is_llama_cpps_layer_rule():
    # i < n/8, i >= 7n/8, or every third from n/8 on (llama-quant.cpp): 30 layers -> 14 of them
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [use_more_bits(i, 2) for i in range(2)] == [False, True]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> tuple:
    """The packaged Gemma-3-270M Q4_K_M GGUF (its parts joined) and its reader (which takes ~20 s on its
    vocabulary of 262144)."""
    path = tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"
    with open(path, "wb") as out:
        for dist, rel in _GEMMA3_PARTS:
            out.write(package_file(dist, rel).read_bytes())
    return path, gguf.GGUFReader(path)


@pytest.mark.real
def test_tensor_types_of_the_packaged_gemma3_q4_k_m_file(gemma3):
    """A Q4_K_M file quantized elsewhere: Gemma-3-270M, hidden size 640 (not whole 256-blocks), tied embeddings."""
    assert {"q4_k", "q5_0", "q6_k", "q8_0"} <= assert_types_and_bytes(gemma3[1], "q4_k_m")


def test_weight_types_are_the_export_types():
    from flextron.deployment import WEIGHT_TYPES

    assert set(WEIGHT_TYPES) == set(OUTTYPES)


def predicted(em: ElasticModel, subnet: Subnet, deployment: Deployment) -> dict[str, float]:
    """The memory table's total split as llama.cpp reports it: weights, KV cache, output + compute buffers."""
    total = analytic_table(em, "memory_mb", deployment=deployment)(subnet) * MB
    kv = sum(kv_bytes(b.attn_heads(a)[1], b.geometry.head_dim, deployment) for b, a in zip(em.blocks, subnet.attn))
    runtime = compute_bytes(em, subnet.hidden, deployment)
    return {"model": total - kv - runtime, "KV": kv, "runtime": runtime}


@pytest.mark.parametrize("weight_type, deployment", [
    ("f32", Deployment("f32", 1000, 1, "f16")),  # 1000 cells padded to 1024
    ("q4_k_m", Deployment("q4_k_m", 2048, 2, "q8_0")),
    ("q8_0", Deployment("q8_0", 100, 3, "f16")),  # 300 cells padded to 512, a sequence's 170 of them to 256
])
def test_memory_of_sub_networks_equals_what_llama_cpp_allocates(weight_type, deployment, tmp_path):
    em = mixed_model()
    for case, subnet in SUBNETS.items():
        if case == "skips" and weight_type.endswith("_m"):
            continue  # the k-quant mixes count the tensors present; the table keeps each layer's place (cost.py)
        path = written(em, subnet, weight_type, tmp_path / f"{case}.gguf")
        got, want = reported(path, deployment), predicted(em, subnet, deployment)
        assert want["model"] == pytest.approx(got["model"], abs=1e-3), case
        assert want["KV"] == pytest.approx(got["KV"], abs=0.006 * 2**20), case  # the log's 2 decimals of MiB
        # An estimate: these small models' activations weigh more than their logits, and llama.cpp's
        # allocator places them as the graph goes (the full model: 0.87-1.15 of what it reports); at the
        # full model's widths, so a narrower sub-network needs less.
        ratio = want["runtime"] / (got["output"] + got["compute"])
        assert 0.8 < ratio < (1.2 if case == "full" else 1.5), case
    with pytest.raises(FlextronError, match="q8_0 KV cache needs rows of whole blocks"):
        analytic_table(make_elastic("llama"), "memory_mb", deployment=Deployment(kv_type="q8_0"))  # heads of 8


def regrouping(kind: str) -> ElasticModel:
    """A tiny model whose per-layer llama.cpp graph stores its projections in other tensors than its own:
    Phi-3 with RoPE over whole heads (deci splits its fused q|k|v and gate|up), Qwen3 with tied
    embeddings (openelm fuses q|k|v), Granite with tied embeddings (deci writes its output layer apart)."""
    base = make_model(kind)
    if kind == "phi3":
        change = {"rope_parameters": {**base.config.rope_parameters, "partial_rotary_factor": 1.0},
                  "partial_rotary_factor": 1.0}
    else:
        change = {"tie_word_embeddings": True}
    model = type(base)(type(base.config).from_dict({**base.config.to_dict(), **change}))
    model.load_state_dict(base.state_dict(), strict=False)
    em = ElasticModel(model.eval())
    b = em.blocks[0]
    em.set_space(ElasticSpace.default(2, b.mlp.n_units, b.attn.n_units, multiple=8))
    return em


@pytest.mark.parametrize("kind", ["phi3", "qwen3", "granite"])
def test_memory_prices_the_tensors_of_the_graph_a_sub_network_is_written_in(kind, tmp_path):
    """A uniform sub-network in the family's own graph (phi3: fused q|k|v, which the k-quant mixes treat as
    attn_v), a per-layer one in deci / openelm (a tied Granite's output layer apart): the weights are what
    llama.cpp's quantizer makes of each."""
    em = regrouping(kind)
    deployment = Deployment("q4_k_m", 512)
    for i, subnet in enumerate((em.space.full(), em.space.uniform(1, 1), Subnet(mlp=[24, 72], attn=[1, 3]))):
        path = written(em, subnet, "q4_k_m", tmp_path / f"{i}.gguf")
        assert predicted(em, subnet, deployment)["model"] == reported(path, deployment)["model"], subnet


def config_of(reader: gguf.GGUFReader) -> LlamaConfig:
    """The HF config of a GGUF's architecture (llama or gemma3), from its metadata."""
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    value = {k.removeprefix(f"{arch}."): f.contents() for k, f in fields.items() if k.startswith(f"{arch}.")}
    common = dict(vocab_size=len(fields["tokenizer.ggml.tokens"].contents()), hidden_size=value["embedding_length"],
                  intermediate_size=value["feed_forward_length"], num_hidden_layers=value["block_count"],
                  num_attention_heads=value["attention.head_count"],
                  num_key_value_heads=value["attention.head_count_kv"],
                  head_dim=value.get("attention.key_length",
                                     value["embedding_length"] // value["attention.head_count"]))
    if arch == "llama":
        return LlamaConfig(**common)
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, sliding_window=value["attention.sliding_window"])


@pytest.mark.real
@pytest.mark.parametrize("model", ["SmolLM2-135M", "gemma-3-270m"])
def test_kv_and_buffers_of_real_shapes_equal_what_llama_cpp_allocates(model, request):
    """SmolLM2-135M (vocabulary 49152, 30 layers of 3 KV heads) and Gemma-3-270M (262144, 18 layers of 1,
    sliding-window layers at full length as llama.cpp's C API keeps them): the logits dominate the buffers."""
    if model == "gemma-3-270m":
        path, reader = request.getfixturevalue("gemma3")
    else:
        path = package_file(*_GGUF)
        reader = gguf.GGUFReader(path)
    with torch.device("meta"):  # the shapes only
        em = ElasticModel(AutoModelForCausalLM.from_config(config_of(reader)))
    for deployment in (Deployment(), Deployment(context=1000, kv_type="q8_0"), Deployment(context=2048, batch=2)):
        got = reported(path, deployment)
        kv = sum(kv_bytes(b.attn_heads(b.attn.n_units)[1], b.geometry.head_dim, deployment) for b in em.blocks)
        assert kv == pytest.approx(got["KV"], abs=0.006 * 2**20)
        assert compute_bytes(em, None, deployment) == pytest.approx(got["output"] + got["compute"], rel=0.05)
    got = reported(path, Deployment())  # the default deployment: the estimate is llama.cpp's size
    assert compute_bytes(em, None, Deployment()) == pytest.approx(got["output"] + got["compute"], abs=0.006 * 2**20)
