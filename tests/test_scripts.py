"""The command-line scripts, run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_hf_parity_script(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/hf_parity.py"), "--model-dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0


def test_hf_parity_script_bad_dir(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/hf_parity.py"), "--model-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no config.json" in r.stderr
