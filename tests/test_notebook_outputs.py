"""The notebooks as committed: under 2 MB each, and any outputs headed by the reference run that made them
(scripts/run_notebooks.py); the script's parameter injection works as papermill's does."""
import importlib.util
import re
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


def output_text(path: Path) -> str:
    """Everything a notebook's committed cells print or display as text, and its markdown (the header)."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream"
                         else out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_the_readme_table_of_reference_runs_quotes_the_committed_outputs():
    """Every decimal number in a row of the README's reference-run table is printed in that notebook's outputs."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- BEGIN notebook-results -->")[1].split("<!-- END notebook-results -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if re.match(r"\|\s*0\d", line)]
    assert len(rows) >= 4
    for cells in rows:
        path = next((ROOT / "notebooks").glob(f"{cells[0][:2]}_*.ipynb"))
        printed = output_text(path)
        for number in re.findall(r"\d+\.\d+", " | ".join(cells[1:])):
            assert number in printed, f"README says {number} for {path.name}, which its outputs never print"


def test_outputs_name_no_folder_of_the_machine_that_made_them(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(OUT)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"saved {ROOT}/runs/x.safetensors\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": f"'{Path.home()}/.cache'"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    run_notebooks.set_header(nb, "**Reference run.** test")
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert "outputs show this machine's paths" in run_notebooks.check([path])[0]
    run_notebooks.scrub_paths(nb)
    nbformat.write(nb, path)
    assert run_notebooks.check([path]) == []
    assert cell.outputs[0].text == "saved runs/x.safetensors\n" and cell.outputs[1].data["text/plain"] == "'~/.cache'"
