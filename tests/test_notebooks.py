"""Notebook CI: every committed notebook is output-free, parameterised, short-celled, and executes.

Each notebook runs once, under papermill, with *non-default* parameters injected (the embedded scene model as
a folder path instead of its name, a temporary output folder). There is no second run under ``nbval``: the committed notebooks
hold no outputs, so ``--nbval-lax`` had nothing to compare and only re-executed what papermill ran. What a run
must prove is written in the cells themselves — every claim a cell shows is an ``assert`` — and the static
checks below make sure the notebooks keep that habit. The runner is tested on a notebook that fails on purpose.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

from sd35fp8_helpers.onboarding.notebooks import find_notebooks, run_all

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = find_notebooks(REPO / "notebooks")
MAX_CODE_LINES = 12  # logic lives in sd35fp8_helpers; a cell longer than this belongs in the package


def _cells(path: Path):
    return nbformat.read(path, as_version=4).cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_parameters(path):
    cells = _cells(path)
    code = [c for c in cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "model = " in tagged[0].source and "output_dir = " in tagged[0].source
    long = [c.source.splitlines()[0] for c in code if len(c.source.splitlines()) > MAX_CODE_LINES]
    assert not long, f"cells over {MAX_CODE_LINES} lines (move the logic into sd35fp8_helpers): {long}"
    assert nbformat.read(path, as_version=4).metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_output_is_explained(path):
    """Handbook style: a code cell is followed by prose (or by a code cell that continues the same idea)."""
    cells = _cells(path)
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert cells[-1].cell_type == "markdown", "end with prose: what was learned, and the next notebook"
    runs_of_code = max(len(run) for run in "".join("c" if c.cell_type == "code" else "m" for c in cells).split("m"))
    assert runs_of_code <= 3, "more than 3 code cells in a row without explanation"


def _sections(path: Path) -> list[tuple[str, list]]:
    """(title, code cells) per ``## `` section; the cells before the first section (set-up) are not one."""
    found: list[tuple[str, list]] = []
    for cell in _cells(path):
        if cell.cell_type == "markdown":
            found += [(line[3:], []) for line in cell.source.splitlines() if line.startswith("## ")]
        elif found:
            found[-1][1].append(cell)
    return found


def _asserts(source: str) -> int:
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(source)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_section_that_runs_code_asserts_what_it_shows(path):
    """A cell that shows ``False`` passes papermill; an ``assert`` does not. So every section that runs code
    asserts what it shows. (A test cannot tell *which* sentence of the prose a cell proves — review does that;
    it can tell that a section proves nothing.)"""
    silent = [title for title, code in _sections(path) if code and not sum(_asserts(c.source) for c in code)]
    assert not silent, f"sections that show results without asserting any: {silent}"


def _is_claim(node: ast.AST) -> bool:
    """A comparison, a boolean test or an equality call — something that reads True or False."""
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return True
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return name in {"array_equal", "equal", "allclose", "isclose", "all", "any"}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_claim(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(_is_claim(v) for v in node.values)
    return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_displays_an_unasserted_comparison(path):
    """``a == b`` as a cell's last line displays True or False and passes either way: compute it into a name,
    assert it, then show the name."""
    bare = []
    for cell in _cells(path):
        if cell.cell_type == "code" and (body := ast.parse(cell.source).body):
            if isinstance(body[-1], ast.Expr) and _is_claim(body[-1].value):
                bare.append(cell.source.splitlines()[-1])
    assert not bare, f"cells that display a comparison instead of asserting it: {bare}"


def _benchmark_numbers() -> set[float]:
    numbers: set[float] = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            numbers.update({float(x), 100.0 * x})  # 100×: a fraction written as a percentage

    for file in (REPO / "docs" / "benchmarks").glob("*.json"):
        walk(json.loads(file.read_text()))
    return numbers


FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:GiB|GB|ms|s/image|s per|s\b|×|%)")
QUOTED = re.compile(r'"[^"\n]*"')  # someone else's words ("the seed guide promises …") are quoted, not measured


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_types_in_no_measured_figure(path):
    """Figures measured on the GPU reach a notebook through cells that print them from ``docs/benchmarks/*.json``
    (``sd35fp8_helpers.benchmarks.findings``), never as numbers typed into markdown, which go stale the day the
    benchmark is re-run. Checked: every figure with a unit (GiB, ms, s, ×, %) that is written with a decimal
    point, is ≥ 100 or is a speed-up, against every number in the committed JSON at the precision written."""
    measured = _benchmark_numbers()
    typed = []
    for cell in _cells(path):
        if cell.cell_type != "markdown":
            continue
        for m in FIGURE.finditer(QUOTED.sub("", cell.source)):
            text = m.group(1)
            decimals = len(text.partition(".")[2])
            if ("." in text or float(text) >= 100 or m.group(0).endswith("×")) and any(
                    round(x, decimals) == float(text) for x in measured):
                typed.append(m.group(0))
    assert not typed, f"measured figures typed into prose (print them from the JSON instead): {typed}"


def test_findings_are_the_committed_measurements():
    """The sentences the notebooks print carry the JSON's own numbers."""
    from sd35fp8_helpers.benchmarks.findings import fp8_speed, memory_ladder, tiling
    from sd35fp8_helpers.benchmarks.fp8 import benchmarks_folder, load_results
    from sd35fp8_helpers.benchmarks.memory import load_results as load_memory

    large = next(r for r in load_results(benchmarks_folder()) if r["preset"] == "large")
    compute = next(v for v in large["variants"] if v["variant"] == "fp8-compute")
    speed = fp8_speed()
    assert speed["compute_ms"] == compute["ms_per_step"] and f"{compute['ms_per_step']:.0f} ms" in str(speed)
    resident = next(r for r in load_memory()["ladder"] if r["preset"] == "large" and r["strategy"] == "resident")
    assert memory_ladder()["resident_gib"] == resident["measured_gib"]
    vae = json.loads((REPO / "docs/benchmarks/tiling.json").read_text())["vae"]
    untiled = next(r for r in vae if r["size"] == 4096 and r["variant"] == "untiled")
    assert tiling()["untiled_gib"] == untiled["peak_gib"] and f"{untiled['peak_gib']:.1f} GiB" in str(tiling())
    assert "H100" in speed.source and speed.source.endswith(large["date"])


def test_scene_prompts_read_back_to_their_scene():
    """The judge needs the scene a prompt names: every evaluation prompt (paraphrases) and its main caption read
    back to its spec, and every prompt a notebook's parameters cell holds is in the scene vocabulary."""
    from sd35fp8_helpers.scenes import caption, evaluation_prompts
    from sd35fp8_helpers.scenes.parse import read_prompt

    assert all(read_prompt(p.text) == p.spec == read_prompt(caption(p.spec)) for p in evaluation_prompts())
    for path in NOTEBOOKS:
        params = next(c for c in _cells(path) if "parameters" in c.metadata.get("tags", []))
        values = {}
        exec(compile(params.source, str(path), "exec"), {}, values)  # plain literals only (papermill's rule)
        prompts = [values["prompt"]] if "prompt" in values else []
        prompts += values.get("gallery_prompts", [])
        assert all(read_prompt(p) is not None for p in prompts), (path.name, prompts)


FAKE_TOKEN = "hf_sd35fp8NotebookFakeToken000111222333"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes_under_papermill_with_injected_parameters(path, tmp_path, monkeypatch):
    """The embedded scene model given as a folder path instead of its name "scenes": the notebooks' judge
    asserts need a model that draws, and the folder form is what a user with their own download passes."""
    from sd35fp8_helpers.constants import EMBEDDED_MODEL_DIR

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # a configured token must never reach a saved notebook
    runs = run_all(model=str(EMBEDDED_MODEL_DIR), out=tmp_path, only=[path.name], echo=lambda _: None)
    assert [r.status for r in runs] == ["ok"], runs[0].error
    saved = Path(runs[0].output).read_text()
    assert FAKE_TOKEN not in saved and FAKE_TOKEN[3:15] not in saved
    executed = nbformat.read(runs[0].output, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and str(EMBEDDED_MODEL_DIR) in injected[0].source
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []


def test_runner_names_the_failing_cell_and_exits_1(cli, tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('model = "tiny"\noutput_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y = 1 / 0  # boom")]
    nbformat.write(nb, folder / "00_broken.ipynb")
    nb.cells = [params]
    nbformat.write(nb, folder / "01_fine.ipynb")
    result = cli("notebooks", "--notebooks", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "[1/2] 00_broken.ipynb: failed" in result.stdout
    assert "cell 4 (In [4]: `y = 1 / 0  # boom`) raised ZeroDivisionError" in result.stdout + result.stderr
    assert "[2/2] 01_fine.ipynb: ok" in result.stdout  # one failure does not hide the others
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["status"] for s in summary] == ["failed", "ok"]
    assert (tmp_path / "out" / "notebooks" / "00_broken.ipynb").is_file()  # executed copy with the traceback
