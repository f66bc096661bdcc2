"""Checksummed, cached, retried downloads of the raw dataset files, with a mirror override.

Every raw file has a *relative path* in the layout of the shared datasets folder, e.g.
``squad/dev-v1.1.json`` or ``nlu_evaluation_data/KFold_1/trainset/alarm_set.csv``, and a sha256 in a
*registry* (sha256sum format: ``<hash>  <relative path>`` per line). :class:`Fetcher` turns a relative path
into a verified local file, from one of three places:

* a **directory mirror** (``PROMPTLAB_DATA_MIRROR=/some/dir`` or ``file:///some/dir``): read in place,
  after checking its sha256 (nothing is copied, and a file that fails the check is never used);
* an **http(s) mirror** (``PROMPTLAB_DATA_MIRROR=https://host/datasets/``): downloaded with pooch into
  the cache (``$PROMPTLAB_CACHE`` or ``~/.cache/promptlab``, sub-folder ``data/``);
* the datasets' **public homes** when there is no mirror (the Financial PhraseBank comes as one zip, which
  is checked against its own sha256, extracted safely, and whose ``Sentences_*.txt`` members are checked
  one by one).

``make_fetcher("samples")`` reads the small sample files bundled in ``promptlab/data/samples/`` instead,
checked against their own ``SHA256SUMS``.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlparse

from ..errors import ConfigError, DataError, DownloadError

ENV_MIRROR = "PROMPTLAB_DATA_MIRROR"
ENV_CACHE = "PROMPTLAB_CACHE"
SOURCES = ("remote", "samples")

PACKAGE_DIR = Path(__file__).resolve().parent
REGISTRY_PATH = PACKAGE_DIR / "registry.txt"
SAMPLES_DIR = PACKAGE_DIR / "samples"
SAMPLES_REGISTRY_PATH = SAMPLES_DIR / "SHA256SUMS"

# The datasets' public homes. Module constants, so tests can point them at a local server.
PHRASEBANK_ZIP_URL = (
    "https://huggingface.co/datasets/takala/financial_phrasebank/resolve/main/data/FinancialPhraseBank-v1.0.zip"
)
PHRASEBANK_ZIP_RELPATH = "financial_phrasebank/FinancialPhraseBank-v1.0.zip"
# The zip's sha256 (681890 bytes), as pinned by Hugging Face's financial_phrasebank dataset_infos.json. The
# zip is only a way to get the Sentences_*.txt files (each checked again against the registry), so it
# lives here beside its URL, not in the registry of the files the dataset builders read.
PHRASEBANK_ZIP_SHA256 = "0e1a06c4900fdae46091d031068601e3773ba067c7cecb5b0da1dcba5ce989a6"
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
NLU_URL = (
    "https://raw.githubusercontent.com/xliuhw/NLU-Evaluation-Data/f6071b496b17d71e6eb43f543af0707f4ff30557/"
    "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation/"
)

MIRROR_HINT = (
    f"set {ENV_MIRROR} to a directory or http(s) URL laid out like the shared datasets folder "
    "(financial_phrasebank/..., squad/..., nlu_evaluation_data/KFold_1/...) to use a local copy"
)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """promptlab's cache folder: ``$PROMPTLAB_CACHE`` or ``~/.cache/promptlab``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "promptlab").expanduser()


@dataclass(frozen=True)
class Registry:
    """Known files: relative path -> sha256, read from a sha256sum-style file (``origin``)."""

    entries: dict[str, str]
    origin: str = "<memory>"

    def sha256(self, relpath: str) -> str:
        """The expected sha256 of ``relpath``; DownloadError when the registry does not list it."""
        try:
            return self.entries[relpath]
        except KeyError:
            raise DownloadError(f"{relpath} is not listed in the registry {self.origin}") from None

    def files_under(self, prefix: str) -> list[str]:
        """Sorted relative paths that start with ``prefix`` (a folder ending with '/')."""
        return sorted(p for p in self.entries if p.startswith(prefix))

    def __contains__(self, relpath: object) -> bool:
        return relpath in self.entries


def load_registry(path: str | Path) -> Registry:
    """Read a sha256sum-format file (``<64 hex>  <path>``, optional ``*`` before the path, ``./`` dropped).

    Blank lines and lines starting with '#' are skipped; anything else malformed raises DataError
    naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read checksum registry ({exc.strerror or exc})") from exc
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        name = name.lstrip(" *")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest) or not name:
            raise DataError(f"{path}:{lineno}: expected '<sha256>  <relative path>', found {line!r}")
        name = name[2:] if name.startswith("./") else name
        if name in entries:
            raise DataError(f"{path}:{lineno}: {name} is listed twice")
        entries[name] = digest.lower()
    return Registry(entries, str(path))


def default_registry() -> Registry:
    """The registry of the real upstream files (shipped as ``promptlab/data/registry.txt``)."""
    return load_registry(REGISTRY_PATH)


def samples_registry() -> Registry:
    """The registry of the bundled sample files (``promptlab/data/samples/SHA256SUMS``)."""
    return load_registry(SAMPLES_REGISTRY_PATH)


def public_url(relpath: str) -> str:
    """The public URL of a raw file that is downloaded on its own (not the PhraseBank, which is a zip)."""
    if relpath.startswith("squad/"):
        return SQUAD_URL + quote(relpath[len("squad/"):])
    if relpath.startswith("nlu_evaluation_data/KFold_1/"):
        return NLU_URL + quote(relpath[len("nlu_evaluation_data/"):])
    raise DownloadError(f"{relpath} has no known public home; {MIRROR_HINT}")


def safe_extract(zip_path: str | Path, target_dir: str | Path) -> list[Path]:
    """Extract a zip archive into ``target_dir`` and return the extracted files.

    Every member is checked before anything is written: an absolute path, a drive letter, a '..' part,
    a symbolic link, or any path that would land outside ``target_dir`` rejects the whole archive with
    DownloadError (a "zip slip" must never write outside the cache).
    """
    zip_path = Path(zip_path)
    target = Path(target_dir).resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{zip_path}: not a readable zip archive ({exc})") from exc
    with archive:
        members = archive.infolist()
        for member in members:
            name = member.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            escapes = (
                name.startswith("/")
                or (len(name) > 1 and name[1] == ":")  # a Windows drive letter
                or ".." in parts
                or not (target / name).resolve().is_relative_to(target)
            )
            if escapes:
                raise DownloadError(
                    f"{zip_path}: member {member.filename!r} would be written outside {target}; archive rejected"
                )
            if stat.S_ISLNK(member.external_attr >> 16):
                raise DownloadError(f"{zip_path}: member {member.filename!r} is a symbolic link; archive rejected")
        target.mkdir(parents=True, exist_ok=True)
        extracted = []
        for member in members:
            path = Path(archive.extract(member, target))
            if not member.is_dir():
                extracted.append(path)
    return extracted


class _HashingDownloader:
    """Wraps pooch's HTTP downloader and remembers the sha256 of the last file it wrote.

    Pooch deletes a download whose hash does not match; keeping the actual hash lets the error say
    what arrived instead of what was expected.
    """

    def __init__(self, progress: bool, timeout: float) -> None:
        import pooch  # imported here: pooch pulls in requests, which data parsing never needs

        self.inner = pooch.HTTPDownloader(progressbar=progress, timeout=timeout)
        self.last_sha256: str | None = None

    def __call__(self, url, output_file, pooch_obj, check_only=False):
        result = self.inner(url, output_file, pooch_obj, check_only=check_only)
        if not check_only and isinstance(output_file, (str, os.PathLike)):
            self.last_sha256 = sha256_file(output_file)
        return result


@dataclass
class Fetcher:
    """Turns relative paths into verified local files.

    Attributes:
        registry: the expected sha256 of every file that may be fetched.
        mirror: None for the public homes, else a directory (or ``file://`` URL) or an http(s) URL laid
            out like the shared datasets folder.
        cache_dir: promptlab's cache folder (downloads go to its ``data/`` sub-folder); None: the default.
        progress: show a tqdm progress bar while downloading.
        retries: extra download attempts after a failure (pooch ``retry_if_failed``).
        timeout: seconds to wait for the server before an attempt fails.
        source: a name for manifests ("remote" or "samples").
    """

    registry: Registry
    mirror: str | None = None
    cache_dir: Path | None = None
    progress: bool = True
    retries: int = 3
    timeout: float = 60.0
    source: str = "remote"
    _mirror_dir: Path | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.mirror is not None and not str(self.mirror).strip():
            self.mirror = None
        if self.mirror is not None:
            self.mirror = str(self.mirror)
            parsed = urlparse(self.mirror)
            if parsed.scheme in ("http", "https"):
                pass
            elif parsed.scheme == "file":
                self._mirror_dir = Path(unquote(parsed.path))
            elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
                self._mirror_dir = Path(self.mirror).expanduser()
            else:
                raise DownloadError(f"mirror {self.mirror!r} is neither a directory nor an http(s) URL")
            if self._mirror_dir is not None and not self._mirror_dir.is_dir():
                raise DownloadError(f"mirror directory {self._mirror_dir} does not exist (from {ENV_MIRROR} or --mirror)")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")

    @property
    def data_cache(self) -> Path:
        """Where downloaded files are kept: ``<cache_dir>/data``."""
        return (self.cache_dir if self.cache_dir is not None else default_cache_dir()) / "data"

    def describe(self) -> str:
        """Where files come from, in words (for manifests and messages)."""
        if self.source == "samples":
            return "bundled samples"
        return f"mirror {self.mirror}" if self.mirror else "public homes"

    def fetch(self, relpath: str) -> Path:
        """A local, sha256-verified copy of ``relpath``; DownloadError if it cannot be had."""
        expected = self.registry.sha256(relpath)
        if self._mirror_dir is not None:
            return self._from_directory(relpath, expected)
        if self.mirror is not None:
            url = self.mirror.rstrip("/") + "/" + quote(relpath)
            return self._download(relpath, url, expected, from_mirror=True)
        if relpath.startswith("financial_phrasebank/"):
            return self._from_phrasebank_zip(relpath, expected)
        return self._download(relpath, public_url(relpath), expected, from_mirror=False)

    # -- the three places -------------------------------------------------------------------------------

    def _from_directory(self, relpath: str, expected: str) -> Path:
        path = self._mirror_dir / relpath
        if not path.is_file():
            raise DownloadError(f"{relpath} is missing from the mirror {self._mirror_dir} (looked for {path})")
        actual = sha256_file(path)
        if actual != expected:
            raise DownloadError(
                f"sha256 mismatch for {path}: expected {expected}, got {actual}; the file was not used"
            )
        return path

    def _download(self, relpath: str, url: str, expected: str, from_mirror: bool) -> Path:
        """Download ``url`` into the cache as ``relpath`` (unless a verified copy is there already); the
        download must have sha256 ``expected`` or it is deleted."""
        import pooch
        import requests

        target = self.data_cache / relpath
        if target.is_file():
            if sha256_file(target) == expected:
                return target  # cache hit
            target.unlink()  # a stale or tampered copy is never used, nor kept
        store = pooch.Pooch(
            path=self.data_cache,
            base_url="",
            registry={relpath: expected},
            urls={relpath: url},
            retry_if_failed=self.retries,
        )
        downloader = _HashingDownloader(self.progress, self.timeout)
        attempts = self.retries + 1
        try:
            return Path(store.fetch(relpath, downloader=downloader))
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if from_mirror and status == 404:
                raise DownloadError(f"{relpath} is missing from the mirror {self.mirror} ({url}: HTTP 404)") from exc
            raise DownloadError(f"downloading {relpath} from {url} failed: HTTP {status}; {MIRROR_HINT}") from exc
        except requests.RequestException as exc:
            raise DownloadError(
                f"could not download {relpath} from {url} after {attempts} attempt(s): "
                f"{type(exc).__name__}; {MIRROR_HINT}"
            ) from exc
        except ValueError as exc:
            # pooch raises ValueError for a hash mismatch, after deleting the download.
            raise DownloadError(
                f"sha256 mismatch for {relpath} downloaded from {url}: expected {expected}, "
                f"got {downloader.last_sha256}; the download was discarded (nothing cached)"
            ) from exc

    def _from_phrasebank_zip(self, relpath: str, expected: str) -> Path:
        """Get a Financial PhraseBank file out of the upstream zip, checking every member we keep."""
        target = self.data_cache / relpath
        if target.is_file():
            if sha256_file(target) == expected:
                return target
            target.unlink()
        # the archive is checked before it is opened: a tampered zip is never extracted
        zip_path = self._download(PHRASEBANK_ZIP_RELPATH, PHRASEBANK_ZIP_URL, PHRASEBANK_ZIP_SHA256,
                                  from_mirror=False)
        wanted = PurePosixPath(relpath).name
        try:
            with tempfile.TemporaryDirectory(dir=zip_path.parent, prefix=".extract-") as tmp:
                found = None
                for path in safe_extract(zip_path, tmp):
                    if "__MACOSX" in path.parts or not path.name.startswith("Sentences_"):
                        continue
                    member_rel = f"financial_phrasebank/{path.name}"
                    if member_rel not in self.registry:
                        continue
                    actual = sha256_file(path)
                    if actual != self.registry.sha256(member_rel):
                        if path.name == wanted:
                            raise DownloadError(
                                f"sha256 mismatch for {path.name} in {PHRASEBANK_ZIP_URL}: expected {expected}, "
                                f"got {actual}; the archive was discarded (nothing cached)"
                            )
                        continue  # a bad sibling is simply not kept
                    os.replace(path, self.data_cache / member_rel)
                    if path.name == wanted:
                        found = self.data_cache / member_rel
                if found is None:
                    raise DownloadError(f"{PHRASEBANK_ZIP_URL} has no member {wanted}; {MIRROR_HINT}")
        except DownloadError:
            zip_path.unlink(missing_ok=True)  # a bad archive must not be reused from the cache
            raise
        return found


def make_fetcher(
    source: str = "remote",
    *,
    mirror: str | None = None,
    registry: Registry | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Fetcher:
    """A Fetcher for ``source``:

    * ``"remote"``: ``mirror`` (default: ``$PROMPTLAB_DATA_MIRROR``), else the public homes, checked
      against ``registry`` (default: the real files' registry);
    * ``"samples"``: the bundled sample folder, read in place and checked against its ``SHA256SUMS``.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if source == "samples":
        return Fetcher(registry or samples_registry(), mirror=str(SAMPLES_DIR), cache_dir=cache,
                       progress=progress, retries=retries, timeout=timeout, source="samples")
    if mirror is None:
        mirror = os.environ.get(ENV_MIRROR) or None
    return Fetcher(registry or default_registry(), mirror=mirror, cache_dir=cache,
                   progress=progress, retries=retries, timeout=timeout, source="remote")


def fetch_file(relpath: str, source: str = "remote", **options) -> Path:
    """Fetch one file by relative path (e.g. ``"squad/dev-v1.1.json"``): sha256-checked, cached, retried.

    ``options`` are those of :func:`make_fetcher` (mirror, registry, cache_dir, progress, retries, timeout).
    """
    return make_fetcher(source, **options).fetch(relpath)
