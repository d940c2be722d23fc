"""The layout holds: layers only import downwards, no import circle, small modules, a complete wheel, and a
scheduler added by a YAML file alone."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose

import diffexp
from diffexp.sampling.experiment import prepare
from diffexp.sampling.loop import sample

PACKAGE = ROOT / "diffexp"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every diffexp module -> the diffexp modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(diffexp.LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return None


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """The import level of each module: 0 for one that imports nothing of diffexp."""
    memo: dict[str, int] = {}

    def level(m: str) -> int:
        if m not in memo:
            memo[m] = 1 + max((level(d) for d in graph[m] if d != "diffexp"), default=-1)
        return memo[m]

    return {m: level(m) for m in graph}


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    graph = imports()
    for module, deps in graph.items():
        if module == "diffexp" or module == "diffexp.configs":
            continue
        assert layer_of(module) is not None, f"{module} is in no layer of diffexp.LAYERS"
        for dep in deps - {"diffexp"}:
            assert layer_of(dep) <= layer_of(module), f"{module} imports {dep}, a higher layer"


def test_no_import_circle() -> None:
    graph = {m: d - {"diffexp"} for m, d in imports().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import circle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert max(levels(graph).values()) <= 10


def test_no_module_outside_tests_has_more_than_300_lines() -> None:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_wheel_holds_every_subpackage_the_configs_and_the_weights(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    for name in ("diffexp", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("diffexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names
    configs = {
        f"diffexp/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert configs <= names
    weights = {f"diffexp/{p.relative_to(PACKAGE).as_posix()}" for p in (PACKAGE / "weights").rglob("*") if p.is_file()}
    assert weights <= names and any(n.endswith(".safetensors") for n in weights)
    assert "diffexp/report/templates/report.html.j2" in names


NEW_SCHEDULER = """\
# DDIM, parallel variant: diffusers DDIMParallelScheduler (a file on another config path, no Python)
name: ddim-parallel
diffusers_class: DDIMParallelScheduler
stochastic: ${gt:${.eta},0}
theory_order: 1
timestep_spacing: trailing
eta: 0.0
"""


def test_a_scheduler_file_on_the_search_path_is_all_a_new_scheduler_needs(tmp_path: Path) -> None:
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "ddim-parallel.yaml").write_text(NEW_SCHEDULER)
    cfg = compose(
        "model=tiny", "scheduler=ddim-parallel", "steps=4", "batch_size=2", f"hydra.searchpath=[file://{tmp_path}]"
    )
    exp = prepare(cfg)
    assert exp.built.class_name == "DDIMParallelScheduler" and exp.built.theory_order == 1
    assert not exp.built.stochastic and exp.built.scheduler.config.timestep_spacing == "trailing"
    assert exp.label == "ddim-parallel-trailing-4"
    final = sample(exp.steps())
    assert final.nfe == 4 and torch.isfinite(final.x).all()
    eta = prepare(
        compose("model=tiny", "scheduler=ddim-parallel", "scheduler.eta=1.0", f"hydra.searchpath=[file://{tmp_path}]")
    )
    assert eta.built.stochastic  # the declaration follows the options


@pytest.mark.parametrize(
    ("name", "base", "options", "changed"),
    [  # (stochastic, theory_order) of the file's defaults, and after changing the options they depend on
        ("ddim", (False, 1), ["scheduler.eta=1.0"], (True, 1)),
        ("euler", (False, 1), ["scheduler.s_churn=1.0"], (True, 1)),
        ("dpmsolver", (False, 2), ["scheduler.algorithm_type=sde-dpmsolver++", "scheduler.solver_order=3"], (True, 3)),
        ("unipc", (False, 3), ["scheduler.solver_order=3"], (False, 4)),  # UniP-3 with the UniC corrector
    ],
)
def test_declarations_follow_the_options(
    name: str, base: tuple[bool, int], options: list[str], changed: tuple[bool, int]
) -> None:
    common = ("model=tiny", f"scheduler={name}", "steps=4", "batch_size=1")
    default = prepare(compose(*common)).built
    assert (default.stochastic, default.theory_order) == base
    other = prepare(compose(*common, *options)).built
    assert (other.stochastic, other.theory_order) == changed
