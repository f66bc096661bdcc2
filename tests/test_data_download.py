"""Downloads: registries, directory and HTTP mirrors (a local server on 127.0.0.1), cache, tampering,
unreachable hosts, the PhraseBank zip and safe extraction. No internet needed."""
from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import stat
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from promptlab.data import download
from promptlab.data.download import (
    Fetcher,
    default_registry,
    fetch_file,
    load_registry,
    make_fetcher,
    safe_extract,
    samples_registry,
    sha256_file,
)
from promptlab.errors import ConfigError, DataError, DownloadError

SAMPLES = download.SAMPLES_DIR
DEV = "squad/dev-v1.1.json"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder quietly and records every requested path on the server."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.server.fail_status:
            self.send_error(self.server.fail_status)
            return
        super().do_GET()


class LocalServer:
    """An HTTP server on 127.0.0.1 in a thread, serving ``root``."""

    def __init__(self, root: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.httpd.requests = []
        self.httpd.fail_status = 0
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def fail_with(self, status: int) -> None:
        self.httpd.fail_status = status

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror_copy(tmp_path: Path) -> Path:
    """A writable copy of the samples folder, laid out like the datasets mirror."""
    return Path(shutil.copytree(SAMPLES, tmp_path / "mirror"))


@pytest.fixture
def serve():
    servers = []

    def start(root: Path) -> LocalServer:
        server = LocalServer(root)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def no_sleep(monkeypatch):
    """pooch waits 1 s, 2 s, ... between attempts; tests need not."""
    import pooch.core

    monkeypatch.setattr(pooch.core.time, "sleep", lambda seconds: None)


def _http_fetcher(url: str, cache: Path, retries: int = 0) -> Fetcher:
    return make_fetcher("remote", mirror=url, registry=samples_registry(), cache_dir=cache,
                        progress=False, retries=retries, timeout=5)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- registries ------------------------------------------------------------------------------------------


def test_default_registry_lists_every_needed_file():
    registry = default_registry()
    assert len(registry.files_under("nlu_evaluation_data/KFold_1/trainset/")) == 64
    assert len(registry.files_under("nlu_evaluation_data/KFold_1/testset/csv/")) == 64
    assert registry.sha256("financial_phrasebank/Sentences_AllAgree.txt").startswith("5fb370b3")
    assert registry.sha256("squad/dev-v1.1.json").startswith("95aa6a52")
    assert registry.sha256("squad/train-v1.1.json").startswith("35276639")
    with pytest.raises(DownloadError, match="not listed"):
        registry.sha256("squad/train-v2.0.json")


def test_samples_checksums_are_up_to_date():
    registry = samples_registry()
    on_disk = {p.relative_to(SAMPLES).as_posix() for p in _files_under(SAMPLES)} - {"SHA256SUMS", "README.md"}
    assert set(registry.entries) == on_disk
    for relpath, expected in registry.entries.items():
        assert sha256_file(SAMPLES / relpath) == expected, relpath


def test_malformed_registry_line_names_file_and_line(tmp_path):
    path = tmp_path / "SUMS"
    path.write_text(f"{'a' * 64}  ./ok.txt\nnot-a-hash  bad.txt\n")
    with pytest.raises(DataError, match=r"SUMS:2: expected"):
        load_registry(path)


# -- directory mirror ------------------------------------------------------------------------------------


def test_samples_source_reads_verified_files_in_place():
    path = make_fetcher("samples").fetch(DEV)
    assert path == SAMPLES / DEV


def test_directory_mirror_from_environment(monkeypatch, mirror_copy, tmp_path):
    monkeypatch.setenv("PROMPTLAB_DATA_MIRROR", str(mirror_copy))
    path = fetch_file(DEV, registry=samples_registry(), cache_dir=tmp_path / "cache")
    assert path == mirror_copy / DEV
    assert not (tmp_path / "cache").exists()  # read in place: nothing copied


def test_directory_mirror_missing_file(mirror_copy):
    (mirror_copy / DEV).unlink()
    fetcher = make_fetcher("remote", mirror=str(mirror_copy), registry=samples_registry())
    with pytest.raises(DownloadError, match=r"squad/dev-v1\.1\.json is missing from the mirror"):
        fetcher.fetch(DEV)


def test_directory_mirror_tampered_file_is_refused(mirror_copy):
    target = mirror_copy / DEV
    target.write_bytes(target.read_bytes().replace(b"Tidal", b"Tiday"))
    actual = sha256_file(target)
    fetcher = make_fetcher("remote", mirror=f"file://{mirror_copy}", registry=samples_registry())
    with pytest.raises(DownloadError) as info:
        fetcher.fetch(DEV)
    message = str(info.value)
    assert str(target) in message and samples_registry().sha256(DEV) in message and actual in message


def test_mirror_that_does_not_exist(tmp_path):
    with pytest.raises(DownloadError, match="does not exist"):
        make_fetcher("remote", mirror=str(tmp_path / "nowhere"))
    with pytest.raises(DownloadError, match="neither a directory nor an http"):
        make_fetcher("remote", mirror="ftp://example.org/data")
    with pytest.raises(ConfigError, match="unknown data source"):
        make_fetcher("somewhere")


# -- HTTP mirror -----------------------------------------------------------------------------------------


def test_http_mirror_downloads_verifies_and_caches(serve, tmp_path):
    server = serve(SAMPLES)
    cache = tmp_path / "cache"
    fetcher = _http_fetcher(server.url, cache)
    path = fetcher.fetch(DEV)
    assert path == cache / "data" / DEV
    assert sha256_file(path) == samples_registry().sha256(DEV)
    assert server.requests == ["/" + DEV]
    # A second fetch is a cache hit: no request reaches the server.
    assert fetcher.fetch(DEV) == path
    assert server.requests == ["/" + DEV]


def test_http_mirror_replaces_a_tampered_cache_copy(serve, tmp_path):
    server = serve(SAMPLES)
    cache = tmp_path / "cache"
    stale = cache / "data" / DEV
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    path = _http_fetcher(server.url, cache).fetch(DEV)
    assert sha256_file(path) == samples_registry().sha256(DEV)
    assert len(server.requests) == 1


def test_http_mirror_tampered_file_errors_and_caches_nothing(serve, mirror_copy, tmp_path, no_sleep):
    target = mirror_copy / DEV
    target.write_bytes(target.read_bytes().replace(b"Tidal", b"Tiday"))
    server = serve(mirror_copy)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        _http_fetcher(server.url, cache, retries=1).fetch(DEV)
    message = str(info.value)
    assert DEV in message
    assert samples_registry().sha256(DEV) in message  # expected
    assert sha256_file(target) in message  # actual
    assert _files_under(cache) == []  # neither the bad file nor a temporary file is left


def test_http_mirror_missing_file(serve, mirror_copy, tmp_path):
    (mirror_copy / DEV).unlink()
    server = serve(mirror_copy)
    with pytest.raises(DownloadError, match=r"squad/dev-v1\.1\.json is missing from the mirror"):
        _http_fetcher(server.url, tmp_path / "cache").fetch(DEV)


def test_server_errors_are_retried_then_reported(serve, tmp_path, no_sleep):
    server = serve(SAMPLES)
    server.fail_with(503)
    with pytest.raises(DownloadError, match="HTTP 503"):
        _http_fetcher(server.url, tmp_path / "cache", retries=2).fetch(DEV)
    assert len(server.requests) == 3  # one attempt plus two retries


def test_unreachable_host_names_url_and_suggests_mirror(tmp_path, no_sleep):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(DownloadError) as info:
        _http_fetcher(url, tmp_path / "cache", retries=1).fetch(DEV)
    message = str(info.value)
    assert url + DEV in message and "2 attempt" in message and "PROMPTLAB_DATA_MIRROR" in message


def test_public_homes_are_used_without_a_mirror(monkeypatch, serve, tmp_path):
    """Without a mirror, SQuAD comes from its public URL (here pointed at the local server)."""
    monkeypatch.delenv("PROMPTLAB_DATA_MIRROR", raising=False)
    server = serve(SAMPLES / "squad")
    monkeypatch.setattr(download, "SQUAD_URL", server.url)
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=tmp_path, progress=False)
    assert fetcher.mirror is None
    assert sha256_file(fetcher.fetch(DEV)) == samples_registry().sha256(DEV)
    assert server.requests == ["/dev-v1.1.json"]


def test_public_urls():
    assert download.public_url("squad/train-v1.1.json") == download.SQUAD_URL + "train-v1.1.json"
    url = download.public_url("nlu_evaluation_data/KFold_1/testset/csv/alarm_set.csv")
    assert url.endswith("/CrossValidation/KFold_1/testset/csv/alarm_set.csv")
    assert "f6071b496b17d71e6eb43f543af0707f4ff30557" in url


# -- the Financial PhraseBank zip --------------------------------------------------------------------------


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _phrasebank_members(tamper: str | None = None) -> dict[str, bytes]:
    members = {"__MACOSX/FinancialPhraseBank-v1.0/._Sentences_AllAgree.txt": b"resource fork"}
    for path in sorted((SAMPLES / "financial_phrasebank").iterdir()):
        data = path.read_bytes()
        if path.name == tamper:
            data = data.replace(b"positive", b"negative", 1)
        members[f"FinancialPhraseBank-v1.0/{path.name}"] = data
    return members


@pytest.fixture
def zip_home(monkeypatch, serve, tmp_path):
    """Serve a zip as the PhraseBank's public home; returns a function that writes the zip and, unless
    ``pin=False``, pins its sha256 as the expected one (as the real zip's is pinned)."""
    monkeypatch.delenv("PROMPTLAB_DATA_MIRROR", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    server = serve(site)
    monkeypatch.setattr(download, "PHRASEBANK_ZIP_URL", server.url + "FinancialPhraseBank-v1.0.zip")

    def publish(members: dict[str, bytes], pin: bool = True) -> LocalServer:
        archive = _write_zip(site / "FinancialPhraseBank-v1.0.zip", members)
        if pin:
            monkeypatch.setattr(download, "PHRASEBANK_ZIP_SHA256", sha256_file(archive))
        return server

    return publish


def test_the_real_phrasebank_zip_is_pinned():
    # Hugging Face's financial_phrasebank dataset_infos.json: 681890 bytes with this sha256
    assert download.PHRASEBANK_ZIP_SHA256 == "0e1a06c4900fdae46091d031068601e3773ba067c7cecb5b0da1dcba5ce989a6"


def test_phrasebank_zip_with_another_sha256_is_never_opened(zip_home, tmp_path, monkeypatch):
    """A zip whose bytes differ from the pinned sha256 is deleted before anything is extracted, even when
    every member inside it would pass its own check."""
    zip_home(_phrasebank_members(), pin=False)  # the pinned hash stays the real zip's
    extracted = []
    monkeypatch.setattr(download, "safe_extract", lambda *a: extracted.append(a) or [])
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=cache, progress=False, retries=0)
    with pytest.raises(DownloadError) as info:
        fetcher.fetch("financial_phrasebank/Sentences_AllAgree.txt")
    message = str(info.value)
    assert "sha256 mismatch" in message and download.PHRASEBANK_ZIP_SHA256 in message
    assert extracted == [] and _files_under(cache) == []


def test_phrasebank_from_zip(zip_home, tmp_path):
    server = zip_home(_phrasebank_members())
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=cache, progress=False)
    relpath = "financial_phrasebank/Sentences_AllAgree.txt"
    path = fetcher.fetch(relpath)
    assert path == cache / "data" / relpath
    assert sha256_file(path) == samples_registry().sha256(relpath)
    # The other agreement levels came out of the same archive: no second download.
    assert fetcher.fetch("financial_phrasebank/Sentences_50Agree.txt").is_file()
    assert len(server.requests) == 1
    assert not list((cache / "data" / "financial_phrasebank").glob(".extract-*"))


def test_phrasebank_zip_with_a_bad_member_is_discarded(zip_home, tmp_path):
    zip_home(_phrasebank_members(tamper="Sentences_AllAgree.txt"))
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=cache, progress=False)
    with pytest.raises(DownloadError, match=r"sha256 mismatch for Sentences_AllAgree\.txt.*expected"):
        fetcher.fetch("financial_phrasebank/Sentences_AllAgree.txt")
    cached = {p.name for p in _files_under(cache)}
    assert "Sentences_AllAgree.txt" not in cached and "FinancialPhraseBank-v1.0.zip" not in cached


def test_phrasebank_zip_that_escapes_is_rejected(zip_home, tmp_path):
    members = _phrasebank_members()
    members["../evil.txt"] = b"gotcha"
    zip_home(members)
    cache = tmp_path / "cache"
    fetcher = make_fetcher("remote", registry=samples_registry(), cache_dir=cache, progress=False)
    with pytest.raises(DownloadError, match="outside"):
        fetcher.fetch("financial_phrasebank/Sentences_AllAgree.txt")
    assert not list(tmp_path.rglob("evil.txt"))
    assert _files_under(cache) == []


# -- safe extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/tmp/evil-absolute", "C:/evil", "..\\evil"])
def test_safe_extract_rejects_escaping_members(tmp_path, name):
    archive = _write_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"gotcha"})
    target = tmp_path / "out"
    with pytest.raises(DownloadError, match="archive rejected"):
        safe_extract(archive, target)
    assert not target.exists()  # checked before anything was written
    assert not list(tmp_path.rglob("evil*"))


def test_safe_extract_rejects_symlinks(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DownloadError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_safe_extract_extracts_nested_members(tmp_path):
    archive = _write_zip(tmp_path / "ok.zip", {"dir/a.txt": b"a", "dir/sub/b.txt": b"b"})
    files = safe_extract(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["dir/a.txt", "dir/sub/b.txt"]


def test_safe_extract_rejects_a_non_zip(tmp_path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(hashlib.sha256(b"x").digest())
    with pytest.raises(DownloadError, match="not a readable zip"):
        safe_extract(bogus, tmp_path / "out")
