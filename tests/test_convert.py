"""`flextron convert` (flextron.convert): the elastic space it writes, with and without hidden-size choices."""

import json

import torch

from flextron import api
from flextron.checkpoint import load_checkpoint
from flextron.cli import main
from flextron.elastic import ElasticModel
from flextron.importance import random_importance, sort_by_importance
from helpers import VOCAB, make_model

FAST = ["--calib-sequences", "4", "--calib-seq-len", "16", "--multiple", "8", "--device", "cpu"]


def logits(em: ElasticModel, x: torch.Tensor, subnet=None) -> torch.Tensor:
    with torch.no_grad(), em.subnet(subnet):
        return em(input_ids=x).logits


def test_hidden_fractions_give_a_checkpoint_with_hidden_sizes_that_loads_back(tiny_hf_dir, tmp_path):
    model_dir, text = tiny_hf_dir
    out = api.convert(str(model_dir), tmp_path / "ckpt", calib_data=str(text), calib_sequences=4, calib_seq_len=16,
                      multiple=8, hidden_fractions=(0.5, 0.75, 1.0), hidden_multiple=16, device="cpu", progress=False)
    manifest = json.loads((out / "flextron.json").read_text())
    assert manifest["elastic_space"]["hidden"] == [32, 48, 64]
    scores = manifest["importance"]["hidden"]
    assert len(scores) == 64 and scores == sorted(scores, reverse=True)
    em, _, _ = load_checkpoint(out)
    assert em.space.hidden == [32, 48, 64] and em.axis is not None
    x = torch.randint(0, VOCAB, (2, 9))
    assert (logits(em, x) - make_model("llama")(input_ids=x).logits).abs().max() < 1e-4  # channels moved, same function


def test_hidden_channels_in_random_order_are_saved_as_permuted(tiny_hf_dir, tmp_path):
    """The checkpoint computes at every hidden size what the model permuted in memory computes."""
    model_dir, _ = tiny_hf_dir
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "ckpt"), "--order", "random", "--seed", "5",
                 "--hidden-fractions", "0.5,0.75", "--hidden-multiple", "16", *FAST]) == 0
    em, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert em.space.hidden == [32, 48, 64]  # the full size is always a choice
    ref = ElasticModel(make_model("llama"), em.space)
    sort_by_importance(ref, random_importance(ref, 5))
    x = torch.randint(0, VOCAB, (2, 9))
    for i in range(3):
        sub = em.space.uniform(1, 2, hidden_index=i)
        assert torch.allclose(logits(em, x, sub), logits(ref, x, sub), atol=1e-5), sub
    assert (logits(em, x, em.space.smallest()) - logits(em, x)).abs().max() > 1e-2  # the sizes differ


def test_a_convert_without_hidden_fractions_is_unchanged(tiny_hf_dir, tmp_path):
    model_dir, text = tiny_hf_dir
    out = api.convert(str(model_dir), tmp_path / "ckpt", calib_data=str(text), calib_sequences=4, calib_seq_len=16,
                      multiple=8, device="cpu", progress=False)
    manifest = json.loads((out / "flextron.json").read_text())
    assert "hidden" not in manifest["elastic_space"] and "hidden" not in manifest["importance"]
    em, _, _ = load_checkpoint(out)
    assert em.space.hidden is None and em.axis is None
    hf = make_model("llama")
    assert torch.equal(em.model.get_input_embeddings().weight, hf.get_input_embeddings().weight)  # channels in place


def test_hidden_options_that_cannot_hold_are_refused_in_one_line(tiny_hf_dir, tmp_path, capsys):
    model_dir, _ = tiny_hf_dir
    space = {"mlp": [[48, 96]] * 2, "attn": [[2, 4]] * 2}
    cases = [
        ({**space, "hidden": [32, 64]}, ["--hidden-fractions", "0.75,1", "--hidden-multiple", "16"],
         "--hidden-fractions gives hidden sizes [48, 64], the space file [32, 64]; drop one of them"),
        (space, ["--hidden-fractions", "0.5,0.75"],  # in multiples of 64 (the default), only 64
         "--hidden-fractions 0.5,0.75 in multiples of 64 leave only the full hidden size 64; lower --hidden-multiple"),
        ({**space, "hidden": [32, 48]}, [], "the elastic space's largest hidden size 48 must equal the model's 64"),
    ]
    for i, (content, flags, message) in enumerate(cases):
        path = tmp_path / f"space{i}.json"
        path.write_text(json.dumps(content))
        capsys.readouterr()
        assert main(["convert", str(model_dir), "--out", str(tmp_path / f"c{i}"), "--space", str(path), *flags,
                     *FAST]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / f"c{i}").exists()
    # A space file that lists the hidden sizes itself is converted with them.
    path = tmp_path / "space.json"
    path.write_text(json.dumps({**space, "hidden": [48, 64]}))
    assert main(["convert", str(model_dir), "--out", str(tmp_path / "ok"), "--space", str(path), "--order", "random",
                 *FAST]) == 0
    assert json.loads((tmp_path / "ok" / "flextron.json").read_text())["elastic_space"]["hidden"] == [48, 64]
