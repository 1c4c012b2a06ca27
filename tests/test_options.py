import dataclasses

import pytest

from flextron.config import RouterConfig, TrainConfig
from flextron.errors import FlextronError
from flextron.options import (
    ConvertOptions,
    EvalOptions,
    GenerateOptions,
    ProfileOptions,
    ServeConfig,
    ServeOptions,
    read_yaml,
    resolve,
    write_yaml,
)

OPTION_CLASSES = [ConvertOptions, EvalOptions, ProfileOptions, GenerateOptions, ServeOptions, RouterConfig,
                  TrainConfig]


@pytest.mark.parametrize("cls", OPTION_CLASSES)
def test_every_option_has_help(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@pytest.mark.parametrize("cls, kwargs, message", [
    (ConvertOptions, {"calib_sequences": 0}, r"--calib-sequences must be in \[1, inf\]"),
    (ConvertOptions, {"calib_seq_len": 0}, "--calib-seq-len must be in"),
    (ConvertOptions, {"batch_size": 0}, "--batch-size must be in"),
    (ConvertOptions, {"seed": -1}, "--seed must be in"),
    (ConvertOptions, {"order": "best"}, "--order must be one of importance, random, not 'best'"),
    (ConvertOptions, {"min_layers": 1.5}, "--min-layers must be an integer"),
    (EvalOptions, {"limit": 0}, "--limit must be in"),
    (ProfileOptions, {"samples": 0}, "--samples must be in"),
    (ProfileOptions, {"outtype": "q4"}, "--outtype must be one of f32, f16, bf16, q8_0"),
    (GenerateOptions, {"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    (ServeOptions, {"port": 70000}, r"--port must be in \[0, 65535\]"),
    (ServeOptions, {"max_queue": 0}, "--max-queue must be in"),
    (ServeConfig, {"default_max_tokens": 2048}, "default-max-tokens cannot exceed max-tokens"),
])
def test_options_are_checked_on_creation(cls, kwargs, message):
    with pytest.raises(FlextronError, match=message):
        cls(**kwargs)


def test_resolve_applies_keywords_and_names_the_valid_ones():
    base = ProfileOptions(context=64)
    assert resolve(ProfileOptions, base, {"repeats": 5}) == ProfileOptions(context=64, repeats=5)
    assert resolve(ProfileOptions, None, {}) == ProfileOptions()
    assert resolve(ProfileOptions, base, {}) is base
    with pytest.raises(FlextronError, match="unknown option n_fit; ProfileOptions has batch, context, decode_steps"):
        resolve(ProfileOptions, None, {"n_fit": 6})
    with pytest.raises(FlextronError, match="--repeats must be in"):  # overrides are checked like the rest
        resolve(ProfileOptions, base, {"repeats": 0})
    assert resolve(EvalOptions, None, {"budgets": ["0.5"]}).budgets == ("0.5",)  # lists become tuples


def test_yaml_round_trip_and_dashed_keys(tmp_path):
    cfg = TrainConfig(max_steps=3, budgets=(1.0, 0.5), budget_probs=(0.3, 0.7))
    path = write_yaml(tmp_path / "config.yaml", {**dataclasses.asdict(cfg), "data": None})
    values = read_yaml(path)
    assert values.pop("data") is None
    assert TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}) == cfg
    (tmp_path / "dashed.yaml").write_text("max-steps: 2\nseq_len: 64\n")
    assert read_yaml(tmp_path / "dashed.yaml") == {"max_steps": 2, "seq_len": 64}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "must be a YAML mapping"),
    ("lr: [1, 2\n", "cannot read the config"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "cannot read the config"),
    ("lr: !!python/name:os.system\n", "cannot read the config"),
])
def test_bad_or_unsafe_yaml_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FlextronError, match=message) as e:
        read_yaml(path)
    assert "\n" not in str(e.value)



def test_convert_family_choices_are_the_declared_families():
    from flextron.families import FAMILIES
    from flextron.options import ConvertOptions

    assert set(ConvertOptions.__dataclass_fields__["family"].metadata["choices"]) == set(FAMILIES)
