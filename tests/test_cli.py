import argparse
import inspect
import json
import math
import re
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

from flextron import api, demo
from flextron.cli import _options, build_parser, main
from flextron.errors import FlextronError
from flextron.options import (
    MAX_STOP_CHARS,
    ConvertOptions,
    DemoOptions,
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    ProfileOptions,
    ReportOptions,
    RouteOptions,
    ServeOptions,
    TrainOptions,
)
from helpers import TEMPLATE, hf_greedy, make_tokenizer, run_clis, word_text

# command: (its options dataclass, the api function, the shortest command line, the options it means)
COMMANDS = {
    "convert": (ConvertOptions, api.convert, ["--out", "o"], ConvertOptions()),
    "eval": (EvalOptions, api.evaluate, [], EvalOptions()),
    "report": (ReportOptions, api.report, ["run"], ReportOptions()),
    "demo": (DemoOptions, demo.run, [], DemoOptions()),
    "train": (TrainOptions, api.train, ["ck", "--out", "r", "--max-steps", "1"], TrainOptions(max_steps=1)),
    "profile": (ProfileOptions, api.profile, ["ck"], ProfileOptions()),
    "route": (RouteOptions, api.route, ["ck"], RouteOptions()),
    "export": (ExportOptions, api.export, ["ck", "--budget", "0.5", "--out", "o"], ExportOptions()),
    "generate": (GenerateOptions, api.generate, ["ck", "hi"], GenerateOptions()),
    "serve": (ServeOptions, api.serve, ["ck"], ServeOptions()),
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


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


def test_eval_chat_and_ppl_data_of_a_converted_checkpoint(tiny_hf_dir, tmp_path, capsys):
    """Issue 40: `eval --tasks chat` compares each budget with the model the checkpoint was converted from
    (its manifest's source_model); --ppl-data adds a perplexity column on the user's text."""
    model_dir, text = tiny_hf_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    ckpt, prompts, out = tmp_path / "ckpt", tmp_path / "prompts.txt", tmp_path / "eval.json"
    assert main(["convert", str(model_dir), "--out", str(ckpt), "--calib-data", str(text), "--calib-sequences", "4",
                 "--calib-seq-len", "16", "--multiple", "8"]) == 0
    prompts.write_text("w5 w6\nw7 w8 w9\n\nw10\n")
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--tasks", "chat", "--budgets", "1.0,0.5", "--chat-prompts", str(prompts),
                 "--chat-tokens", "4", "--ppl-data", str(text), "--limit", "2", "--seq-len", "16",
                 "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "Chat: agreement with the original" in shown and "ppl data" in shown
    full, half = json.loads(out.read_text())
    assert full["chat"]["n"] == 3 and full["chat"]["new_tokens"] == 4
    assert full["chat"]["agree_tokens"] == 1.0 and full["chat"]["kl"] < 1e-6  # sorted, untrained: the original
    assert half["chat"]["kl"] > 0 and "ppl" not in full and full["data_tokens"] == 2 * 15
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    windows = torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"][:32]).view(2, 16)
    with torch.no_grad():  # the original's own loss: the converted checkpoint at 100 % is the same function
        loss = model(input_ids=windows, labels=windows).loss
    assert full["ppl_data"] == pytest.approx(math.exp(loss.item()), rel=1e-4) and half["ppl_data"] > 1
    report_md = api.report(out)[1]
    assert "same 1st sentence" in report_md and "ppl data" in report_md
    missing, empty = tmp_path / "missing.txt", tmp_path / "empty.txt"
    empty.write_text(" \n")
    for args, message in (([str(ckpt), "--ppl-data", str(missing)], f"--ppl-data {missing} is not a file"),
                          ([str(ckpt), "--ppl-data", str(empty)], f"--ppl-data {empty} holds no text"),
                          ([str(ckpt), "--tasks", "chat", "--original", str(missing)], "neither an existing"),
                          ([str(ckpt), "--chat-prompts", str(prompts)], "add chat to --tasks")):
        assert main(["eval", *args, "--budgets", "1.0"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path):
    cases = [
        (["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "neither an existing directory"),
        (["eval", str(tmp_path / "nockpt"), "--budgets", "0.5"], "not an elastic checkpoint"),
        (["eval", "--budgets", "fast"], "cannot read budget"),
        (["eval", "--tasks", "ppl,hellaswg"], "unknown task 'hellaswg'"),
        (["report", str(tmp_path)], "holds no results.json or eval.json"),
    ]
    for (_, message), r in zip(cases, run_clis(*((args, "") for args, _ in cases))):
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
    (r,) = run_clis((["convert", str(d), "--out", str(tmp_path / "o")], ""))
    assert r.returncode == 2 and "unsupported model OPTForCausalLM" in r.stderr
    assert "gemma3_text" in r.stderr and "--family" in r.stderr and "Traceback" not in r.stderr
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


def test_convert_with_query_head_choices_then_export(tiny_hf_dir, tmp_path, capsys):
    model_dir, text = tiny_hf_dir
    out = tmp_path / "ckpt"
    assert main(["convert", str(model_dir), "--out", str(out), "--attn-unit", "head", "--calib-data", str(text),
                 "--calib-sequences", "4", "--calib-seq-len", "16", "--multiple", "8"]) == 0
    space = json.loads((out / "flextron.json").read_text())["elastic_space"]
    assert space["attn_unit"] == "head" and space["attn"][0] == [1, 2, 3, 4, 8]  # 8 query heads in 4 groups
    api.export(out, None, tmp_path / "e", subnet={"mlp": [48, 48], "attn": [4, 4]})
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 4)
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps({"mlp": [[96]] * 2, "attn": [[4, 8]] * 2}))
    capsys.readouterr()
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "c2"), "--space", str(space_file),
                 "--attn-unit", "head"]) == 2
    assert "contradicts the space file" in capsys.readouterr().err
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
    # A skip order given in a --space file is the one kept, not replaced by the measured one.
    space_file = tmp_path / "space.json"
    order = {kind: sorted(range(2), key=layers[kind].__getitem__, reverse=True) for kind in ("mlp", "attn")}
    space_file.write_text(json.dumps({"mlp": [[0, 96]] * 2, "attn": [[0, 4]] * 2, "skip_order": order}))
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "c3"), "--space", str(space_file), "--calib-data",
                 str(text), "--calib-sequences", "4", "--calib-seq-len", "16"]) == 0
    assert json.loads((tmp_path / "c3" / "flextron.json").read_text())["elastic_space"]["skip_order"] == order


MEMORY_LINE = (r"Predicted llama\.cpp memory at (.+?): ([\d.]+) MB = weights ([\d.]+) MB \(file ([\d.]+) MB\) \+ "
               r"KV cache ([\d.]+) MB \+ buffers ([\d.]+) MB")


def test_export_gguf_prints_the_memory_it_will_take_at_the_deployment(elastic_ckpt, tmp_path, capsys):
    """The weights are the bytes of the GGUF's tensors (what llama.cpp loads), the KV cache keys and values
    of every layer's KV heads (its metadata) for each sequence's cells, which llama.cpp pads to 256; a
    memory budget just below the full model's gets a sub-network whose predicted total is within it."""
    import gguf

    ckpt = elastic_ckpt(bpe=True)
    deployment = ["--format", "gguf", "--outtype", "q8_0", "--context", "1000", "--batch", "2"]
    printed = {}
    for name, budget in (("full", "1.0"), ("below", None)):
        if budget is None:  # 10 kB under the full model's
            limit = printed["full"][0] - 0.01
            budget = f"memory_mb={limit:.2f}"
        out = tmp_path / f"{name}.gguf"
        assert main(["export", str(ckpt), "--budget", budget, "--out", str(out), *deployment]) == 0
        m = re.search(MEMORY_LINE, " ".join(capsys.readouterr().out.split()))
        assert m and m.group(1) == "q8_0 weights, 1000-token f16 KV cache x 2 sequences"
        total, weights, file, kv, buffers = map(float, m.groups()[1:])
        reader = gguf.GGUFReader(out)
        assert weights == pytest.approx(sum(int(t.n_bytes) for t in reader.tensors) / 1e6, abs=0.005)
        assert file == pytest.approx(out.stat().st_size / 1e6, abs=0.005)
        head_dim, kv_heads = (reader.fields[f"llama.{k}"].contents()
                              for k in ("attention.key_length", "attention.head_count_kv"))
        layers = reader.fields["llama.block_count"].contents()
        assert kv == pytest.approx(layers * 2 * kv_heads * head_dim * 2 * 2048 / 1e6, abs=0.005)
        assert buffers > 0 and total == pytest.approx(weights + kv + buffers, abs=0.015)
        printed[name] = total, json.loads(reader.fields["flextron.subnet"].contents())
    assert printed["below"][0] <= limit + 0.005 and printed["below"][1] != printed["full"][1]  # 2 decimals printed


def test_generate_is_greedy_at_a_tiny_temperature_and_ends_at_stop_strings(tiny_hf_dir, capsys):
    """Issue 36 item 6: `generate --temperature 1e-300` ended in a traceback (softmax(logits / T) overflowed)."""
    model_dir, _ = tiny_hf_dir
    args = ["generate", str(model_dir), "w5 w6", "--raw", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert greedy == hf_greedy(model, tok, "w5 w6", 8) + "\n" and greedy.strip()
    for t in ("1e-300", "5e-324", "1e-40"):
        assert main([*args, "--temperature", t, "--seed", "1"]) == 0 and capsys.readouterr().out == greedy
    stop = greedy.split()[1]
    assert main([*args, "--stop", f"w999,{stop}"]) == 0
    assert capsys.readouterr().out == greedy[:greedy.find(stop)] + "\n"
    assert main([*args, "--stop", "z" * (MAX_STOP_CHARS + 1)]) == 2
    assert f"--stop takes at most 4 strings of at most {MAX_STOP_CHARS} characters" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help():
    commands = subparsers()
    assert set(commands) == set(COMMANDS)
    for name, sp in commands.items():
        for action in sp._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
        sp.format_help()  # every help string formats (no stray %)


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_and_api_defaults_come_from_the_options_dataclass(command):
    cls, function, argv, expected = COMMANDS[command]
    assert _options(build_parser().parse_args([command, *argv]), cls) == expected
    params = inspect.signature(function).parameters
    assert not {f.name for f in fields(cls)} & set(params), "an option redeclared (with its own default) in the api"
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # the fields as keywords
    assert f"{cls.__name__} | None" in {str(p.annotation) for p in params.values()}  # or the dataclass itself


def test_train_from_a_yaml_config_equals_the_same_run_from_flags(elastic_ckpt, tmp_path):
    ckpt, text = elastic_ckpt(), tmp_path / "data.txt"
    text.write_text(word_text(4000))
    flags = ["--max-steps", "1", "--seq-len", "32", "--micro-batch", "2", "--eval-limit", "0", "--dtype", "fp32",
             "--budgets", "1.0,0.5", "--no-activation-checkpointing", "--data", str(text), "--device", "cpu"]
    assert main(["train", str(ckpt), "--out", str(tmp_path / "flags"), *flags, "--lr", "1e-4"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"max-steps: 1\nseq_len: 32\nmicro_batch: 2\neval_limit: 0\ndtype: fp32\nbudgets: [1.0, 0.5]\n"
                   f"activation_checkpointing: false\ndata: [{json.dumps(str(text))}]\ndevice: cpu\nlr: 5.0e-3\n")
    # --lr given on the command line wins over the file, even at its default value
    assert main(["train", str(ckpt), "--out", str(tmp_path / "yaml"), "--config", str(cfg), "--lr", "1e-4"]) == 0
    recorded = (tmp_path / "flags" / "config.yaml").read_text()
    assert (tmp_path / "yaml" / "config.yaml").read_text() == recorded
    run = json.loads((tmp_path / "flags" / "run.json").read_text())
    assert json.loads((tmp_path / "yaml" / "run.json").read_text())["config"] == run["config"]
    assert run["config"]["lr"] == 1e-4 and run["config"]["budgets"] == [1.0, 0.5]
    # the recorded config.yaml repeats the run: the same options and the same weights
    assert main(["train", str(ckpt), "--out", str(tmp_path / "again"), "--config", str(tmp_path / "flags" /
                                                                                        "config.yaml")]) == 0
    assert (tmp_path / "again" / "config.yaml").read_text() == recorded
    a, b = (load_file(tmp_path / r / "checkpoints" / "step-0000001" / "model.safetensors") for r in ("flags", "again"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("text, message", [
    ("sample: 3\nbatch: 1\nfoo-bar: 2\n", "unknown options foo_bar, sample for `flextron profile`"),
    ("batch: 0\n", "batch: must be in [1, inf], got 0"),
    ("runtime: onnx\n", "runtime must be one of hf, llama.cpp, not 'onnx'"),
    ("verify: maybe\n", "verify must be true or false"),
    ("!!python/object/apply:os.system ['touch PWNED']\n", "cannot read the config"),
])
def test_bad_config_files_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    assert main(["profile", str(tmp_path / "missing-ckpt"), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "PWNED").exists()


def test_an_empty_list_option_is_refused_in_one_line(elastic_ckpt, capsys):
    ckpt = elastic_ckpt()
    for argv in (["eval", str(ckpt), "--budgets", ","], ["eval", str(ckpt), "--tasks", ",,"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "expected one or more comma-separated values" in capsys.readouterr().err
    with pytest.raises(FlextronError, match="--budgets needs at least one value"):
        api.evaluate(ckpt, budgets=(), limit=1, seq_len=16, device="cpu")


def test_the_perplexity_table_gives_every_size_as_a_share_of_the_original(capsys):
    """An export evaluated alone is 100 % of itself; beside the original its row says its own budget and share."""
    from flextron.cli import print_ppl
    from flextron.results import EvalRow
    from flextron.space import Budget, Subnet

    def row(budget: str, params: float, fraction: float) -> EvalRow:
        return EvalRow(budget=Budget.parse(budget), subnet=Subnet(mlp=[8, 16], attn=[1, 2]),
                       cost={"params_nonembed": params}, params_fraction=fraction, ppl=30.0)

    original = row("1.0", 100e6, 1.0)
    print_ppl([original], original, label="prune only", more={"export": [row("0.82", 62e6, 1.0)]})
    export = next(line for line in capsys.readouterr().out.splitlines() if "export" in line)
    assert "82%" in export and "(62%)" in export and "100%" not in export
