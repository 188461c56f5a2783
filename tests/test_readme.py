"""The README's Python examples run as written (in a scratch directory)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks: exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "qwen3-debug" / "model.safetensors").is_file()
