"""The notebooks as committed: under 2 MB each, and any outputs headed by the reference run that made them
(scripts/run_notebooks.py); the script's parameter injection works as papermill's does."""
import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)


def test_committed_notebooks_are_small_and_say_what_made_their_outputs():
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(paths) == 5
    assert run_notebooks.check(paths) == []


def test_check_catches_a_big_or_unheaded_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), cell]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert "without a 'reference-run' cell" in run_notebooks.check([path])[0]
    run_notebooks.set_header(nb, "**Reference run.** test")
    cell.outputs[0].text = "x" * (run_notebooks.MAX_BYTES + 10)
    nbformat.write(nb, path)
    assert run_notebooks.check([path]) == [f"x.ipynb: {path.stat().st_size} bytes, over {run_notebooks.MAX_BYTES}"]


def test_parameters_are_injected_after_the_parameters_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"),
                nbformat.v4.new_code_cell("STEPS = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(STEPS)")]
    run_notebooks.inject_parameters(nb, {"STEPS": 40, "MODEL": "embedded"})
    run_notebooks.inject_parameters(nb, {"STEPS": 50})  # a second run replaces, never stacks
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["parameters"], ["injected-parameters"], []]
    assert nb.cells[2].source == "# parameters of this run\nSTEPS = 50\n"
