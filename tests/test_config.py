import pytest

from flextron.config import Budget, ElasticSpace, Subnet
from flextron.errors import FlextronError


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
])
def test_budget_parse(text, metric, fraction, value):
    b = Budget.parse(text)
    assert (b.metric, b.fraction, b.value) == (metric, fraction, value)


@pytest.mark.parametrize("text,match", [
    ("abc", "cannot read budget"),
    ("speed=0.5", "unknown budget metric"),
    ("0", "must be positive"),
    ("-0.5", "cannot read budget"),
    ("50%%", "cannot read budget"),
    ("1.5", "above the full model"),
    ("120%", "above the full model"),
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
