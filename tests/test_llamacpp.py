"""The llama.cpp runtime: timing GGUFs, the llama.cpp latency table, the missing-extra message."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flextron import api, llamacpp
from flextron.budgets import budget_target
from flextron.cli import main
from flextron.deployment import Deployment
from flextron.errors import FlextronError
from flextron.gguf import write_gguf
from flextron.space import Budget, Subnet
from helpers import make_bpe_tokenizer, make_elastic

TINY = dict(context=16, decode_steps=2, repeats=1)


def test_measure_times_prefill_and_decode(tmp_path):
    small, deep = tmp_path / "2-layers.gguf", tmp_path / "16-layers.gguf"
    for path, n_layers in ((small, 2), (deep, 16)):
        em = make_elastic("llama", n_layers=n_layers)
        write_gguf(em, make_bpe_tokenizer(), em.space.full(), path)
    t = llamacpp.measure(small, threads=1, **TINY)
    assert t["prefill_ms"] > 0 and t["decode_ms"] > 0
    # The times follow the work: 8x the layers, 16x the context. Each file's fastest of 5 interleaved
    # rounds (a busy shared machine only adds time), against margins far below what these take here
    # (the deep model 5-30x the time of the small one, 16x the context 10-100x the prefill).
    def fastest(runs: list[dict], key: str) -> float:
        return min(r[key] for r in runs)

    runs = llamacpp.measure_rounds([small, deep], 5, context=32, decode_steps=8, threads=1)
    for key in ("prefill_ms", "decode_ms"):
        assert fastest(runs[1], key) > 2 * fastest(runs[0], key), key
    short, long = (llamacpp.measure_rounds([small], 5, context=n, decode_steps=2, threads=1)[0] for n in (8, 128))
    assert fastest(long, "prefill_ms") > 4 * fastest(short, "prefill_ms")


def test_measure_rounds_times_files_in_turn_with_alternating_order(tmp_path, monkeypatch):
    em = make_elastic("llama")
    paths = [tmp_path / "full.gguf", tmp_path / "small.gguf"]
    for path, subnet in zip(paths, (em.space.full(), em.space.smallest())):
        write_gguf(em, make_bpe_tokenizer(), subnet, path)
    runs = llamacpp.measure_rounds(paths, 3, context=16, decode_steps=2, threads=1)
    assert [len(r) for r in runs] == [3, 3] and all(t["decode_ms"] > 0 < t["prefill_ms"] for r in runs for t in r)
    order, time_once = [], llamacpp._time_once

    def recording(llm, ids, decode_steps):
        order.append(llm.model_path)
        return time_once(llm, ids, decode_steps)

    monkeypatch.setattr(llamacpp, "_time_once", recording)
    llamacpp.measure_rounds(paths, 3, context=16, decode_steps=2, threads=1)
    full, small = map(str, paths)
    assert order == [small, full, full, small, small, full, full, small]  # warm-up round, then 3 alternating


def test_against_gives_medians_and_the_median_of_per_round_ratios(monkeypatch):
    # Round 3 is a slow spell that hits both files: the ratio's median ignores it, the times' do not.
    ref = [{"decode_ms": d, "prefill_ms": 100.0} for d in (10.0, 10.0, 20.0)]
    got = [{"decode_ms": d, "prefill_ms": 50.0} for d in (5.0, 6.0, 12.0)]
    monkeypatch.setattr(llamacpp, "measure_rounds", lambda paths, rounds, *a: [ref, got][: len(paths)])
    full, sub, ratio = llamacpp.against("full.gguf", "sub.gguf", 3)
    assert full == {"decode_ms": 10.0, "prefill_ms": 100.0} and sub == {"decode_ms": 6.0, "prefill_ms": 50.0}
    assert ratio == {"decode_ms": 0.6, "prefill_ms": 0.5}


def test_load_defaults_to_llamacpps_own_settings_and_exact_turns_them_off(tmp_path):
    import llama_cpp

    em = make_elastic("llama")
    write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "m.gguf")
    on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    for exact, fa in ((False, on), (True, off)):
        with llamacpp.opened(tmp_path / "m.gguf", n_ctx=32, threads=1, exact=exact) as llm:
            assert llm.context_params.flash_attn_type == fa
            want = llama_cpp.GGML_TYPE_F32 if exact else llama_cpp.GGML_TYPE_F16
            assert (llm.context_params.type_k, llm.context_params.type_v) == (want, want)


def test_llama_cpp_processes_a_q8_0_prompt_as_the_f16_file_up_to_rounding(tmp_path):
    """A prompt of many tokens at q8_0 runs llama.cpp's AMX kernels on CPUs that report AMX. Some VMs report
    it and fault on its first tile instruction: a llama.cpp built with AMX dies there (signal 11), so each
    file is scored in a subprocess and a crash fails this test with the fix, not the whole run."""
    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    ids = [str(i) for i in range(3, 35)]
    score = ("import sys, numpy as np; from flextron import llamacpp; np.save(sys.argv[2], llamacpp.logits("
             "llamacpp.load(sys.argv[1], all_logits=True), [int(i) for i in sys.argv[3:]]))")
    for outtype in ("f16", "q8_0"):
        path = write_gguf(em, tok, em.space.full(), tmp_path / f"{outtype}.gguf", outtype)["path"]
        run = subprocess.run([sys.executable, "-c", score, str(path), str(tmp_path / f"{outtype}.npy"), *ids],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (f"llama.cpp died scoring a {outtype} prompt (exit {run.returncode}); where the "
                                     "CPU reports AMX, rebuild llama-cpp-python without it (scripts/setup.sh --dev "
                                     f"does): {run.stderr[-500:]}")
    f16, q8 = np.load(tmp_path / "f16.npy"), np.load(tmp_path / "q8_0.npy")
    assert f16.shape == (len(ids), em.config.vocab_size)
    assert np.abs(q8 - f16).max() < 0.05 * np.abs(f16).max()


def test_llama_cpp_allocates_the_same_buffers_whatever_the_weight_type(tmp_path):
    """The output and compute buffers, which memory budgets add to the weights and the KV cache, do not depend
    on how the weights are stored: one estimate (`footprint.compute_bytes`) serves every weight type."""
    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    buffers = set()
    for outtype in ("f32", "q8_0", "q4_k_m"):
        path = write_gguf(em, tok, em.space.full(), tmp_path / f"{outtype}.gguf", outtype)["path"]
        got = llamacpp.allocated(path, Deployment(outtype, context=1000, batch=2))
        buffers.add((got["output"], got["compute"]))
    assert len(buffers) == 1 and buffers.pop()[1] > 0  # (the tiny vocabulary's logits round to 0.00 MiB)


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(FlextronError, match="not a GGUF file"):
        llamacpp.load(tmp_path / "none.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(FlextronError, match="llama.cpp cannot load"):
        llamacpp.load(tmp_path / "bad.gguf")


@pytest.mark.parametrize("batch", [1, 2])
def test_allocated_is_what_llama_cpp_sizes_for_the_model_kv_cache_and_logits(batch, tmp_path):
    """The model size is the bytes of the GGUF's tensors; the KV cache keys and values of every layer's KV
    heads for the context's cells, which llama.cpp pads to 256 (llama-context.cpp), f16; the output buffer
    f32 logits of one token per sequence. llama.cpp logs the buffers in MiB to 2 decimals."""
    import gguf

    em = make_elastic("llama")
    path = write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "m.gguf", "q8_0")["path"]
    got = llamacpp.allocated(path, Deployment("q8_0", context=1000, batch=batch))
    cfg = em.config
    assert got["weights"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    cells = 1024 * batch  # 1000 x batch padded to 256, each sequence's 1000 too
    assert got["kv"] == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cells
    assert got["output"] == pytest.approx(4 * cfg.vocab_size * batch, abs=0.005 * 2**20)
    assert got["compute"] > 0
    with pytest.raises(FlextronError, match="not a GGUF file"):
        llamacpp.allocated(tmp_path / "none.gguf", Deployment())
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(FlextronError, match="llama.cpp cannot load"):
        llamacpp.allocated(tmp_path / "bad.gguf", Deployment())


def test_missing_runtime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(FlextronError, match=r"flextron\[gguf\]"):
        llamacpp.runtime_version()


def test_profile_in_llamacpp_stores_a_named_table_budgets_use(elastic_ckpt, capsys):
    ckpt = elastic_ckpt(bpe=True)
    args = ["profile", str(ckpt), "--runtime", "llama.cpp", "--threads", "1", "--outtype", "f16",
            "--samples", "5", "--validate", "2", "--context", "16", "--decode-steps", "2", "--repeats", "1",
            "--rounds", "3",  # each timing the median of 3 rounds: a slow spell of a busy machine cannot drag the fit
            "--force"]  # a tiny model's microseconds on a shared machine need not pass the noise check
    assert main(args) == 0
    assert "llama.cpp" in capsys.readouterr().out
    table = json.loads((ckpt / "latency.json").read_text())  # as stored
    assert table["runtime"].startswith("llama.cpp (llama-cpp-python ")
    assert (table["threads"], table["outtype"]) == (1, "f16")
    roles = [m["role"] for m in table["measurements"]]
    assert roles.count("fit") >= 5 and roles.count("validate") == table["validation"]["decode_ms"]["n"] == 2
    # The uniform sub-networks are timed again as written by `export` (llama), the rest only as deci.
    assert table["stock"]["graph"] == "llama" and roles.count("fit-stock") >= 2
    assert all(len(set(m["subnet"]["mlp"])) == 1 for m in table["measurements"] if m["role"].endswith("-stock"))
    em, _, _ = api.load(ckpt, "cpu")  # latency budgets now mean llama.cpp decode ms
    cost, target = budget_target(em, Budget.parse("latency_ms=1e6"))

    def by_table(d: dict, s) -> float:
        return d["overhead"] + sum(d["mlp"][str(m)] + d["attn"][str(a)] for m, a in zip(s.mlp, s.attn))

    full, mixed = em.space.full(), Subnet(mlp=[96, 48], attn=[2, 1])
    # The full model is priced in the graph its table says decodes it faster (export writes it there).
    full_ms = min(by_table(t["decode_ms"], full) for t in (table, table["stock"]))
    assert cost.metric == "latency_ms" and cost.full == pytest.approx(full_ms)
    assert cost(mixed) == pytest.approx(by_table(table["decode_ms"], mixed))
    with pytest.raises(FlextronError, match="batch 1"):
        api.profile(ckpt, runtime="llama.cpp", batch=2, **TINY)


def test_profile_at_a_quantizer_type_times_it_and_its_latency_budgets_export_at_it(elastic_ckpt, tmp_path, monkeypatch,
                                                                                   capsys):
    """`profile --outtype q4_k_m` times llama.cpp-quantized files and latency.json records the type; a GGUF
    export at another type is refused for a latency budget (one line, both fixes), not for others."""
    import gguf

    ckpt = elastic_ckpt(bpe=True)
    timed, load = [], llamacpp.load

    def recording(path, *args, **kwargs):
        timed.append(gguf.GGUFReader(path).fields["general.file_type"].contents())
        return load(path, *args, **kwargs)

    monkeypatch.setattr(llamacpp, "load", recording)
    assert main(["profile", str(ckpt), "--runtime", "llama.cpp", "--threads", "1", "--outtype", "q4_k_m", "--samples",
                 "5", "--validate", "2", "--context", "16", "--decode-steps", "2", "--repeats", "1", "--rounds", "3",
                 "--force"]) == 0  # as the f16 profile above
    assert "q4_k_m" in capsys.readouterr().out
    assert len(timed) > 4 and set(timed) == {gguf.LlamaFileType.MOSTLY_Q4_K_M}
    assert json.loads((ckpt / "latency.json").read_text())["outtype"] == "q4_k_m"
    out = tmp_path / "m.gguf"
    export = ["export", str(ckpt), "--format", "gguf", "--out", str(out), "--overwrite"]
    for budget in ("latency_ms=1e6", "1.0"):  # a bare fraction is a latency budget where a table is stored
        assert main([*export, "--budget", budget]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "timed at q4_k_m weights, not f32" in err and "--outtype q4_k_m" in err
        assert "flextron profile CKPT --runtime llama.cpp --outtype f32" in err and not out.exists()
    assert main([*export, "--budget", "latency_ms=1e6", "--outtype", "q4_k_m"]) == 0
    assert main([*export, "--budget", "params=50%", "--outtype", "f16"]) == 0


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_profile_in_llamacpp_of_a_family_without_a_per_layer_graph_times_uniform_sub_networks(kind, elastic_ckpt):
    ckpt = elastic_ckpt(kind, bpe=True)
    table = api.profile(ckpt, runtime="llama.cpp", threads=1, samples=5, validate=2, rounds=3, force=True, **TINY)
    assert table.settings["graphs"] == "uniform only" and table.stock is None
    subnets = [m["subnet"] for m in table.measurements]
    assert all(len(set(s["mlp"])) == len(set(s["attn"])) == 1 for s in subnets)
    assert len(subnets) == len({str(s) for s in subnets}) >= 5
    em, _, _ = api.load(ckpt, "cpu")
    cost, _ = budget_target(em, Budget.parse("latency_ms=1e6"))
    assert cost.full >= cost.smallest > 0  # tiny models: widths may time alike
    depth = elastic_ckpt(kind, name="depth", bpe=True, min_layers=1)
    with pytest.raises(FlextronError, match="profile a checkpoint converted without --depth"):
        api.profile(depth, runtime="llama.cpp", threads=1, samples=5, validate=2, **TINY)


def test_profile_in_llamacpp_times_every_hidden_size_in_both_graphs(elastic_ckpt):
    ckpt = elastic_ckpt(bpe=True, hidden=True)
    # Three rounds (each timing the median of three): a slow spell of a shared machine, many times a tiny
    # model's microseconds, cannot drag the fit.
    table = api.profile(ckpt, runtime="llama.cpp", threads=1, samples=5, validate=2, rounds=3, force=True, **TINY)

    def sizes(role: str) -> set:
        return {m["subnet"].get("hidden") for m in table.measurements if m["role"] == role}

    # Timed as deci and, the uniform ones, in llama at their hidden size; the width cover at both ends.
    assert sizes("fit") >= {32, None} and sizes("fit-stock") >= {32, None}
    assert table.hidden_pricing == "measured"
    assert all(g.quantity(k).proportional is not None for _, g in table.graphs() for k in ("decode_ms", "prefill_ms"))
    em, _, _ = api.load(ckpt, "cpu")
    cost, _ = budget_target(em, Budget.parse("latency_ms=1e6"))
    small, mixed = em.space.smallest(), Subnet(mlp=[96, 48], attn=[2, 1], hidden=48)
    for s in (small, mixed):
        at = [cost(Subnet(mlp=s.mlp, attn=s.attn, hidden=em.space.hidden_at(i))) for i in range(3)]
        assert at == sorted(at) and at[0] > 0  # a smaller hidden size never costs more
    gpt2 = elastic_ckpt("gpt2", name="gpt2", bpe=True, hidden=True)
    with pytest.raises(FlextronError, match="cannot run gpt2 sub-networks below the full hidden size 64"):
        api.profile(gpt2, runtime="llama.cpp", threads=1, samples=5, validate=2, **TINY)


def test_profile_in_llamacpp_refuses_a_table_timed_on_a_busy_machine(elastic_ckpt, monkeypatch):
    ckpt = elastic_ckpt(bpe=True)
    calls = []

    def busy_after_ten(llm, ids, decode_steps):  # stands in for llama.cpp: every file 3x slower after 10 timings
        calls.append(llm.model_path)
        slow = 3.0 if len(calls) > 10 else 1.0
        return {"decode_ms": slow, "prefill_ms": 10 * slow}

    monkeypatch.setattr(llamacpp, "_time_once", busy_after_ten)
    with pytest.raises(FlextronError, match=r"looks noisy .*the full model's \d+ timings from start to end spread "
                                            r"decode 200\.0%"):
        api.profile(ckpt, runtime="llama.cpp", threads=1, samples=5, validate=2, **TINY)
    assert len(calls) > 10 and not (ckpt / "latency.json").exists()


def known_costs(monkeypatch, em, work, slow) -> None:
    """llama.cpp's timings replaced by a known cost: `work(subnet)` for the file of that sub-network (the full
    model's for the reference), times `slow(number of sub-network files written so far)`, which hits every
    file loaded at that point, the reference included, as a slow spell of a busy machine does."""
    by_path, load, write, timed = {}, llamacpp.load, llamacpp.write_gguf, []

    def loading(path, *args, **kwargs):  # remember which sub-network each loaded file is
        llm = load(path, *args, **kwargs)
        by_path[llm.model_path] = timed[-1] if timed and "subnet" in str(path) else em.space.full()
        return llm

    def writing(em_, tok, subnet, path, *args, **kwargs):
        timed.append(subnet)
        return write(em_, tok, subnet, path, *args, **kwargs)

    def timing(llm, ids, decode_steps):
        ms = work(by_path[llm.model_path]) * slow(len(timed))
        return {"decode_ms": ms, "prefill_ms": 10 * ms}

    monkeypatch.setattr(llamacpp, "load", loading)
    monkeypatch.setattr(llamacpp, "write_gguf", writing)
    monkeypatch.setattr(llamacpp, "_time_once", timing)


def additive_work(subnet: Subnet) -> float:
    """Decode ms of a tiny model's sub-network by a known additive cost."""
    return 1.0 + sum(m / 96 for m in subnet.mlp) + sum(a / 4 for a in subnet.attn)


def test_profile_in_llamacpp_times_each_sub_network_beside_the_full_model(elastic_ckpt, monkeypatch):
    """Each timing is the sub-network's median ratio to the full model (kept loaded) within rounds, times the full
    model's own time at the start: a slow load or spell that hits both moves neither the table nor its fit."""
    ckpt = elastic_ckpt(bpe=True)
    em, _, _ = api.load(ckpt, "cpu")
    full = em.space.full()
    known_costs(monkeypatch, em, additive_work, lambda n: 4.0 if n % 3 == 0 else 1.0)  # a load in three 4x slower
    table = api.profile(ckpt, runtime="llama.cpp", threads=1, samples=6, validate=2, rounds=1, force=True, **TINY)
    assert table.settings["relative_to"] == "the full model as deci"
    fitted = [m for m in table.measurements if m["role"] == "fit"]
    assert len(fitted) >= 6
    scale = table.data["reference"]["decode_ms"]
    for m in fitted:  # the slow loads are gone: exactly the known cost relative to the full model's
        s = Subnet(**m["subnet"])
        assert m["decode_ms"] == pytest.approx(scale * additive_work(s) / additive_work(full))
        assert m["prefill_ms"] == pytest.approx(10 * m["decode_ms"])
    assert table.main.validation["decode_ms"]["median_pct"] == pytest.approx(0, abs=1e-6)  # the cost is additive


def test_refine_times_the_served_sub_networks_on_the_tables_scale_and_refits(trained_routers, tmp_path, monkeypatch,
                                                                              capsys):
    """`profile --refine` adds the sub-networks the routers serve at their grid budgets to the stored table, timed
    beside a fresh load of its reference on a machine 3x slower than the profile's, and stored as the same fraction
    of the full model as the profile's rows: the table's scale, settings and unseen validation stay as they were."""
    from flextron.budgets import select_subnet
    from flextron.checkpoint import save_checkpoint

    em, routers, _, _ = trained_routers
    ckpt = save_checkpoint(em, make_bpe_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    full = em.space.full()

    def work(s: Subnet) -> float:  # wide layers run faster than the sum of their parts: not additive
        return additive_work(s) - 0.2 * sum(m == 96 for m in s.mlp) ** 2

    known_costs(monkeypatch, em, work, lambda n: 1.0)
    args = ["profile", str(ckpt), "--runtime", "llama.cpp", "--threads", "1", "--samples", "6", "--validate", "2",
            "--context", "16", "--decode-steps", "2", "--repeats", "1", "--force", "--no-verify"]
    assert main(args) == 0
    before = json.loads((ckpt / "latency.json").read_text())
    known_costs(monkeypatch, em, work, lambda n: 3.0)
    assert main([*args[:2], "--refine", "--force", "--no-verify"]) == 0
    out = capsys.readouterr().out
    after = json.loads((ckpt / "latency.json").read_text())
    served = [select_subnet(em, Budget(metric=routers.metric, fraction=b)) for b in routers.config.budgets]
    measured = [Subnet(**m["subnet"]) for m in before["measurements"]]
    new = [s for i, s in enumerate(served) if s not in measured and s not in served[:i]]
    added = after["measurements"][len(before["measurements"]):]
    assert after["measurements"][: len(before["measurements"])] == before["measurements"]
    assert new and [Subnet(**m["subnet"]) for m in added] == new
    scale = before["reference"]["decode_ms"]
    for m in added:
        assert m["role"] == "fit" and m["routed"]
        assert m["decode_ms"] == pytest.approx(scale * work(Subnet(**m["subnet"])) / work(full))
    assert after["reference"] == before["reference"] and after["threads"] == 1 and after["noise"] == before["noise"]
    assert after["validation"]["decode_ms"]["n"] == 2 and after["stock"] == before["stock"]
    (refined,) = after["refined"]
    assert refined["subnets"] == len(new) and refined["noise"]["passed"]
    assert f"on the {len(new)} routed sub-networks added" in out
    em2, _, _ = api.load(ckpt, "cpu")
    assert len(em2.latency.measurements) == len(after["measurements"])  # stored, and loads as a table
    assert main([*args[:2], "--refine", "--force", "--no-verify"]) == 2  # nothing new the second time
    assert "timed in the latency table already" in capsys.readouterr().err


def test_refine_needs_a_llamacpp_table_and_routers(elastic_ckpt, capsys):
    ckpt = elastic_ckpt(bpe=True)
    assert main(["profile", str(ckpt), "--refine", "--no-verify"]) == 2
    assert "--refine refits a llama.cpp latency table" in capsys.readouterr().err
    api.profile(ckpt, runtime="llama.cpp", threads=1, samples=5, validate=2, force=True, **TINY)
    before = (ckpt / "latency.json").read_bytes()
    assert main(["profile", str(ckpt), "--refine", "--no-verify"]) == 2
    assert "has no routers; run flextron route" in capsys.readouterr().err
    assert (ckpt / "latency.json").read_bytes() == before
