"""Artifacts on disk: atomic writes, hashes and manifests.

Every step writes into a temporary sibling folder and renames it into place only when complete, so an
interrupted or failed step never leaves a half file under a final name and the previous artifact survives.
Every artifact folder carries a manifest with the sha256 of its files and of its inputs; a step whose
input hash is unchanged is skipped, and a consumer refuses files whose bytes don't match their manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd35trt.core.errors import ArtifactError, InvalidInputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """sd35trt's per-user cache (``$SD35TRT_CACHE``, else ``$XDG_CACHE_HOME/sd35trt``, else ``~/.cache/sd35trt``)."""
    if os.environ.get("SD35TRT_CACHE"):
        return Path(os.environ["SD35TRT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd35trt"


def file_stamp(path: Path) -> list[int]:
    """What changes when a file's bytes are replaced or edited in place: size, modification time, inode, device."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def known_sha256(path: Path) -> str:
    """sha256 of ``path``, read from the per-user cache while the file's stamp (size, mtime, inode) is unchanged:
    a model directory's weights (tens of GB) are hashed once, not by every command that names the model."""
    store = cache_dir() / "sha256.json"
    key = str(path.resolve())
    stamp = file_stamp(path)
    try:
        cached = json.loads(store.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        cached = None
    if isinstance(cached, list) and len(cached) == 2 and cached[0] == stamp:
        return str(cached[1])
    digest = sha256_file(path)
    remember_sha256({key: [stamp, digest]})
    return digest


def remember_sha256(entries: dict[str, Any]) -> None:
    """Add ``{resolved path: [stamp, sha256]}`` to the per-user cache (best effort: a read-only home only costs a
    re-hash next time)."""
    store = cache_dir() / "sha256.json"
    try:
        data = json.loads(store.read_text()) if store.is_file() else {}
        data = data if isinstance(data, dict) else {}
        data.update(entries)
        write_json_atomic(store, data)
    except (OSError, ValueError):
        pass


def hash_json(data: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys), used for 'inputs unchanged?' decisions."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a unique temp file beside ``path`` (fsync'd), then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts are shared like normal files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing/corrupt file into one clear line."""
    if not path.is_file():
        raise ArtifactError(f"{what} not found", path=path, hint="run the step that produces it first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{what} is not valid JSON ({exc.__class__.__name__})", path=path,
                            hint="delete it and re-run the step that produces it") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} is not a JSON object", path=path,
                            hint="delete it and re-run the step that produces it")
    return data


def ensure_writable_dir(path: Path, option: str = "--out") -> Path:
    """Fail with one line naming the option unless ``path`` is (or can become) a writable directory. Nothing is
    created here: a step creates its folder when it writes, so a command refused later leaves no empty folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "output path is not a directory" if probe == path else f"{probe} is a file, not a directory"
        raise InvalidInputError(what, path=path, hint=f"choose a directory for {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(f"output directory is not writable ({probe} does not allow writing)", path=path,
                                hint=f"choose a writable {option}")
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success swap it in, on any failure remove it.

    The swap is two renames (old → backup, new → final) on the same file system; a crash between them
    leaves the backup, which ``recover_interrupted`` puts back on the next run.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
    os.replace(tmp, final)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for one step: two commands on one work directory (``make -j``, two targets'
    ``make engines`` at once) take turns instead of removing each other's temp folders; the second then
    finds the first's result and skips. An advisory ``flock``: released by the kernel when a process dies."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            from sd35trt.core import log

            log.info(f"{what}: waiting for {holder}, which is writing {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"sd35trt pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover_interrupted(final: Path) -> None:
    """Undo what an interrupted ``atomic_dir`` left: stale temp folders, or a backup with no final."""
    backup = final.parent / f".{final.name}.old"
    if backup.exists() and not final.exists():
        os.replace(backup, final)
    # Writers of one folder hold its ``exclusive`` lock, so a temp folder found here is an interrupted run's.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except manifests themselves."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.endswith("manifest.json") or rel.endswith("export.json") or rel.startswith("."):
            continue
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def verify_files(folder: Path, entries: dict[str, dict[str, Any]], manifest: Path) -> None:
    """Raise naming the first file whose size or sha256 differs from ``entries``."""
    for rel, entry in entries.items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"file listed in {manifest.name} is missing", path=path,
                                hint="rebuild this artifact; the folder is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"size {size} differs from manifest ({entry['bytes']} bytes): truncated or replaced",
                                path=path, hint="rebuild this artifact")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"sha256 differs from {manifest.name}: the file was modified or corrupted",
                                path=path, hint="rebuild this artifact")


def package_versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_disk(folder: Path, needed: int, what: str) -> None:
    """One line before a big write that cannot fit (the previous artifact is untouched)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise InvalidInputError(f"not enough disk for {what}: about {needed / 1e9:.1f} GB needed, "
                                f"{free / 1e9:.1f} GB free", path=probe,
                                hint="free disk space or choose another --out")
