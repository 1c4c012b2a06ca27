"""The elastic space (flextron.space): budgets, the default and depth spaces, their checks, and the
random sub-networks drawn from them."""

import statistics

import pytest

from flextron.errors import FlextronError
from flextron.space import Budget, ElasticSpace, Subnet


@pytest.mark.parametrize("text,metric,fraction,value", [
    ("0.6", "auto", 0.6, None),
    ("60%", "auto", 0.6, None),
    (0.5, "auto", 0.5, None),
    ("latency_ms=25", "latency_ms", None, 25.0),
    ("params=80e6", "params", None, 80e6),
    ("flops=40%", "flops", 0.4, None),
    ("latency_ms=0.8", "latency_ms", None, 0.8),
    ("kv_bytes=50%", "kv_bytes", 0.5, None),
    (" 1.0 ", "auto", 1.0, None),
    ("memory_mb=60", "memory_mb", None, 60.0),  # megabytes of 10^6 bytes
    ("memory_mb=50%", "memory_mb", 0.5, None),
    ("memory=512MB", "memory_mb", None, 512.0),
    ("memory=1.5GB", "memory_mb", None, 1500.0),
    ("memory=512 MiB", "memory_mb", None, 2**29 / 1e6),
    ("Memory=2gib", "memory_mb", None, 2**31 / 1e6),
    ("memory=800KB", "memory_mb", None, 0.8),
    ("memory=50%", "memory_mb", 0.5, None),
])
def test_budget_parse(text, metric, fraction, value):
    b = Budget.parse(text)
    assert (b.metric, b.fraction, b.value) == (metric, fraction, value)
    assert Budget.parse(str(b)) == b  # what eval and the report write reads back the same


def test_memory_budgets_read_as_megabytes():
    assert str(Budget.parse("memory=1.5GB")) == "memory_mb=1500"
    assert str(Budget.parse("memory=512MiB")) == "memory_mb=536.870912"


@pytest.mark.parametrize("text,match", [
    ("abc", "cannot read budget"),
    ("speed=0.5", "unknown budget metric"),
    ("0", "must be positive"),
    ("-0.5", "cannot read budget"),
    ("50%%", "cannot read budget"),
    ("1.5", "above the full model"),
    ("120%", "above the full model"),
    ("memory=512", "give a size with its unit"),  # a number alone: say which
    ("memory=5TB", "give a size with its unit"),
    ("memory=MB", "cannot read budget"),
    ("memory_mb=512MB", "memory_mb counts megabytes"),
    ("params=5MB", "cannot read budget"),
    ("mem=5", "unknown budget metric"),
    ("memory=0GB", "must be positive"),
])
def test_budget_parse_rejects(text, match):
    with pytest.raises(FlextronError, match=match):
        Budget.parse(text)


def test_default_space_smollm_shape():
    space = ElasticSpace.default(30, 1536, 3)
    assert space.mlp[0] == [384, 768, 1152, 1536]
    assert space.attn[0] == [1, 2, 3]
    assert space.n_layers == 30
    assert space.centroid() == Subnet(mlp=[1152] * 30, attn=[2] * 30)


def test_default_space_rounds_to_multiple_and_keeps_full():
    space = ElasticSpace.default(1, 1000, 12, multiple=64)
    assert space.mlp[0] == [256, 512, 768, 1000]
    assert space.attn[0] == [3, 6, 9, 12]


def test_space_rejects_bad_lists():
    with pytest.raises(FlextronError, match="ascending"):
        ElasticSpace(mlp=[[64, 32]], attn=[[1]])
    with pytest.raises(FlextronError, match="fraction"):
        ElasticSpace.default(1, 128, 2, mlp_fractions=(0.0, 1.0))


def test_space_roundtrip_and_validate():
    space = ElasticSpace(mlp=[[32, 64], [16, 64]], attn=[[1, 2], [2]])
    assert ElasticSpace.from_dict(space.to_dict()) == space
    space.validate(Subnet(mlp=[32, 16], attn=[1, 2]))
    with pytest.raises(FlextronError, match="layer 1 attention units 1"):
        space.validate(Subnet(mlp=[32, 16], attn=[1, 1]))
    with pytest.raises(FlextronError, match="the model has 2 layers"):
        space.validate(Subnet(mlp=[32], attn=[1]))


@pytest.mark.parametrize("value", [float("inf"), 2.5, True, "8"])
def test_space_from_json_takes_only_integers(value):
    with pytest.raises(FlextronError, match="must be a list of integers"):
        ElasticSpace.from_dict({"mlp": [[value, 16]], "attn": [[1, 2]]})
    with pytest.raises(FlextronError, match="an elastic space is"):
        ElasticSpace.from_dict([[8]])


def test_depth_space_skips_least_important_first_within_the_floor():
    space = ElasticSpace.default(4, 96, 4, multiple=8).with_depth(
        min_layers=2, skip_order={"mlp": [2, 0, 3, 1], "attn": [1, 3, 2, 0]})
    assert space.depth and space.mlp[0] == [0, 24, 48, 72, 96] and space.attn[0] == [0, 1, 2, 3, 4]
    assert space.smallest() == Subnet(mlp=[0, 24, 0, 24], attn=[1, 0, 1, 0])
    assert space.uniform(3, 3, 1, 0) == Subnet(mlp=[96, 96, 0, 96], attn=[4] * 4)
    assert space.uniform(0, 1, 9, 9) == space.uniform(0, 1, 2, 2)  # the floor caps the skips
    assert space.centroid() == Subnet(mlp=[72] * 4, attn=[3] * 4)  # the middle width, not a skip
    # floor() restores the most important skipped layers first, at their smallest width.
    assert space.floor(Subnet(mlp=[0, 0, 0, 96], attn=[0, 0, 0, 0])) == Subnet(mlp=[0, 24, 0, 96],
                                                                              attn=[1, 0, 1, 0])
    assert ElasticSpace.from_dict(space.to_dict()) == space
    assert ElasticSpace.default(30, 1536, 3).with_depth().min_layers == 10  # a third by default


def test_spaces_without_depth_fields_load_unchanged():
    d = {"mlp": [[32, 64]] * 2, "attn": [[1, 2]] * 2}  # a manifest from before depth
    space = ElasticSpace.from_dict(d)
    assert not space.depth and space.min_layers == 1 and space.smallest() == Subnet(mlp=[32, 32], attn=[1, 1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(mlp=[[0, 64]] * 2, attn=[[0, 2]] * 2, min_layers=0), "--min-layers 0 must be between 1 and the model's 2"),
    (dict(mlp=[[0, 64]] * 2, attn=[[0, 2]] * 2, min_layers=3), "--min-layers 3 must be between 1"),
    (dict(mlp=[[0, 0]] * 2, attn=[[1]] * 2), "layer 0 MLP choices \\[0, 0\\] must be distinct positive"),
    (dict(mlp=[[-1, 64]] * 2, attn=[[1]] * 2), "must be distinct positive"),
    (dict(mlp=[[0, 64]] * 2, attn=[[1]] * 2, skip_order={"mlp": [0, 0]}), "skip_order\\['mlp'\\] must list"),
])
def test_bad_depth_spaces_are_refused_in_one_line(kwargs, match):
    with pytest.raises(FlextronError, match=match) as e:
        ElasticSpace(**kwargs)
    assert "\n" not in str(e.value)


def test_all_skipped_sub_network_is_refused():
    space = ElasticSpace(mlp=[[0, 64]] * 2, attn=[[0, 2]] * 2)
    with pytest.raises(FlextronError, match="keeps the MLP of 0 layers, below the elastic space's floor of 1"):
        space.validate(Subnet(mlp=[0, 0], attn=[2, 0]))


def test_random_sub_networks_follow_one_documented_stream():
    import torch

    space = ElasticSpace.default(4, 96, 4, multiple=8).with_depth(min_layers=2)
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)

    def draw(k: int) -> int:
        return torch.randint(k, (1,), generator=ref).item()

    for _ in range(20):  # heterogeneous: each layer's MLP, then each layer's attention; the floor holds
        sub = space.sample(gen)
        space.validate(sub)
        assert sub == space.floor(Subnet(mlp=[c[draw(len(c))] for c in space.mlp],
                                         attn=[c[draw(len(c))] for c in space.attn]))
    for _ in range(20):  # uniform: a width index per kind, then skip counts per kind
        i, j = draw(len(space.widths("mlp", 0))), draw(len(space.widths("attn", 0)))
        assert space.sample(gen, "uniform") == space.uniform(i, j, draw(3), draw(3))


def test_ordered_skips_draw_the_nested_depth_family():
    import torch

    space = ElasticSpace.default(6, 96, 4, multiple=8).with_depth(
        min_layers=2, skip_order={"mlp": [2, 5, 0, 1, 4, 3], "attn": [4, 0, 5, 3, 2, 1]})
    gen = torch.Generator().manual_seed(7)
    counts = {"mlp": set(), "attn": set()}
    for mode in ("layers", "spread"):
        for _ in range(60):
            sub = space.sample(gen, mode, ordered_skips=True)
            space.validate(sub)
            for kind in ("mlp", "attn"):
                chosen, order = getattr(sub, kind), space.order(kind)
                k = chosen.count(0)
                assert sorted(i for i, c in enumerate(chosen) if c == 0) == sorted(order[:k])  # a prefix
                counts[kind].add(k)
    assert counts == {"mlp": set(range(5)), "attn": set(range(5))}  # 0 up to the floor, each drawn
    gen, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    def draw(k: int) -> int:
        return torch.randint(k, (1,), generator=ref).item()

    for _ in range(20):  # the stream: running widths per layer and kind, then a skip count per kind
        widths = {k: [w[draw(len(w))] for w in (space.widths(k, i) for i in range(6))] for k in ("mlp", "attn")}
        skips = {"mlp": draw(5), "attn": draw(5)}
        expected = {k: [0 if i in space.order(k)[: skips[k]] else w for i, w in enumerate(widths[k])]
                    for k in ("mlp", "attn")}
        assert space.sample(gen, ordered_skips=True) == Subnet(**expected)
    width_only = ElasticSpace.default(6, 96, 4, multiple=8)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for mode in ("layers", "spread"):  # no depth: the flag changes nothing
        assert [width_only.sample(a, mode, ordered_skips=True) for _ in range(10)] == \
            [width_only.sample(b, mode) for _ in range(10)]


def test_spread_draws_range_from_mostly_narrow_to_mostly_wide():
    import torch

    space = ElasticSpace.default(30, 1536, 3, multiple=384)
    gen = torch.Generator().manual_seed(0)

    def mean_index(kind: str, sub: Subnet) -> float:
        return sum(space.widths(kind, i).index(w) for i, w in enumerate(getattr(sub, kind))) / space.n_layers

    spread = [space.sample(gen, "spread") for _ in range(200)]
    layers = [space.sample(gen) for _ in range(200)]
    for sub in spread:
        space.validate(sub)
    # Independent draws hold about the same mix of widths; spread ones cover the range.
    for kind in ("mlp", "attn"):
        spread_sd = statistics.pstdev(mean_index(kind, s) for s in spread)
        layers_sd = statistics.pstdev(mean_index(kind, s) for s in layers)
        assert spread_sd > 2 * layers_sd
    torch.manual_seed(0)
    again = torch.Generator().manual_seed(0)
    assert [space.sample(again, "spread") for _ in range(200)] == spread  # seeded, not global randomness


def test_spread_draws_keep_the_depth_floor():
    import torch

    space = ElasticSpace.default(6, 96, 4, multiple=8).with_depth(min_layers=4)
    gen = torch.Generator().manual_seed(1)
    subs = [space.sample(gen, "spread") for _ in range(50)]
    for sub in subs:
        space.validate(sub)
    assert any(0 in s.mlp for s in subs) and any(0 in s.attn for s in subs)


def test_an_unknown_sampling_mode_is_refused():
    import torch

    with pytest.raises(FlextronError, match="unknown sampling mode 'wide'"):
        ElasticSpace.default(2, 96, 4, multiple=8).sample(torch.Generator(), "wide")


def test_hidden_sizes_round_trip_and_old_spaces_have_none():
    space = ElasticSpace.default(2, 96, 4, multiple=8).with_hidden(576, (0.25, 0.5, 1.0), 64)
    assert space.hidden == [128, 256, 576]  # 144 and 288 to the nearest multiple of 64 (halves to even)
    assert ElasticSpace.from_dict(space.to_dict()) == space and space.to_dict()["hidden"] == [128, 256, 576]
    old = ElasticSpace.default(2, 96, 4, multiple=8)
    assert "hidden" not in old.to_dict() and ElasticSpace.from_dict(old.to_dict()).hidden is None
    assert ElasticSpace.from_dict({**old.to_dict(), "hidden": None}) == old
    assert space.with_depth(1).hidden == space.hidden  # the depth choices keep the hidden ones
    sub = space.uniform(1, 1, hidden_index=0)
    assert sub.to_dict()["hidden"] == 128 and Subnet(**sub.to_dict()) == sub
    assert "hidden" not in space.full().to_dict()  # the full size is None, written as before


@pytest.mark.parametrize("hidden,match", [
    ([64, 32], "must be distinct positive integers in ascending order"),
    ([32, 32, 64], "must be distinct positive integers"),
    ([0, 64], "must be distinct positive integers"),
    ([], "must be distinct positive integers"),
    ("64", "must be a list of integers"),
    ([32.0, 64], "must be a list of integers"),
    ([True, 64], "must be a list of integers"),
])
def test_bad_hidden_sizes_are_refused_in_one_line(hidden, match):
    with pytest.raises(FlextronError, match=match) as e:
        ElasticSpace.from_dict({"mlp": [[32, 64]], "attn": [[1, 2]], "hidden": hidden})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fractions,multiple,match", [
    ((0.0, 1.0), 64, "hidden fraction 0.0 is outside \\(0, 1\\]"),
    ((0.5, 1.5), 64, "hidden fraction 1.5 is outside"),
    ((0.5,), 0, "--hidden-multiple must be a positive integer, got 0"),
])
def test_bad_hidden_fractions_are_refused(fractions, multiple, match):
    with pytest.raises(FlextronError, match=match):
        ElasticSpace.default(1, 96, 4).with_hidden(64, fractions, multiple)


def test_sub_networks_of_a_hidden_space():
    space = ElasticSpace.default(2, 96, 4, multiple=8).with_hidden(64, (0.5, 0.75, 1.0), 16)
    assert space.full().hidden is None and space.smallest().hidden == 32 and space.centroid().hidden == 48
    assert space.smallest() == Subnet(mlp=[24, 24], attn=[1, 1], hidden=32)
    assert [space.uniform(0, 0, hidden_index=i).hidden for i in (None, 0, 1, 2, 9)] == [None, 32, 48, None, None]
    assert [space.hidden_index(space.uniform(0, 0, hidden_index=i)) for i in range(3)] == [0, 1, 2]
    assert space.hidden_index(Subnet(mlp=[24, 24], attn=[1, 1], hidden=64)) == 2  # the full size, written out
    assert ElasticSpace.default(1, 96, 4).hidden_index(Subnet(mlp=[96], attn=[4])) == 0
    assert ElasticSpace.default(2, 96, 4).with_hidden(64, (0.5, 1.0), 16).centroid().hidden is None  # upper middle
    space.validate(space.smallest())
    space.validate(Subnet(mlp=[96, 96], attn=[4, 4], hidden=64))
    with pytest.raises(FlextronError, match="hidden size 40 is not in the elastic space \\[32, 48, 64\\]"):
        space.validate(Subnet(mlp=[96, 96], attn=[4, 4], hidden=40))
    with pytest.raises(FlextronError, match="hidden size 32 is not in the elastic space \\(no hidden-size choices\\)"):
        ElasticSpace.default(2, 96, 4, multiple=8).validate(Subnet(mlp=[96, 96], attn=[4, 4], hidden=32))
    depth = space.with_depth(1)
    assert depth.smallest().hidden == 32 and depth.floor(Subnet(mlp=[0, 0], attn=[0, 0], hidden=48)).hidden == 48


@pytest.mark.parametrize("mode", ["layers", "uniform", "spread"])
def test_random_sub_networks_draw_the_hidden_size_last(mode):
    """The widths (and skips) are the draws of the space without hidden sizes; one uniform draw follows."""
    import torch

    plain = ElasticSpace.default(4, 96, 4, multiple=8).with_depth(min_layers=2)
    space = plain.with_hidden(64, (0.5, 0.75, 1.0), 16)
    gen, ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    seen = set()
    for _ in range(30):
        sub = space.sample(gen, mode, ordered_skips=True)
        space.validate(sub)
        want = plain.sample(ref, mode, ordered_skips=True)
        want.hidden = space.hidden_at(torch.randint(3, (1,), generator=ref).item())
        assert sub == want
        seen.add(sub.hidden)
    assert seen == {32, 48, None}
