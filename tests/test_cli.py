import json
import subprocess
import sys

import pytest
from transformers import OPTConfig, OPTForCausalLM

from conftest import make_tokenizer
from flextron.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flextron", *args], capture_output=True, text=True, timeout=300)


def test_convert_then_eval(tiny_hf_dir, tmp_path, capsys):
    model_dir, text = tiny_hf_dir
    out = tmp_path / "ckpt"
    assert main(["convert", str(model_dir), "--out", str(out), "--calib-data", str(text), "--calib-sequences", "8",
                 "--calib-seq-len", "32", "--multiple", "8", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "Elastic search space" in shown and "centroid" in shown
    manifest = json.loads((out / "flextron.json").read_text())
    assert manifest["family"] == "llama" and manifest["calibration"]["n_sequences"] == 8
    assert manifest["elastic_space"]["mlp"][0] == [24, 48, 72, 96]
    assert len(manifest["importance"]["mlp"][0]) == 96


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path):
    cases = [
        (["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "neither an existing directory"),
        (["eval", str(tmp_path / "nockpt"), "--budgets", "0.5"], "not an elastic checkpoint"),
        (["eval", "--budgets", "fast"], "cannot read budget"),
        (["eval", "--tasks", "ppl,hellaswg"], "unknown task 'hellaswg'"),
        (["report", str(tmp_path)], "holds no results.json or eval.json"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_via_cli(tmp_path):
    d = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    r = run_cli("convert", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unsupported architecture OPTForCausalLM" in r.stderr
    assert "LlamaForCausalLM" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_touched(tiny_hf_dir, tmp_path):
    model_dir, _ = tiny_hf_dir
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert main(["convert", str(model_dir), "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"


def test_invalid_elastic_fraction_is_refused(tiny_hf_dir, tmp_path):
    model_dir, text = tiny_hf_dir
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "c"), "--calib-data", str(text),
                 "--mlp-fractions", "0,1"]) == 2
    assert not (tmp_path / "c").exists()


def test_per_layer_space_from_json(tiny_hf_dir, tmp_path):
    model_dir, text = tiny_hf_dir
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"mlp": [[32, 96], [16, 48, 96]], "attn": [[2, 4], [1, 4]]}))
    out = tmp_path / "ckpt"
    assert main(["convert", str(model_dir), "--out", str(out), "--space", str(space), "--calib-data", str(text),
                 "--calib-sequences", "4", "--calib-seq-len", "16"]) == 0
    assert json.loads((out / "flextron.json").read_text())["elastic_space"]["mlp"] == [[32, 96], [16, 48, 96]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mlp": [[32, 64]] * 2, "attn": [[4]] * 2}))  # 64 is not the layer's 96
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "c2"), "--space", str(bad)]) == 2
    assert not (tmp_path / "c2").exists()


def test_convert_with_depth_then_export_below_the_width_only_minimum(tiny_hf_dir, tmp_path, capsys):
    model_dir, text = tiny_hf_dir
    out = tmp_path / "ckpt"
    assert main(["convert", str(model_dir), "--out", str(out), "--depth", "--min-layers", "1", "--calib-data",
                 str(text), "--calib-sequences", "4", "--calib-seq-len", "16", "--multiple", "8"]) == 0
    manifest = json.loads((out / "flextron.json").read_text())
    space, layers = manifest["elastic_space"], manifest["importance"]["layers"]
    assert space["mlp"][0] == [0, 24, 48, 72, 96] and space["attn"][0] == [0, 1, 2, 3, 4] and space["min_layers"] == 1
    for kind in ("mlp", "attn"):  # least important sub-layer skipped first
        assert space["skip_order"][kind] == sorted(range(2), key=layers[kind].__getitem__)
    capsys.readouterr()
    assert main(["export", str(out), "--budget", "params=20%", "--out", str(tmp_path / "small")]) == 0
    info = json.loads((tmp_path / "small" / "flextron_export.json").read_text())
    assert 0 in info["subnet"]["mlp"] + info["subnet"]["attn"]  # below every width-only sub-network
    assert main(["generate", str(tmp_path / "small"), "--max-new-tokens", "3", "w1 w2"]) == 0
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "c2"), "--depth", "--min-layers", "3"]) == 2
    assert "--min-layers 3 must be between 1 and the model's 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()
