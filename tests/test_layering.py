"""The package's floors: imports run one way, down (scripts -> training -> distributed, eval, data -> model -> kernels),
and errors.py sits at the bottom. Read from the source with `ast`, so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qwen3_scratch"
# what each floor may import from the package (besides itself); data and distributed are siblings: data's rank-0 cache
# building uses distributed's rank helpers, never the other way round
ALLOWED = {"errors": set(), "kernels": {"errors"}, "model": {"kernels", "errors"},
           "distributed": {"model", "kernels", "errors"}, "data": {"distributed", "model", "kernels", "errors"},
           "eval": {"data", "distributed", "model", "kernels", "errors"},
           "training": {"data", "distributed", "eval", "model", "kernels", "errors"}}


def _floor(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qwen3_scratch" else None


def _imports(path: Path) -> list[tuple[str, int]]:
    "Absolute module names `path` imports from qwen3_scratch (relative imports resolved), with line numbers."
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((name, node.lineno))
        elif isinstance(node, ast.Import): out += [(a.name, node.lineno) for a in node.names]
    return out


def _files():
    return [p for p in PKG.rglob("*.py") if p.name not in ("_modidx.py", "__init__.py")]


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_down_the_floors(path):
    rel = path.relative_to(PKG)
    floor = "errors" if rel.parts == ("errors.py",) else rel.parts[0]
    assert floor in ALLOWED, f"{rel}: a module outside the known floors; add its floor to ALLOWED"
    for name, line in _imports(path):
        f = _floor(name)
        if f is None or f == floor: continue
        assert f in ALLOWED[floor], f"{rel}:{line} imports {name}: {floor}/ may import only {sorted(ALLOWED[floor])}"


def test_model_and_kernels_know_nothing_of_torch_distributed():
    for sub in ("model", "kernels"):
        for path in (PKG / sub).rglob("*.py"):
            bad = [(n, l) for n, l in _imports(path) if n.startswith("torch.distributed")]
            assert not bad, f"{path.relative_to(PKG)} imports {bad}: parallelism belongs in distributed/"


def test_kernels_import_nothing_from_model():
    for path in (PKG / "kernels").rglob("*.py"):
        text = path.read_text()
        assert "from ..model" not in text and "qwen3_scratch.model" not in text, path
