import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from flextron import api
from flextron.cli import main
from flextron.cost import subnet_cost
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.errors import FlextronError
from flextron.export import export
from flextron.generation import prompt_inputs
from flextron.modeling_flextron import PER_LAYER
from flextron.options import Sampling
from flextron.space import Subnet
from helpers import FAMILY_KINDS, LLAMA_KINDS, VOCAB, hf_greedy, make_elastic, make_model, make_tokenizer

PER_LAYER_CLASSES = {m.__name__ for _, m in PER_LAYER.values()}
# What existing exports' config.json names: these never change.
AUTO_MAP = {kind: {"AutoConfig": f"modeling_flextron.Flextron{config}Config",
                   "AutoModelForCausalLM": f"modeling_flextron.Flextron{model}"}
            for kind, config, model in (
                ("llama", "Llama", "LlamaForCausalLM"), ("mistral", "Mistral", "MistralForCausalLM"),
                ("qwen2", "Qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3", "Qwen3ForCausalLM"),
                ("gpt2", "GPT2", "GPT2LMHeadModel"), ("gemma2", "Gemma2", "Gemma2ForCausalLM"),
                ("gemma3", "Gemma3Text", "Gemma3ForCausalLM"), ("olmo2", "Olmo2", "Olmo2ForCausalLM"),
                ("phi3", "Phi3", "Phi3ForCausalLM"), ("granite", "Granite", "GraniteForCausalLM"),
                ("smollm3", "SmolLM3", "SmolLM3ForCausalLM"))}
# The start of a script run in a subprocess where importing flextron fails.
BLOCK_FLEXTRON = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flextron" or name.startswith("flextron."):
            raise ImportError("flextron is blocked here")

sys.meta_path.insert(0, Block())
"""
# hidden-*: the uniform and hetero sub-networks at hidden sizes 32 and 48 (of 64), head size unchanged.
CASES = ["uniform", "fallback", "hetero", "hidden-uniform", "hidden-hetero"]


def subnet_for(em: ElasticModel, kind: str, case: str) -> Subnet:
    """uniform: stock architecture; fallback: uniform but not expressible by the stock config; hetero."""
    s = em.space
    if case.startswith("hidden-"):
        sub = subnet_for(em, kind, case.removeprefix("hidden-"))
        return dataclasses.replace(sub, hidden=s.hidden[0] if case == "hidden-uniform" else s.hidden[1])
    if case == "uniform":
        return s.uniform(1, 3) if kind == "gpt2" else s.uniform(1, 1)  # GPT-2: full heads, smaller MLP
    if case == "fallback":
        # GPT-2: fewer heads at the same hidden size; Llama-like: 6 heads do not divide hidden 64.
        return s.uniform(2, 1) if kind == "gpt2" else s.uniform(2, 2)
    return Subnet(mlp=[s.mlp[0][0], s.mlp[1][2]], attn=[s.attn[0][1], s.attn[1][3]])


def per_layer_expected(kind: str, case: str) -> bool:
    # Mistral/Qwen/OLMo 2/Phi-3/Granite/SmolLM3 configs take any head count with an explicit head_dim;
    # Llama's and Gemma's check hidden % heads. GPT-2's head size is hidden / heads: per-layer at a smaller hidden size.
    return (case.endswith("hetero") or (case == "fallback" and kind in ("llama", "gpt2", "gemma2", "gemma3"))
            or (case == "hidden-uniform" and kind == "gpt2"))


def head_size(kind: str) -> int:
    config = make_model(kind).config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every family x case exported once: {(kind, case): (dir, subnet, params, expected logits)}."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    out = {}
    for kind in FAMILY_KINDS:
        plain, hidden = make_elastic(kind), make_elastic(kind, hidden=True)
        for case in CASES:
            em = hidden if case.startswith("hidden-") else plain
            sub = subnet_for(em, kind, case)
            d = export(em, make_tokenizer(), sub, root / f"{kind}-{case}")
            with em.subnet(sub), torch.no_grad():
                logits = em(ids).logits
            torch.save(logits, d / "expected.pt")
            out[kind, case] = (d, sub, subnet_cost(em, sub).params, logits)
    return root, ids, out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_export_matches_elastic_model(exports, kind, case):
    _, ids, out = exports
    d, sub, params, expected = out[kind, case]
    model = AutoModelForCausalLM.from_pretrained(d)  # per-layer ones via the registration on import
    per_layer = type(model).__name__ in PER_LAYER_CLASSES
    assert per_layer == per_layer_expected(kind, case), type(model).__name__
    manifest = json.loads((d / "flextron_export.json").read_text())
    assert manifest["per_layer"] == per_layer and manifest["subnet"] == sub.to_dict()
    assert (d / "modeling_flextron.py").is_file() == per_layer
    config = json.loads((d / "config.json").read_text())
    if sub.hidden is not None:  # the stock (or per-layer) model of that hidden size, its head size explicit
        assert model.config.hidden_size == sub.hidden and config["head_dim"] == head_size(kind)
        assert manifest["subnet"]["hidden"] == sub.hidden
    if per_layer:
        base_type = make_model(kind).config.model_type
        assert config["auto_map"] == AUTO_MAP[kind] and config["model_type"] == f"flextron_{base_type}"
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() < 1e-4


def test_exports_load_without_flextron(exports, tmp_path):
    """Stock exports load with plain transformers, per-layer ones with trust_remote_code (and save_pretrained
    of those writes a directory that loads the same way); flextron is blocked."""
    root, _, out = exports
    script = BLOCK_FLEXTRON + r"""
import json
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM

root, resaved, remote = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
ids = torch.load(root / "ids.pt")
diffs = {}
for name, trust in remote.items():
    d = root / name
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=trust)
    dirs = [d]
    if trust:
        model.save_pretrained(resaved / name)
        model = AutoModelForCausalLM.from_pretrained(resaved / name, trust_remote_code=True)
        dirs.append(resaved / name)
    with torch.no_grad():
        diff = (model(ids).logits - torch.load(d / "expected.pt")).abs().max().item()
    diffs[name] = [type(model).__name__, diff, [json.loads((p / "config.json").read_text()).get("auto_map")
                                                for p in dirs]]
assert "flextron" not in sys.modules
print(json.dumps(diffs))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    remote = {f"{k}-{c}": per_layer_expected(k, c) for k, c in out}
    r = subprocess.run([sys.executable, "-c", script, str(root), str(tmp_path / "resaved"), json.dumps(remote)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(diffs) == len(out)
    for (kind, case), _ in out.items():
        cls, diff, auto_maps = diffs[f"{kind}-{case}"]
        per_layer = per_layer_expected(kind, case)
        assert cls.startswith("Flextron") == per_layer, (kind, case, cls)
        assert diff < 1e-4, (kind, case, diff)
        assert auto_maps == ([AUTO_MAP[kind]] * 2 if per_layer else [None]), (kind, case, auto_maps)
        if per_layer:  # the round trip carries the same code
            name = f"{kind}-{case}/modeling_flextron.py"
            assert (tmp_path / "resaved" / name).read_bytes() == (root / name).read_bytes()


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_greedy_generation_matches(exports, kind):
    _, _, out = exports
    tok = make_tokenizer()
    for case in ("uniform", "hetero", "hidden-uniform", "hidden-hetero"):
        em = make_elastic(kind, hidden=case.startswith("hidden-"))
        d, sub, _, _ = out[kind, case]
        streamed = []
        ids = prompt_inputs(tok, "w5 w6 w7")["input_ids"][0].tolist()  # `flextron generate`'s decoder
        (got,) = Engine(em, tok, start=False).generate([Request(ids, sub, Sampling(10), on_text=streamed.append)])
        expected = hf_greedy(AutoModelForCausalLM.from_pretrained(d), tok, "w5 w6 w7", 10)
        assert got.text == expected and "".join(streamed) == expected and expected


def test_existing_output_is_refused_and_untouched(tmp_path):
    em, tok = make_elastic("llama"), make_tokenizer()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FlextronError, match="already exists"):
        export(em, tok, em.space.smallest(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    export(em, tok, em.space.smallest(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_api_export_budget_and_explicit_subnet(elastic_ckpt, tmp_path):
    ckpt = elastic_ckpt()
    with pytest.raises(FlextronError, match="below the smallest"):
        api.export(ckpt, "0.01", tmp_path / "small")
    assert not (tmp_path / "small").exists()
    sub = {"mlp": [24, 96], "attn": [4, 1]}
    d = api.export(ckpt, None, tmp_path / "explicit", subnet=sub)
    info = json.loads((d / "flextron_export.json").read_text())
    assert info["subnet"] == sub and info["per_layer"] and info["source_checkpoint"] == str(ckpt)
    with pytest.raises(FlextronError, match="exactly one"):
        api.export(ckpt, "0.5", tmp_path / "both", subnet=sub)


def test_cli_export_then_generate(elastic_ckpt, tmp_path, capsys):
    ckpt = elastic_ckpt()
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--budget", "0.6", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    info = json.loads((out / "flextron_export.json").read_text())
    assert "Exported" in shown and "FLOPs/token" in shown and info["budget"] == "60%"
    em = make_elastic("llama")
    assert info["cost"] == subnet_cost(em, Subnet(**info["subnet"])).to_dict()

    args = ["--max-new-tokens", "6", "--raw", "w9 w10"]
    assert main(["generate", str(out), *args]) == 0
    from_export = capsys.readouterr().out
    assert main(["generate", str(ckpt), "--budget", "0.6", *args]) == 0
    assert capsys.readouterr().out == from_export and from_export.strip()

    assert main(["generate", str(out), "--budget", "0.5", "w1"]) == 2
    assert "not an elastic checkpoint" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--budget", "0.01", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_prompt_uses_chat_template_unless_raw():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}"
                         "{% if add_generation_prompt %} w3{% endif %}")
    templated = prompt_inputs(tok, "w7 w8")["input_ids"][0].tolist()
    assert templated == tok.convert_tokens_to_ids(["w1", "w7", "w8", "w2", "w3"])
    assert prompt_inputs(tok, "w7 w8", raw=True)["input_ids"][0].tolist() == tok.convert_tokens_to_ids(["w7", "w8"])


def test_per_layer_export_code_is_hashed_and_loads_through_our_classes(elastic_ckpt, tmp_path):
    ckpt = elastic_ckpt()
    import hashlib

    from flextron.assets import load_hf

    d = api.export(ckpt, None, tmp_path / "x", subnet={"mlp": [24, 96], "attn": [4, 1]})
    code = d / "modeling_flextron.py"
    info = json.loads((d / "flextron_export.json").read_text())
    assert info["modeling_sha256"] == hashlib.sha256(code.read_bytes()).hexdigest()
    model, _, _ = load_hf(str(d))
    assert type(model).__module__ == "flextron.modeling_flextron"  # ours, not the directory's copy
    code.write_text(code.read_text() + "\nimport os  # tampered\n")
    with pytest.raises(FlextronError, match="modeling_flextron.py is missing or was modified after export"):
        load_hf(str(d))
    assert main(["generate", str(d), "--raw", "w1"]) == 2


def depth_cases(em: ElasticModel) -> dict[str, Subnet]:
    """whole: skipped sub-layers are whole layers (stock, fewer layers); partial: attention-free and
    MLP-free layers (per-layer architecture)."""
    s = em.space
    return {"whole": Subnet(mlp=[s.mlp[0][2], 0, s.mlp[2][2], 0], attn=[s.attn[0][4], 0, s.attn[2][4], 0]),
            "partial": Subnet(mlp=[s.mlp[0][2], 0, 0, s.mlp[3][4]], attn=[0, s.attn[1][2], 0, s.attn[3][4]])}


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_depth_pruned_exports_match_the_elastic_model(kind, tmp_path):
    em, tok = make_elastic(kind, n_layers=4, min_layers=1), make_tokenizer()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for case, sub in depth_cases(em).items():
        d = export(em, tok, sub, tmp_path / case)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert (type(model).__name__ in PER_LAYER_CLASSES) == (case == "partial")
        assert model.config.num_hidden_layers == {"whole": 2, "partial": 3}[case]
        assert sum(p.numel() for p in model.parameters()) == subnet_cost(em, sub).params
        with em.subnet(sub):
            with torch.no_grad():
                assert (model(ids).logits - em(ids).logits).abs().max().item() < 1e-4
            # Cached greedy decoding through attention-free layers equals the elastic model's.
            expected = hf_greedy(em.model, tok, "w5 w6 w7", 8)
        assert hf_greedy(model, tok, "w5 w6 w7", 8) == expected and expected


def test_partial_depth_export_loads_without_flextron(tmp_path):
    em = make_elastic("llama", n_layers=4, min_layers=1)
    sub = depth_cases(em)["partial"]
    d = export(em, make_tokenizer(), sub, tmp_path / "partial")
    ids = torch.randint(0, VOCAB, (1, 7))
    em.set_subnet(sub)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": em(ids).logits}, tmp_path / "ref.pt")
    script = BLOCK_FLEXTRON + r"""
import torch
from transformers import AutoModelForCausalLM
ref = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    print((model(ref["ids"]).logits - ref["logits"]).abs().max().item())
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(d), str(tmp_path / "ref.pt")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-4


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_query_head_exports_match_the_elastic_model(kind, tmp_path):
    em = make_elastic(kind, attn_unit="head")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    # One head in each of the 4 groups everywhere (stock config: 4 heads, 4 KV heads); per layer: 2 groups / all.
    for sub, stock in ((Subnet(mlp=[48, 48], attn=[4, 4]), True), (Subnet(mlp=[24, 96], attn=[2, 8]), False)):
        d = export(em, make_tokenizer(), sub, tmp_path / f"{sub.attn[0]}")
        model = AutoModelForCausalLM.from_pretrained(d)
        assert (type(model).__name__ not in PER_LAYER_CLASSES) == stock
        if stock:
            assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 4)
        assert sum(p.numel() for p in model.parameters()) == subnet_cost(em, sub).params
        with em.subnet(sub), torch.no_grad():
            assert (model(ids).logits - em(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_hidden_size_that_the_heads_do_not_divide(kind, tmp_path):
    """Llama's and Gemma's configs refuse a hidden size that is not a multiple of the heads (34, 8
    heads): the uniform sub-network goes per-layer, whose configs give every projection its size;
    transformers' GPT-2 attention cannot be built at such a size (34, 4 heads): refused in one line."""
    em = make_elastic(kind)
    em.set_space(em.space.with_hidden(em.hidden_size, (34 / 64, 1.0), 2))
    sub = em.space.uniform(1, 3 if kind == "gpt2" else 1, hidden_index=0)
    assert sub.hidden == 34
    if kind == "gpt2":
        with pytest.raises(FlextronError, match="needs a hidden size that its 4 heads divide, not 34") as refused:
            export(em, make_tokenizer(), sub, tmp_path / "x")
        assert "\n" not in str(refused.value) and not any(tmp_path.iterdir())
        return
    model = AutoModelForCausalLM.from_pretrained(export(em, make_tokenizer(), sub, tmp_path / "x"))
    assert type(model).__name__ in PER_LAYER_CLASSES and model.config.hidden_size == 34
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with em.subnet(sub), torch.no_grad():
        assert (model(ids).logits - em(ids).logits).abs().max().item() < 1e-4
