import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flextron import api
from flextron.budgets import select_subnet, uniform_subnet_for
from flextron.checkpoint import load_checkpoint
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.options import RouteOptions, TrainOptions
from flextron.routers import Routers, StaticRouter
from flextron.space import Budget, ElasticSpace
from flextron.train.elastic import sample_subnets
from flextron.train.loop import STATE_FILE, checkpoints, prune_checkpoints
from helpers import TINY_TEMPLATE, dead_pid, make_elastic, make_model, make_tokenizer, word_text

FAST = dict(seq_len=32, micro_batch=2, lr=1e-3, warmup_steps=1, eval_limit=0, dtype="fp32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_model("llama").save_pretrained(root / "hf")
    make_tokenizer().save_pretrained(root / "hf")
    data = root / "data.txt"
    data.write_text(word_text(6000))
    ckpt = api.convert(str(root / "hf"), root / "ckpt", calib_sequences=8, calib_seq_len=32, calib_data=str(data),
                       multiple=8, device="cpu", progress=False)
    return root, ckpt, data


def weights(run, step):
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def run_and_interrupt(setup, cfg: TrainOptions, name: str):
    """Run `name` straight through, and `name`-cut stopped by an interrupt after step 3."""
    from flextron.train.elastic import train

    root, ckpt, data = setup
    api.train(ckpt, root / name, cfg, [str(data)], device="cpu", progress=False)

    def interrupt(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ckpt, root / f"{name}-cut", cfg, [str(data)], callbacks=[interrupt], progress=False)


def test_resume_after_interruption_is_exact(setup):
    root, ckpt, data = setup
    cfg = TrainOptions(max_steps=4, save_every=2, **FAST)
    run_and_interrupt(setup, cfg, "straight")
    assert [p.name for p in (root / "straight-cut" / "checkpoints").iterdir()] == ["step-0000002"]
    api.train(ckpt, root / "straight-cut", cfg, [str(data)], device="cpu", resume=True, progress=False)
    a, b = weights(root / "straight", 4), weights(root / "straight-cut", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(ckpt / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training changed the weights
    rows = (root / "straight-cut" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_two_process_torchrun_equals_one_process(setup):
    root, ckpt, data = setup
    common = ["--max-steps", "1", "--seq-len", "32", "--lr", "1e-3", "--warmup-steps", "1", "--eval-limit", "0",
              "--dtype", "fp32", "--data", str(data), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "flextron", "train", str(ckpt), "--out", str(root / "one"),
                          "--micro-batch", "2", *common], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "flextron", "train", str(ckpt), "--out", str(root / "two"), "--micro-batch", "1",
                          *common], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("Trained 1 steps") == 1
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29534", "-m", "flextron", "train", str(ckpt), "--out", str(root / "fsdp"),
                           "--micro-batch", "1", "--fsdp", "--sharded-checkpoints", *common], capture_output=True,
                          text=True, env=env, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    a, start = weights(root / "one", 1), load_file(ckpt / "model.safetensors")
    for other in ("two", "fsdp"):
        b = weights(root / other, 1)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), (other, k)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    assert len(list((root / "fsdp" / "checkpoints" / "step-0000001" / "dcp").glob("*.distcp"))) == 2  # a shard a rank


def test_sharded_checkpoints_resume_exactly_and_end_as_an_elastic_checkpoint(setup):
    root, ckpt, data = setup
    cfg = TrainOptions(max_steps=4, save_every=2, sharded_checkpoints=True, **FAST)
    run_and_interrupt(setup, cfg, "sharded")
    mid = root / "sharded-cut" / "checkpoints" / "step-0000002"
    assert (mid / "dcp").is_dir() and not (mid / "model.safetensors").exists()  # shards only, nothing gathered
    api.train(ckpt, root / "sharded-cut", cfg, [str(data)], device="cpu", resume=True, progress=False)
    a, b = weights(root / "sharded", 4), weights(root / "sharded-cut", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (root / "sharded-cut" / "checkpoints" / "step-0000004" / "dcp").is_dir()
    em, _, _ = api.load(root / "sharded" / "checkpoints" / "step-0000004", device="cpu")  # the last is whole
    assert torch.equal(em.model.state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_sampling_rules():
    em = ElasticModel(make_model("llama"))
    b = em.blocks[0]
    em.set_space(ElasticSpace.default(2, b.mlp.n_units, b.attn.n_units, multiple=8))
    sandwich = sample_subnets(em, TrainOptions(max_steps=1, n_random=3), step=5)
    assert sandwich[0] == em.space.full() and sandwich[1] == em.space.smallest() and len(sandwich) == 5
    assert sandwich == sample_subnets(em, TrainOptions(max_steps=1, n_random=3), step=5)  # same on every rank
    for s in sample_subnets(em, TrainOptions(max_steps=1, sampling="uniform", n_random=8), step=1):
        assert len(set(s.mlp)) == 1 and len(set(s.attn)) == 1
    hetero = [s for step in range(20) for s in sample_subnets(em, TrainOptions(max_steps=1, n_random=2), step)[2:]]
    assert any(len(set(s.mlp)) > 1 for s in hetero)
    fixed = sample_subnets(em, TrainOptions(max_steps=1, sampling="fixed", budgets=(0.5,)), step=0)
    assert len(fixed) == 1 and fixed[0] != em.space.full()


def test_budgets_sampling_on_a_routed_checkpoint_trains_what_the_routers_deploy():
    em = make_elastic()
    em.routers = Routers(StaticRouter(em.space, (0.5, 1.0)).eval(), "params", RouteOptions(budgets=(0.5, 1.0)))
    routed = select_subnet(em, Budget(fraction=0.5))
    assert routed != uniform_subnet_for(em, Budget(fraction=0.5))[0]  # so the test tells the two apart
    cfg = TrainOptions(max_steps=1, sampling="budgets", budgets=(0.5,), full_prob=0.3)
    draws = [s for step in range(10) for s in sample_subnets(em, cfg, step)]
    n_routed, n_full = sum(s == routed for s in draws), sum(s == em.space.full() for s in draws)
    assert n_routed + n_full == len(draws) and n_routed > n_full > 0


def test_bad_inputs(setup, tmp_path):
    root, ckpt, data = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    cases = [
        (dict(max_steps=1, **FAST), [str(empty)], "holds no text"),
        (dict(max_steps=1, **{**FAST, "seq_len": 4096}), [str(data)], "beyond the model's context"),
        (dict(max_steps=1, **FAST), [str(tmp_path / "nope.txt")], "does not exist"),
    ]
    for kw, src, msg in cases:
        with pytest.raises(FlextronError, match=msg):
            api.train(ckpt, tmp_path / "run", TrainOptions(**kw), src, device="cpu", progress=False)
    with pytest.raises(FlextronError, match="exactly one of --max-steps or --tokens"):
        TrainOptions()


def test_resume_of_another_space_or_setting_is_refused(setup, tmp_path):
    root, ckpt, data = setup
    run = tmp_path / "run"
    api.train(ckpt, run, TrainOptions(max_steps=1, **FAST), [str(data)], device="cpu", progress=False)
    with pytest.raises(FlextronError, match="already holds a run"):
        api.train(ckpt, run, TrainOptions(max_steps=1, **FAST), [str(data)], device="cpu", progress=False)
    with pytest.raises(FlextronError, match="--seq-len was 32, now 16"):
        api.train(ckpt, run, TrainOptions(max_steps=2, **{**FAST, "seq_len": 16}), [str(data)], device="cpu",
                  resume=True, progress=False)
    info = json.loads((run / "run.json").read_text())
    info["source"]["elastic_space"]["mlp"][0] = [96]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(FlextronError, match="another model or elastic space"):
        api.train(ckpt, run, TrainOptions(max_steps=2, **FAST), [str(data)], device="cpu", resume=True,
                  progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    root, ckpt, data = setup
    run = tmp_path / "run"
    cfg = TrainOptions(max_steps=4, save_every=1, **{**FAST, "lr": 1e30, "clip": 1e30})
    with pytest.raises(FlextronError, match="the loss became nan") as err:
        api.train(ckpt, run, cfg, [str(data)], device="cpu", progress=False)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept and str(run / "checkpoints" / kept[-1]) in str(err.value)


def test_non_finite_weights_are_never_saved_or_named_good(setup, tmp_path, monkeypatch):
    root, ckpt, data = setup
    run = tmp_path / "run"
    real_step, calls = torch.optim.AdamW.step, []

    def step_that_breaks_the_weights_at_step_2(self, *a, **k):  # what --clip nan did, with a finite loss
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_breaks_the_weights_at_step_2)
    cfg = TrainOptions(max_steps=4, save_every=1, **FAST)
    with pytest.raises(FlextronError, match="last good checkpoint is ") as err:
        api.train(ckpt, run, cfg, [str(data)], device="cpu", progress=False)
    named = Path(str(err.value).split("last good checkpoint is ")[1].split(";")[0])
    assert named.name == "step-0000001"
    em, _, _ = load_checkpoint(named)
    assert all(torch.isfinite(p).all() for p in em.parameters())
    assert [p.name for p in checkpoints(run)] == ["step-0000001"]


def test_run_directory_that_is_a_file_is_refused(setup, tmp_path):
    root, ckpt, data = setup
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FlextronError, match="is a regular file, not a directory"):
        api.train(ckpt, tmp_path / "file", TrainOptions(max_steps=1, **FAST), [str(data)], device="cpu",
                  progress=False)
    assert (tmp_path / "file").read_text() == "keep"


def test_pruning_killed_midway_leaves_no_listed_half_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        d = tmp_path / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_text("w")
        (d / STATE_FILE).write_text("s")

    def killed_after_the_weights(path, *a, **k):
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("shutil.rmtree", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]


def test_activation_checkpointing_and_jsonl_data_give_the_same_step(setup, tmp_path):
    root, ckpt, data = setup
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in data.read_text().split("\n\n")))
    plain = api.train(ckpt, tmp_path / "plain", TrainOptions(max_steps=1, **FAST), [str(data)], device="cpu",
                      progress=False)
    ckpt_run = api.train(ckpt, tmp_path / "ac", TrainOptions(max_steps=1, activation_checkpointing=True, **FAST),
                         [str(jsonl)], device="cpu", progress=False)
    a = load_file(f"{plain['final']}/model.safetensors")
    b = load_file(f"{ckpt_run['final']}/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_activation_checkpointing_keeps_fewer_activations():
    from flextron.train.loop import enable_activation_checkpointing

    em = ElasticModel(make_model("llama"))
    em.train()
    ids = torch.randint(0, 128, (1, 8))

    def saved_bytes() -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = em(input_ids=ids, use_cache=False).logits.sum()
        loss.backward()
        return sum(total)

    before = saved_bytes()
    enable_activation_checkpointing(em)
    assert saved_bytes() < 0.5 * before


def test_sampling_in_a_depth_space_keeps_the_floor():
    em = make_elastic("llama", n_layers=4, min_layers=2)
    for sampling in ("sandwich", "uniform"):
        subs = [s for step in range(15) for s in sample_subnets(em, TrainOptions(max_steps=1, sampling=sampling,
                                                                                   n_random=4), step)]
        for s in subs:
            em.space.validate(s)
        assert any(0 in s.mlp for s in subs) and any(0 in s.attn for s in subs)
        if sampling == "uniform":
            assert all(len({w for w in s.mlp if w}) == 1 for s in subs)
        for s in subs:  # both skip the least important layers first: the nested depth family
            for kind in ("mlp", "attn"):
                chosen = getattr(s, kind)
                assert {i for i, c in enumerate(chosen) if c == 0} == set(em.space.order(kind)[: chosen.count(0)])
    assert sample_subnets(em, TrainOptions(max_steps=1), 0)[1] == em.space.smallest()
    assert em.space.smallest().mlp.count(0) == 2
    budgets = sample_subnets(em, TrainOptions(max_steps=1, sampling="budgets", budgets=(0.3,), full_prob=0.0), 0)
    assert all(0 in s.mlp for s in budgets)  # the smallest widths alone exceed 30% of the parameters


def test_sharded_teacher_is_frozen_and_computes_the_same(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from flextron.train.loop import shard_frozen

    teacher, ref = ElasticModel(make_model("llama")), ElasticModel(make_model("llama"))
    ids = torch.randint(0, 128, (2, 8))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shard_frozen(teacher.requires_grad_(False))
        with torch.no_grad():
            out = teacher(input_ids=ids).logits
    finally:
        dist.destroy_process_group()
    blocks = teacher.family.blocks(teacher.model)
    assert all(isinstance(p, DTensor) for b in blocks for p in b.parameters())
    assert not isinstance(teacher.model.get_output_embeddings().weight, DTensor)  # read by the chunked loss
    assert torch.allclose(out, ref(input_ids=ids).logits, atol=1e-6)


def test_mixed_token_passes_train_per_token_widths(setup, tmp_path):
    root, ckpt, data = setup
    em = ElasticModel(make_model("llama"))
    b = em.blocks[0]
    em.set_space(ElasticSpace.default(2, b.mlp.n_units, b.attn.n_units, multiple=8))
    cfg = TrainOptions(max_steps=1, n_random=1, mixed_tokens=2, seq_len=16, micro_batch=3)
    drawn = sample_subnets(em, cfg, step=4)
    # The sub-networks are those of a run without mixing (same draws first), then two per-position draws.
    assert drawn[:3] == sample_subnets(em, TrainOptions(max_steps=1, n_random=1), step=4)
    for picks in drawn[3:]:
        assert [t.shape for t in picks.mlp] == [(3, 16)] * 2 and [t.shape for t in picks.attn] == [(3, 1)] * 2
        assert all(len(t.unique()) > 1 for t in picks.mlp)  # widths differ between tokens
    assert torch.equal(drawn[3].mlp[0], sample_subnets(em, cfg, step=4)[3].mlp[0])  # same on every rank
    run = tmp_path / "run"
    api.train(ckpt, run, TrainOptions(max_steps=2, mixed_tokens=1, **FAST), [str(data)], device="cpu", progress=False)
    start, after = load_file(ckpt / "model.safetensors"), weights(run, 2)
    assert any(not torch.equal(after[k], start[k]) for k in after)
    with pytest.raises(FlextronError, match="--mixed-tokens was 1, now 0"):
        api.train(ckpt, run, TrainOptions(max_steps=3, **FAST), [str(data)], device="cpu", resume=True, progress=False)


def test_sampling_draws_hidden_sizes_the_smallest_with_the_smallest_network():
    em = make_elastic("llama")
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    cfg = TrainOptions(max_steps=1, n_random=3, mixed_tokens=2, micro_batch=4, seq_len=8)
    drawn = [sample_subnets(em, cfg, step) for step in range(8)]
    for subs in drawn:
        assert subs[0].hidden is None and subs[1] == em.space.smallest() and subs[1].hidden == 32
        for picks in subs[5:]:  # mixed passes: a hidden size per row, as the attention choices
            assert picks.hidden.shape == (4, 1) and picks.hidden.max() < 3
    assert {s.hidden for subs in drawn for s in subs[2:5]} == {32, 48, None}
    assert len({i for subs in drawn for picks in subs[5:] for i in picks.hidden.flatten().tolist()}) == 3
    plain = make_elastic("llama")  # without hidden choices: no hidden sizes
    assert all(p.hidden is None for p in sample_subnets(plain, cfg, 0)[5:])


def test_a_training_step_on_a_hidden_space_trains_the_smallest_hidden_size(setup, tmp_path, monkeypatch):
    import flextron.train.elastic as elastic

    root, _, data = setup
    ckpt = api.convert(str(root / "hf"), tmp_path / "ckpt", order="random", multiple=8, hidden_fractions=(0.5, 1.0),
                       hidden_multiple=16, device="cpu", progress=False)
    widths = []

    def distill_loss(student, *args):
        widths.append(student.shape[-1])
        return loss_of(student, *args)

    loss_of = elastic.distill_loss
    monkeypatch.setattr(elastic, "distill_loss", distill_loss)
    api.train(ckpt, tmp_path / "run", TrainOptions(max_steps=1, mixed_tokens=1, **FAST), [str(data)], device="cpu",
              progress=False)
    assert widths[:2] == [64, 32] and widths[-1] == 64  # full, smallest, ..., the mixed rows at full width, masked
    em, _, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000001")
    start = load_file(ckpt / "model.safetensors")
    assert em.space.hidden == [32, 64]
    assert not torch.equal(em.model.get_input_embeddings().weight, start["model.embed_tokens.weight"])


def test_a_kill_while_run_json_is_written_leaves_a_run_that_starts(setup, tmp_path):
    root, ckpt, data = setup
    run = tmp_path / "run"
    run.mkdir()
    (run / f".run.json.tmp-{dead_pid()}-k2j9.json").write_text('{"sour')  # what the killed writer left
    api.train(ckpt, run, TrainOptions(max_steps=1, **FAST), [str(data)], device="cpu", progress=False)
    assert (run / "run.json").is_file() and not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_damaged_resume_state_and_too_few_steps_are_refused_in_one_line(setup, tmp_path):
    root, ckpt, data = setup
    run = tmp_path / "run"
    api.train(ckpt, run, TrainOptions(max_steps=2, save_every=2, **FAST), [str(data)], device="cpu", progress=False)

    def refused(max_steps: int = 3) -> str:
        with pytest.raises(FlextronError) as err:
            api.train(ckpt, run, TrainOptions(max_steps=max_steps, save_every=2, **FAST), [str(data)], device="cpu",
                      resume=True, progress=False)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "already has 2 steps" in refused(max_steps=1) and "--max-steps / --tokens" in refused(max_steps=1)
    good = (run / "run.json").read_text()
    no_source = json.dumps({k: v for k, v in json.loads(good).items() if k != "source"})
    for text in ("{x", "null", no_source, '{"source": {}, "config": {}, "world_size": 1}'):
        (run / "run.json").write_text(text)
        msg = refused()
        assert f"{run / 'run.json'} is damaged" in msg and "start a new --out" in msg, msg
    (run / "run.json").write_text(good)
    state_file = run / "checkpoints" / "step-0000002" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "scheduler"}, state_file)
    msg = refused()
    assert f"{state_file} lacks 'scheduler'" in msg and f"delete {run / 'checkpoints'}" in msg, msg


@pytest.mark.parametrize("sharded", [False, True])
def test_a_damaged_newest_step_gives_way_to_the_older_one(setup, capsys, sharded):
    root, ckpt, data = setup
    cfg, name = TrainOptions(max_steps=4, save_every=1, sharded_checkpoints=sharded, **FAST), f"fallback-{sharded}"
    run_and_interrupt(setup, cfg, name)
    cut = root / f"{name}-cut"
    assert [p.name for p in checkpoints(cut)] == ["step-0000001", "step-0000002"]
    newest = cut / "checkpoints" / "step-0000002"
    torn = next((newest / "dcp").glob("*.distcp")) if sharded else newest / STATE_FILE
    torn.write_bytes(torn.read_bytes()[:100])
    capsys.readouterr()
    api.train(ckpt, cut, cfg, [str(data)], device="cpu", resume=True, progress=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "step-0000002" in line]
    assert len(said) == 1 and said[0].endswith("resuming from step-0000001"), said
    a, b = weights(root / name, 4), weights(cut, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (cut / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_a_kill_during_the_final_prune_leaves_nothing_once_the_run_completes(setup, tmp_path):
    root, ckpt, data = setup
    run, cfg = tmp_path / "run", TrainOptions(max_steps=1, **FAST)
    api.train(ckpt, run, cfg, [str(data)], device="cpu", progress=False)
    doomed = run / "checkpoints" / f".step-0000000.tmp-{dead_pid()}-rm"  # a pruned step, half deleted
    (doomed / "dcp").mkdir(parents=True)
    (doomed / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    api.train(ckpt, run, cfg, [str(data)], device="cpu", resume=True, progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]


def test_an_instruct_model_distils_on_its_own_answers_beside_the_text(setup, tmp_path, monkeypatch):
    """--chat auto on a tokenizer with a chat template: the teacher answers the prompts once (cached), and
    --chat-mix of each step's rows are those conversations; --chat-loss assistant masks the rest of them."""
    import flextron.train.elastic as elastic

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, _, data = setup
    tok = make_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    make_model("llama").save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    ckpt = api.convert(str(tmp_path / "hf"), tmp_path / "ckpt", calib_sequences=4, calib_seq_len=32,
                       calib_data=str(data), multiple=8, device="cpu", progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"w{i} w{i + 1}\n" for i in range(10, 90)))
    masks = []

    def distill_loss(student, teacher, ids, cfg, s_head=None, t_head=None, mask=None):
        masks.append(mask)
        return loss_of(student, teacher, ids, cfg, s_head, t_head, mask)

    loss_of = elastic.distill_loss
    monkeypatch.setattr(elastic, "distill_loss", distill_loss)
    cfg = TrainOptions(max_steps=2, n_random=0, chat_prompts=str(prompts), chat_tokens=6,
                       chat_mix=0.5, chat_loss="assistant", **{**FAST, "micro_batch": 4})
    api.train(ckpt, tmp_path / "run", cfg, [str(data)], device="cpu", progress=False)
    answers = [json.loads(line) for line in next((tmp_path / "cache" / "flextron" / "chat").glob("*.jsonl"))
               .read_text().splitlines()]
    assert 0 < len(answers) < 80 and answers[0]["prompt"] == "w10 w11"  # enough for the run's chat rows, in order
    mask = masks[0]
    assert mask.shape == (4, 32) and mask[[0, 2]].all()  # rows 1 and 3 of every 4 are chat
    assert 0 < mask[[1, 3]].sum() < mask[[1, 3]].numel()  # the prompts and turn marks are not learned
    with pytest.raises(FlextronError, match="--chat-loss was assistant, now all"):
        api.train(ckpt, tmp_path / "run", replace(cfg, chat_loss="all"), [str(data)], device="cpu", progress=False,
                  resume=True)
    masks.clear()
    api.train(ckpt, tmp_path / "plain", replace(cfg, chat="none"), [str(data)], device="cpu", progress=False)
    assert masks[0] is None


def test_chat_options_are_checked():
    with pytest.raises(FlextronError, match="--chat takes auto, self, none or a .jsonl"):
        TrainOptions(max_steps=1, chat="chats.txt")


def test_full_weight_weighs_the_full_sub_networks_gradient():
    """--full-weight w: the step's gradient is (w * the full model's + each other sub-network's) / (w + others)."""
    from flextron.train.elastic import distill_step

    em, teacher = make_elastic(), make_elastic()
    teacher.requires_grad_(False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    full, small = em.space.full(), em.space.smallest()
    torch.manual_seed(0)
    with torch.no_grad():  # at the start the full model is the teacher and has no gradient: move it away
        for p in em.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def grads(subnets, full_weight):
        em.zero_grad(set_to_none=True)
        loss, _ = distill_step(em, em, teacher, [ids], subnets, TrainOptions(max_steps=1, full_weight=full_weight,
                                                                                **FAST), torch.device("cpu"))
        return loss, torch.cat([p.grad.flatten() for p in em.parameters() if p.grad is not None])

    loss_full, g_full = grads([full], 1.0)
    loss_small, g_small = grads([small], 1.0)
    loss, g = grads([full, small], 3.0)
    assert loss == pytest.approx((3 * loss_full + loss_small) / 4, rel=1e-5)
    torch.testing.assert_close(g, (3 * g_full + g_small) / 4, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g, (g_full + g_small) / 2, rtol=1e-3, atol=1e-6)


def test_a_larger_adam_eps_moves_weights_with_small_gradients_less(setup, tmp_path):
    """AdamW's first step moves each weight by about lr * g / (|g| + eps): with eps far above the gradients
    the step shrinks with them, with eps 1e-8 every weight that has a gradient moves by about lr."""
    root, ckpt, data = setup
    before = load_file(Path(ckpt) / "model.safetensors")

    def moved(eps: float) -> torch.Tensor:
        final = api.train(ckpt, tmp_path / f"eps{eps}", TrainOptions(max_steps=1, adam_eps=eps, **FAST), [str(data)],
                          device="cpu", progress=False)["final"]
        after = load_file(Path(final) / "model.safetensors")
        return torch.cat([(after[k].float() - before[k].float()).abs().flatten() for k in before])

    tiny, damped = moved(1e-8), moved(1.0)
    assert 0 < damped.sum() < 0.01 * tiny.sum()
    with pytest.raises(FlextronError, match="--adam-eps"):
        TrainOptions(max_steps=1, adam_eps=0.0)
