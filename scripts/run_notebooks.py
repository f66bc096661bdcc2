"""Regenerate the notebooks' committed outputs: one reference run of each in full mode.

    PROMPTLAB_DATA_MIRROR=/path/to/datasets python scripts/run_notebooks.py            # all five
    python scripts/run_notebooks.py 02 03 -p MAX_TIME=600                               # some, with parameters
    python scripts/run_notebooks.py --check                                             # sizes and headers only

Each notebook runs top to bottom with nbclient in notebooks/ (the embedded model, the real data through
``PROMPTLAB_DATA_MIRROR``, the precision the library picks), its ``-p NAME=VALUE`` parameters injected in a
cell after the one tagged ``parameters``, as papermill does. The run's facts (machine, model, data,
precision, date, wall time) go into a markdown cell tagged ``reference-run`` right after the title, so the
first thing a reader sees says what made the outputs. Absolute paths of the machine (the checkout, the data
mirror, the home and temp folders) are rewritten in the outputs (``--scrub`` does only that). A notebook over 2 MB is an error. Quick-mode CI
(``pytest --nbmake``) never writes the notebooks, so it leaves these outputs untouched.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MAX_BYTES = 2 * 1024 * 1024
HEADER_TAG = "reference-run"


def inject_parameters(nb, values: dict[str, object]) -> None:
    """Put ``values`` in a cell tagged ``injected-parameters`` right after the ``parameters`` cell."""
    import nbformat

    cells = nb.cells
    cells[:] = [c for c in cells if "injected-parameters" not in c.metadata.get("tags", [])]
    if not values:
        return
    at = next((i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])), None)
    if at is None:
        raise SystemExit("the notebook has no cell tagged 'parameters'")
    source = "# parameters of this run\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def header(seconds: float, values: dict[str, object]) -> str:
    """The reference-run cell: what made the outputs below."""
    import torch

    import promptlab as pl
    from promptlab.precision import choose_precision, cpu_name, default_device

    device = default_device()
    precision = choose_precision(device)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    mirror = os.environ.get("PROMPTLAB_DATA_MIRROR")
    return (f"**Reference run.** The outputs below come from one run of this notebook in full mode on "
            f"{gpu or cpu_name()} ({os.cpu_count()} logical cores), {precision.name} ({precision.reason}), "
            f"the embedded SmolLM2-135M-Instruct unless a parameter says otherwise, the real datasets "
            f"({'from a local mirror' if mirror else 'from their public homes'}), promptlab {pl.__version__}, "
            f"torch {torch.__version__}, on {time.strftime('%Y-%m-%d')}; the run took {seconds / 60:.1f} minutes"
            + (f"; parameters: {', '.join(f'{k}={v!r}' for k, v in values.items())}" if values else "")
            + ". Regenerate with `python scripts/run_notebooks.py`.")


def set_header(nb, text: str) -> None:
    import nbformat

    nb.cells[:] = [c for c in nb.cells if HEADER_TAG not in c.metadata.get("tags", [])]
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(text, metadata={"tags": [HEADER_TAG]}))


def strip_widget_state(nb) -> None:
    """Widget states are large and useless outside a live kernel; the outputs keep their text fallbacks."""
    nb.metadata.pop("widgets", None)


def machine_paths() -> list[tuple[str, str]]:
    """(absolute path of this machine, what outputs show instead), most specific first: outputs read the same
    wherever they were made, and name no folder of the machine that made them."""
    pairs = [(os.environ.get("PROMPTLAB_DATA_MIRROR", ""), "$PROMPTLAB_DATA_MIRROR"),
             (str(NOTEBOOKS.parent) + os.sep, ""), (str(NOTEBOOKS.parent), "."),
             (str(Path.home()) + os.sep, "~" + os.sep), (tempfile.gettempdir() + os.sep, "$TMPDIR" + os.sep)]
    return [(old, new) for old, new in pairs if len(old) > 1]  # an unset mirror is ""


def scrub_paths(nb) -> None:
    """Rewrite this machine's absolute paths in every text output (`machine_paths`)."""
    def scrub(text):
        if isinstance(text, list):
            return [scrub(t) for t in text]
        for old, new in machine_paths():
            text = text.replace(old, new)
        return text

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(out["text"])
            for key, value in out.get("data", {}).items():
                if key.startswith("text/"):
                    out["data"][key] = scrub(value)
            if "traceback" in out:
                out["traceback"] = scrub(out["traceback"])


def run(path: Path, values: dict[str, object], timeout: int) -> float:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, values)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.perf_counter() - start
    set_header(nb, header(seconds, values))
    strip_widget_state(nb)
    scrub_paths(nb)
    nbformat.write(nb, path)
    return seconds


def check(paths: list[Path]) -> list[str]:
    """Problems of the committed notebooks: over 2 MB, or outputs without a reference-run header."""
    import nbformat

    problems = []
    for path in paths:
        if path.stat().st_size > MAX_BYTES:
            problems.append(f"{path.name}: {path.stat().st_size} bytes, over {MAX_BYTES}")
        nb = nbformat.read(path, as_version=4)
        has_outputs = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
        has_header = any(HEADER_TAG in c.metadata.get("tags", []) for c in nb.cells)
        if has_outputs and not has_header:
            problems.append(f"{path.name}: outputs without a '{HEADER_TAG}' cell saying what made them")
        text = path.read_text(encoding="utf-8")
        shown = [old for old, _ in machine_paths() if old in text]
        if shown:
            problems.append(f"{path.name}: outputs show this machine's paths {shown} (--scrub rewrites them)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", help="notebook numbers or names (default: all)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter (a Python literal, else a string)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--check", action="store_true", help="only check sizes, headers and paths")
    parser.add_argument("--scrub", action="store_true",
                        help="only rewrite this machine's absolute paths in the committed outputs")
    args = parser.parse_args(argv)
    paths = sorted(p for p in NOTEBOOKS.glob("*.ipynb")
                   if not args.which or any(p.name.startswith(w) or p.stem == w for w in args.which))
    if args.scrub:
        import nbformat

        for path in paths:
            nb = nbformat.read(path, as_version=4)
            scrub_paths(nb)
            nbformat.write(nb, path)
    if args.check or args.scrub:
        problems = check(paths)
        print("\n".join(problems) or f"{len(paths)} notebooks: under 2 MB, outputs headed")
        return 1 if problems else 0
    if os.environ.get("PROMPTLAB_QUICK") == "1":
        raise SystemExit("unset PROMPTLAB_QUICK: reference outputs come from full mode")
    values = {}
    for item in args.parameter:
        name, _, text = item.partition("=")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[name] = text
    for path in paths:
        seconds = run(path, values, args.timeout)
        print(f"{path.name}: {seconds / 60:.1f} min, {path.stat().st_size / 1e6:.2f} MB")
    problems = check(paths)
    print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
