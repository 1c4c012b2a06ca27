import dataclasses

import pytest

from flextron.errors import FlextronError
from flextron.options import (
    ConvertOptions,
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    ProfileOptions,
    RouteOptions,
    ServeLimits,
    ServeOptions,
    TrainOptions,
    read_yaml,
    resolve,
    write_yaml,
)

OPTION_CLASSES = [ConvertOptions, EvalOptions, ProfileOptions, GenerateOptions, ServeOptions, RouteOptions,
                  TrainOptions]


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
    (ServeLimits, {"default_max_tokens": 2048}, "default-max-tokens cannot exceed max-tokens"),
])
def test_options_are_checked_on_creation(cls, kwargs, message):
    with pytest.raises(FlextronError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"lr": 1e39}, "--lr must be in"),
    ({"weight_decay": -1.0}, "--weight-decay must be in"),
    ({"max_steps": 0}, "--max-steps must be in"),
    ({"max_steps": -1}, "--max-steps must be in"),
    ({"max_steps": 1.5}, "--max-steps must be an integer"),
    ({"max_steps": float("inf")}, "--max-steps must be an integer"),
    ({"max_steps": None, "tokens": -5}, "--tokens must be in"),
    ({"eval_limit": -3}, "--eval-limit must be in"),
    ({"eval_budgets": (1.7,)}, "--eval-budgets must be in"),
    ({"eval_budgets": ()}, "--eval-budgets needs at least one value"),
    ({"budgets": (0.0, 0.5)}, "--budgets must be in"),
    ({"budget_probs": (1.0, -1.0, 1.0, 1.0)}, "--budget-probs must be in"),
    ({"clip": float("nan")}, "--clip must be a finite number"),
    ({"full_prob": 2.0}, "--full-prob must be in"),
    ({"micro_batch": True}, "--micro-batch must be an integer"),
    ({"seed": -1}, "--seed must be in"),
])
def test_train_options_reject_bad_numbers(kwargs, message):
    with pytest.raises(FlextronError, match=message):
        TrainOptions(**{"max_steps": 1, **kwargs})


@pytest.mark.parametrize("cls, kwargs, message", [
    (RouteOptions, {"budgets": (1.7,)}, "--budgets must be in"),
    (RouteOptions, {"steps": 0}, "--steps must be in"),
    (RouteOptions, {"router_lr": float("inf")}, "--router-lr must be a finite number"),
    (RouteOptions, {"eval_limit": 0}, "--eval-limit must be in"),
    (RouteOptions, {"hidden": 12.5}, "--hidden must be an integer"),
])
def test_route_options_reject_bad_numbers(cls, kwargs, message):
    with pytest.raises(FlextronError, match=message):
        cls(**kwargs)


def test_resolve_applies_keywords_and_names_the_valid_ones():
    base = ProfileOptions(context=64)
    assert resolve(ProfileOptions, base, {"repeats": 5}) == ProfileOptions(context=64, repeats=5)
    assert resolve(ProfileOptions, None, {}) == ProfileOptions()
    assert resolve(ProfileOptions, base, {}) is base
    with pytest.raises(FlextronError, match="unknown option n_fit; ProfileOptions has verify, batch, context"):
        resolve(ProfileOptions, None, {"n_fit": 6})
    with pytest.raises(FlextronError, match="--repeats must be in"):  # overrides are checked like the rest
        resolve(ProfileOptions, base, {"repeats": 0})
    assert resolve(EvalOptions, None, {"budgets": ["0.5"]}).budgets == ("0.5",)  # lists become tuples


def test_yaml_round_trip_and_dashed_keys(tmp_path):
    cfg = TrainOptions(max_steps=3, budgets=(1.0, 0.5), budget_probs=(0.3, 0.7))
    path = write_yaml(tmp_path / "config.yaml", {**dataclasses.asdict(cfg), "data": None})
    values = read_yaml(path)
    assert values.pop("data") is None
    assert TrainOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}) == cfg
    (tmp_path / "dashed.yaml").write_text("max-steps: 2\nseq_len: 64\n")
    assert read_yaml(tmp_path / "dashed.yaml") == {"max_steps": 2, "seq_len": 64}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "must be a YAML mapping"),
    ("lr: [1, 2\n", "cannot read the config"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "cannot read the config"),
    ("lr: !!python/name:os.system\n", "cannot read the config"),
    ("a: &x [1, 1]\nb: &y [*x, *x]\nc: [*y, *y]\n", "uses a YAML alias"),  # the billion-laughs shape
    ("x: " + "y" * (1 << 20) + "\n", "at most 1024 KiB"),
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


def test_a_device_or_directory_is_not_read_as_a_config(tmp_path):
    for path in ("/dev/zero", tmp_path):
        with pytest.raises(FlextronError, match="must be a regular file"):
            read_yaml(path)


@pytest.mark.parametrize("cls, kwargs, message", [
    (EvalOptions, {"budgets": None}, "--budgets needs a value"),
    (EvalOptions, {"tasks": None}, "--tasks needs a value"),
    (EvalOptions, {"verify": None}, "--verify needs a value"),
    (ConvertOptions, {"calib_data": None}, "--calib-data needs a value"),
    (ConvertOptions, {"mlp_fractions": None}, "--mlp-fractions needs a value"),
    (ConvertOptions, {"mlp_fractions": 0.5}, "--mlp-fractions must be a list"),
    (ConvertOptions, {"mlp_fractions": ()}, "--mlp-fractions needs at least one value"),
    (ConvertOptions, {"attn_fractions": (0.5, 1.5)}, r"--attn-fractions must be in \(0, 1\], got 1.5"),
    (ServeOptions, {"host": None}, "--host needs a value"),
    (ServeOptions, {"host": ["a"]}, "--host must be text"),
    (ExportOptions, {"verify": "no"}, "--verify must be true or false"),
    (TrainOptions, {"max_steps": 1, "budgets": (0.5, "x")}, "--budgets must be a number"),
])
def test_every_field_is_type_checked(cls, kwargs, message):
    with pytest.raises(FlextronError, match=message):
        cls(**kwargs)


def test_budgets_given_as_numbers_are_read_as_budget_text():
    assert EvalOptions(budgets=(0.5, 1)).budgets == ("0.5", "1")


def test_yaml_null_is_refused_where_the_option_needs_a_value(tmp_path, capsys):
    from flextron.cli import main

    config = tmp_path / "c.yaml"
    for command, key in [("eval", "budgets"), ("eval", "tasks"), ("convert --out x", "calib_data"),
                         ("convert --out x", "mlp_fractions"), ("serve x", "host"), ("demo", "out"),
                         ("export x --out y --budget 1.0", "verify")]:
        config.write_text(f"{key}: null\n")
        assert main([*command.split(), "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"{key} is null; give it a value or leave the key out" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_no_option_is_declared_twice():
    """Every option field lives in flextron.options, and one declared alike in two commands is
    declared once, in a shared base (as `verify`, `dtype`, `adaptive`)."""
    import importlib
    import inspect
    import pkgutil

    import flextron
    import flextron.options as home

    declared: dict[tuple, list[str]] = {}
    for info in pkgutil.walk_packages(flextron.__path__, "flextron."):
        if info.name in ("flextron.harness", "flextron.__main__"):
            continue  # lm-eval's registry import / the CLI entry point
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__module__ == info.name):
                continue
            own = cls.__dict__.get("__annotations__", {})
            for f in dataclasses.fields(cls):
                if f.name in own and "help" in f.metadata:
                    assert module is home, f"{info.name}.{name}.{f.name} is an option outside flextron.options"
                    key = (f.name, repr(f.default), f.metadata["help"], f.metadata["choices"])
                    declared.setdefault(key, []).append(name)
    twice = {k[0]: v for k, v in declared.items() if len(v) > 1}
    assert not twice, f"declared alike in several classes: {twice}"
    assert len(declared) > 100
