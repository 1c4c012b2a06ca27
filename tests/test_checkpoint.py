import json
import subprocess

import pytest
import torch

from flextron.checkpoint import MANIFEST, load_checkpoint, save_checkpoint
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.importance import random_importance, sort_by_importance
from flextron.space import ElasticSpace
from helpers import VOCAB, make_model, make_tokenizer, rewrite_weights


def test_roundtrip_keeps_weights_space_and_subnets(tmp_path):
    em = ElasticModel(make_model("llama"))
    em.set_space(ElasticSpace.default(2, 96, 4, multiple=8))
    sort_by_importance(em, random_importance(em, 0))
    x = torch.randint(0, VOCAB, (1, 9))
    em.set_subnet(em.space.centroid())
    expected = em(input_ids=x).logits
    path = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    em, tok, manifest = load_checkpoint(path)
    assert manifest["family"] == "llama" and manifest["source_model"] == "tiny"
    assert em.space == ElasticSpace.default(2, 96, 4, multiple=8)
    em.set_subnet(em.space.centroid())
    assert torch.equal(em(input_ids=x).logits, expected)
    assert tok.get_vocab() == make_tokenizer().get_vocab()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FlextronError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_manifest(elastic_ckpt):
    path = elastic_ckpt()
    (path / MANIFEST).unlink()
    with pytest.raises(FlextronError, match="lacks flextron.json"):
        load_checkpoint(path)


def test_corrupt_manifest(elastic_ckpt):
    path = elastic_ckpt()
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(FlextronError, match="flextron.json is corrupt"):
        load_checkpoint(path)


def test_corrupt_weights(elastic_ckpt):
    path = elastic_ckpt()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FlextronError, match="model.safetensors differs from the one saved"):
        load_checkpoint(path)
    with pytest.raises(FlextronError, match=r"ckpt/model.safetensors is truncated or corrupt \(.*\); re-run `flextron"):
        load_checkpoint(path, verify=False)


DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop(DOWN), f"tensor {DOWN} is missing"),
    (lambda w: w.__setitem__(DOWN, w[DOWN][:, :-1].clone()), f"tensor {DOWN} .* wrong shape"),
    (lambda w: w[DOWN].__setitem__((0, 0), float("nan")), f"tensor {DOWN} holds NaN"),
    (lambda w: w.__setitem__(DOWN, w[DOWN].to(torch.int32)), f"tensor {DOWN} is stored as I32"),
])
def test_incomplete_or_bad_weights_are_refused_by_name(elastic_ckpt, change, message):
    path = elastic_ckpt()
    rewrite_weights(path, change)
    with pytest.raises(FlextronError, match="model.safetensors differs"):
        load_checkpoint(path)
    with pytest.raises(FlextronError, match=message):  # found even without the hash
        load_checkpoint(path, verify=False)


def test_tampered_weights_fail_the_hash_unless_not_verified(elastic_ckpt):
    path = elastic_ckpt()
    rewrite_weights(path, lambda w: w[DOWN].mul_(2))
    with pytest.raises(FlextronError, match="differs from the one saved"):
        load_checkpoint(path)
    load_checkpoint(path, verify=False)
    (path / "extra.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(FlextronError, match="extra.safetensors was not saved with it"):
        load_checkpoint(path)


@pytest.mark.parametrize("text, message", [
    ("null", "a JSON NoneType, not an object"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"format_version": 1, "family": "llama"}', "no 'elastic_space'"),
    ('{"format_version": 1, "family": "llama", "elastic_space": {"mlp": [[1.5]], "attn": [[1]]}}',
     "must be a list of integers"),
])
def test_manifest_must_be_an_object_with_the_required_keys(elastic_ckpt, text, message):
    path = elastic_ckpt()
    (path / MANIFEST).write_text(text)
    with pytest.raises(FlextronError, match=message):
        load_checkpoint(path)


def test_checkpoint_hidden_by_a_killed_overwrite_comes_back(elastic_ckpt):
    path = elastic_ckpt()
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.rename(path.with_name(f".{path.name}.old-{dead.pid}"))
    em, _, _ = load_checkpoint(path)
    assert path.is_dir() and em.space.n_layers == 2


def test_missing_weights(elastic_ckpt):
    path = elastic_ckpt()
    (path / "model.safetensors").unlink()
    with pytest.raises(FlextronError, match="no safetensors weights"):
        load_checkpoint(path)


def test_existing_output_is_refused_then_replaced_whole(elastic_ckpt):
    path = elastic_ckpt()
    em, tok, manifest = load_checkpoint(path)
    with pytest.raises(FlextronError, match="already exists"):
        save_checkpoint(em, tok, path, {})
    save_checkpoint(em, tok, path, {"source_model": "again"}, overwrite=True)
    assert json.loads((path / MANIFEST).read_text())["source_model"] == "again"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_old_checkpoint_intact(elastic_ckpt, monkeypatch):
    path = elastic_ckpt()
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    em, tok, _ = load_checkpoint(path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(em, tok, path, {}, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
