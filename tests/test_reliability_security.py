"""Security: no code from data, verified downloads, safe archive extraction.

* The package source never unpickles, never ``eval``s or ``exec``s, never loads YAML unsafely, and any
  ``torch.load`` uses ``weights_only=True`` (checked on the code itself, not comments or docstrings).
* Malicious YAML (``!!python/object/apply:os.system``) given to ``load_tasks`` and to the run-config loader
  is refused with ConfigError and runs nothing; a pickle renamed ``.safetensors`` is refused by
  ``PromptTable.load``, checkpoint loading and ``load_trainable``, and runs nothing.
* Every file that feeds a dataset comes through a sha256-checked fetch: the builders ask only for files the
  registry lists, the parsers read nothing else, and a tampered copy of any one sample file stops its dataset.
* A downloaded archive with a ``../`` member, an absolute path or a symbolic link is rejected with nothing
  written outside the cache; a tampered, short or cut-off download is removed and never used.
"""
from __future__ import annotations

import ast
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import stat
import threading
import tokenize
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch

import promptlab
import promptlab as pl
from promptlab.checkpoint import load_checkpoint
from promptlab.data import assistant, download, financial_phrasebank, prepare, squad
from promptlab.data.download import Fetcher, default_registry, make_fetcher, samples_registry, sha256_file
from promptlab.errors import CheckpointError, ConfigError, DownloadError, PromptTableError
from promptlab.pipeline import load_run_config
from promptlab.templates import load_tasks

PACKAGE = Path(promptlab.__file__).resolve().parent
SAMPLES = download.SAMPLES_DIR


# ------------------------------------------------------------------------------- no code from data
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all", "Loader",
               "FullLoader", "UnsafeLoader"}
LITERAL_BANS = {"pickle": r"pickle", "torch.load": r"torch\.load\b", "eval(": r"(?<![\w.])eval\(",
                "exec(": r"(?<![\w.])exec\(", "yaml.load(": r"yaml\.(load|unsafe_load|full_load)(_all)?\("}


def code_only(source: str) -> str:
    """The source with comments and string literals (docstrings included) blanked out."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            continue
        out.append(tok.string)
    return re.sub(r"\s*([().=,\[\]])\s*", r"\1", " ".join(out))  # "x . load ( a = 1 )" -> "x.load(a=1)"


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every way ``source`` could run code from data: the literal patterns, then an AST check of calls."""
    found = []
    code = code_only(source)
    for name, pattern in LITERAL_BANS.items():
        if re.search(pattern, code) and not (name == "torch.load" and "weights_only=True" in code):
            found.append(f"{filename}: '{name}' in the code")
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLERS:
                found.append(f"{where}: from {node.module} import")
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
            if module == "yaml" and any(a.name in UNSAFE_YAML for a in node.names):
                found.append(f"{where}: from yaml import an unsafe loader")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{where}: {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if func.value.id == "torch" and func.attr == "load":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        found.append(f"{where}: torch.load without weights_only=True")
                if func.value.id in PICKLERS:
                    found.append(f"{where}: {func.value.id}.{func.attr}()")
            for k in node.keywords:  # hub code and numpy pickles are code from data too
                if k.arg in ("trust_remote_code", "allow_pickle") and not (
                        isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where}: {k.arg}=...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr in UNSAFE_YAML:
            found.append(f"{where}: yaml.{node.attr}")
    return found


def test_the_scanner_catches_what_it_should():
    bad = {
        "import pickle\npickle.loads(b'')": 2,
        "from pickle import loads": 1,
        "import dill as d": 1,
        "x = eval('1+1')": 1,
        "exec(open('f').read())": 1,
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": 2,
        "import yaml\nyaml.unsafe_load(s)": 1,
        "import torch\ntorch.load('f.pt')": 1,
        "import torch\ntorch.load('f.pt', weights_only=False)": 1,
        "from torch import load": 1,
        "m = AutoModel.from_pretrained(n, trust_remote_code=True)": 1,
        "np.load(f, allow_pickle=True)": 1,
    }
    for source, at_least in bad.items():
        assert len(unsafe_uses(source)) >= at_least, source
    good = ['"""Never pickle; no torch.load here, no eval( either."""\nmodel.eval()\nx = 1  # yaml.load( is unsafe',
            "import yaml\nyaml.safe_load(s)", "import torch\ntorch.load('f', weights_only=True)",
            "import re\nre.compile('x')", "model.eval()\ntrainer.model.eval()"]
    for source in good:
        assert unsafe_uses(source) == [], source


def test_package_source_runs_no_code_from_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 15 and PACKAGE / "io.py" in files
    found = [f for path in files for f in unsafe_uses(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]
    assert found == []


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


YAML_PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/name:os.system",
    "!!python/module:os",
]


@pytest.mark.parametrize("payload", YAML_PAYLOADS)
def test_malicious_yaml_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = payload.format(marker=marker)
    documents = {
        "tasks.yaml (top level)": (load_tasks, f"tasks: {evil}\n"),
        "tasks.yaml (inside a task)": (load_tasks, f"tasks:\n  - taskname: a\n    prompt_template: {evil}\n"
                                                   f"    total_virtual_tokens: 1\n"),
        "run.yaml (top level)": (load_run_config, f"{evil}\n"),
        "run.yaml (training)": (load_run_config, f"model: tiny\nmethods: [{{method: prompt_tuning, task: sentiment}}]\n"
                                                 f"data: {{train: a.jsonl}}\noutput_dir: out\ntraining: {evil}\n"),
        "run.yaml (methods)": (load_run_config, f"model: tiny\nmethods:\n  - {evil}\n"),
    }
    for label, (load, text) in documents.items():
        path = write(tmp_path / "config.yaml", text)
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(path) in str(info.value), label
        assert not marker.exists(), f"{label}: the payload ran"
    # a run config whose tasks file is the malicious one
    write(tmp_path / "evil_tasks.yaml", f"tasks: {evil}\n")
    run = write(tmp_path / "run.yaml", "model: tiny\ntasks: evil_tasks.yaml\n"
                                       "methods: [{method: prompt_tuning, task: sentiment}]\n"
                                       "data: {train: a.jsonl}\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="evil_tasks.yaml"):
        load_run_config(run)
    assert not marker.exists()


class _Payload:
    """Unpickling this object would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_files_renamed_safetensors_are_refused(tiny_base, tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "pickle": pickle.dumps(_Payload(marker), protocol=4),
        "pickle protocol 0": pickle.dumps(_Payload(marker), protocol=0),
    }
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, buffer)  # torch's zip format, a pickle inside
    payloads["torch.save"] = buffer.getvalue()
    model = pl.PromptLearningModel(tiny_base, pl.default_tasks())
    model.add_prompt_tuning("sentiment", init_text="Classify")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    for label, data in payloads.items():
        path = tmp_path / "prompts.safetensors"
        path.write_bytes(data)
        with pytest.raises(PromptTableError, match=str(path)):
            pl.PromptTable.load(path, base=tiny_base)
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path, model, optimizer, {})
        with pytest.raises(CheckpointError, match=str(path)):
            model.load_trainable(path)
        assert not marker.exists(), f"{label}: the pickle ran"
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())
    assert pickle.loads(payloads["pickle"]) is not None and marker.exists()  # the payload is real


# ------------------------------------------------------------------------- every file is verified
class RecordingFetcher(Fetcher):
    """A Fetcher that remembers the verified paths it handed out."""

    def fetch(self, relpath: str) -> Path:
        path = super().fetch(relpath)
        self.handed_out.setdefault(relpath, path)
        return path


def recording_fetcher(mirror: Path, registry=None) -> RecordingFetcher:
    fetcher = RecordingFetcher(registry or samples_registry(), mirror=str(mirror), progress=False)
    fetcher.handed_out = {}
    return fetcher


@pytest.fixture
def parsed(monkeypatch) -> list[Path]:
    """Every path a dataset parser reads."""
    seen: list[Path] = []
    for module, name in ((financial_phrasebank, "parse_sentences"), (assistant, "parse_intent_file"),
                         (squad, "parse_squad")):
        real = getattr(module, name)

        def spy(path, *args, _real=real, **kwargs):
            seen.append(Path(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


BUILDS = [("sentiment", {"agreement": a}) for a in financial_phrasebank.AGREEMENTS] + [
    ("intent_and_slot", {}), ("squad", {}), ("squad", {"from_dev": True})]


def test_parsers_read_only_verified_files(parsed):
    fetcher = recording_fetcher(SAMPLES)
    for name, options in BUILDS:
        prepared = prepare.build_dataset(name, fetcher, **options)
        assert sorted(prepared.files) == sorted(set(prepared.files))
    verified = set(fetcher.handed_out.values())
    assert parsed and set(parsed) <= verified  # nothing parsed that was not fetched (and so sha256-checked)
    assert set(fetcher.handed_out) == set(samples_registry().entries)  # and every sample file was used


def test_real_registry_covers_every_file_the_builders_read(parsed, monkeypatch):
    """With the real registry, every file the builders ask for is listed (so it has a sha256 to check)."""
    registry = default_registry()
    asked: list[str] = []
    stand_in = {"financial_phrasebank/": SAMPLES / "financial_phrasebank" / "Sentences_AllAgree.txt",
                "squad/": SAMPLES / "squad" / "dev-v1.1.json",
                "nlu_evaluation_data/": SAMPLES / "nlu_evaluation_data/KFold_1/trainset/alarm_set.csv"}

    def fetch(self, relpath):  # no network: the registry must know the file, then a sample stands in
        registry.sha256(relpath)  # DownloadError if the file were not listed
        asked.append(relpath)
        return next(path for prefix, path in stand_in.items() if relpath.startswith(prefix))

    monkeypatch.setattr(Fetcher, "fetch", fetch)
    fetcher = Fetcher(registry, progress=False)
    for name, options in BUILDS:
        prepare.build_dataset(name, fetcher, **options)
    assert set(asked) == set(registry.entries)  # every listed file is needed, every needed file listed
    assert len(asked) >= 4 + 64 + 64 + 2
    assert len(parsed) == len(asked)  # each file asked for was parsed once per build that needs it


@pytest.mark.parametrize("relpath", sorted(samples_registry().entries))
def test_a_tampered_file_stops_its_dataset(tmp_path, parsed, relpath):
    mirror = Path(shutil.copytree(SAMPLES, tmp_path / "mirror"))
    target = mirror / relpath
    target.write_bytes(target.read_bytes() + b"\n")  # even one extra byte
    fetcher = recording_fetcher(mirror)
    name, options = next((n, o) for n, o in BUILDS if relpath in _files_of(n, o))
    with pytest.raises(DownloadError) as info:
        prepare.build_dataset(name, fetcher, **options)
    assert str(target) in str(info.value) and "sha256 mismatch" in str(info.value)
    assert target not in parsed


def _files_of(name: str, options: dict) -> list[str]:
    if name == "sentiment":
        return [financial_phrasebank.relpath_for(options["agreement"])]
    if name == "squad":
        return [squad.DEV_FILE] + ([] if options.get("from_dev") else [squad.TRAIN_FILE])
    return samples_registry().files_under("nlu_evaluation_data/")


# ---------------------------------------------------------------------------------- HTTP downloads
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes); ``server.cut`` sends only part of a body yet claims all of it."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: self.server.cut] if self.server.cut else data)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.cut = {}, 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_sleep(monkeypatch):
    import pooch.core

    monkeypatch.setattr(pooch.core.time, "sleep", lambda seconds: None)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.exists() else []


DEV = "squad/dev-v1.1.json"


@pytest.mark.parametrize("kind", ["cut off mid-transfer", "short file", "tampered byte"])
def test_bad_downloads_are_removed_and_never_used(server, tmp_path, no_sleep, kind):
    good = (SAMPLES / DEV).read_bytes()
    if kind == "cut off mid-transfer":
        server.files["/" + DEV], server.cut = good, len(good) // 3
    elif kind == "short file":
        server.files["/" + DEV] = good[: len(good) - 7]
    else:
        server.files["/" + DEV] = good.replace(b"Tidal", b"Tiday", 1)
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", mirror=server.url, registry=samples_registry(), cache_dir=cache,
                           progress=False, retries=1, timeout=5)
    with pytest.raises(DownloadError) as info:
        fetcher.fetch(DEV)
    assert DEV in str(info.value)
    assert ("could not download" if kind.startswith("cut") else "sha256 mismatch") in str(info.value)
    assert files_in(cache) == []  # neither the bad file nor a temporary copy stays in the cache
    server.files["/" + DEV], server.cut = good, 0  # once the server is fixed, the real file arrives
    path = fetcher.fetch(DEV)
    assert sha256_file(path) == samples_registry().sha256(DEV)


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("evil", ["../evil", "absolute", "symlink", "symlink then write through it"])
def test_malicious_phrasebank_zip_writes_nothing_outside(server, tmp_path, monkeypatch, evil):
    """The PhraseBank comes as a zip from its public home: a crafted archive must not escape the cache."""
    monkeypatch.delenv("PROMPTLAB_DATA_MIRROR", raising=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    good = [(f"FinancialPhraseBank-v1.0/{p.name}", p.read_bytes())
            for p in sorted((SAMPLES / "financial_phrasebank").iterdir())]
    bad = {
        "../evil": [("../../../outside/evil.txt", b"gotcha")],
        "absolute": [(str(outside / "evil.txt"), b"gotcha")],
        "symlink": [(_symlink("FinancialPhraseBank-v1.0/link", str(outside)), str(outside).encode())],
        "symlink then write through it": [(_symlink("link", str(outside)), str(outside).encode()),
                                          ("link/evil.txt", b"gotcha")],
    }[evil]
    server.files["/FinancialPhraseBank-v1.0.zip"] = _zip(bad + good)
    monkeypatch.setattr(download, "PHRASEBANK_ZIP_URL", server.url + "FinancialPhraseBank-v1.0.zip")
    # pinned as the real zip is: the crafted archive passes the sha256 check and reaches extraction
    monkeypatch.setattr(download, "PHRASEBANK_ZIP_SHA256", hashlib.sha256(server.files["/FinancialPhraseBank-v1.0.zip"]).hexdigest())
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=cache, progress=False, retries=0)
    with pytest.raises(DownloadError, match="archive rejected"):
        fetcher.fetch("financial_phrasebank/Sentences_AllAgree.txt")
    assert files_in(outside) == []
    assert files_in(cache) == []  # the rejected archive is not kept either
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("link"))
