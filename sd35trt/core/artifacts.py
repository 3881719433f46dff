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
    key = str(path.resolve())
    stamp = file_stamp(path)
    cached = _sha256_store().get(key)
    if isinstance(cached, list) and len(cached) == 2 and cached[0] == stamp:
        return str(cached[1])
    digest = sha256_file(path)
    remember_sha256({key: [stamp, digest]})
    return digest


SHA256_CACHE_ENTRIES = 4096  # the most files the cache remembers (the oldest go first)
_store_read: dict[str, Any] = {}  # the cache as this process last read it, by the file's stamp


def _sha256_store() -> dict[str, Any]:
    """The per-user sha256 cache, parsed once per version of its file (a command asks for every file it names)."""
    store = cache_dir() / "sha256.json"
    try:
        stamp = file_stamp(store)
    except OSError:
        return {}
    if _store_read.get("stamp") != (str(store), stamp):
        try:
            data = json.loads(store.read_text())
        except (OSError, ValueError):
            data = {}
        _store_read.update(stamp=(str(store), stamp), data=data if isinstance(data, dict) else {})
    return _store_read["data"]


def remember_sha256(entries: dict[str, Any]) -> None:
    """Add ``{resolved path: [stamp, sha256]}`` to the per-user cache (best effort: a read-only home only costs a
    re-hash next time). Entries of files that are gone are dropped, and the oldest past SHA256_CACHE_ENTRIES, so
    the file stays small however many work dirs come and go."""
    store = cache_dir() / "sha256.json"
    try:
        data = {k: v for k, v in _sha256_store().items() if k not in entries and os.path.exists(k)}
        data.update(entries)
        write_json_atomic(store, dict(list(data.items())[-SHA256_CACHE_ENTRIES:]))
    except (OSError, ValueError):
        pass


def check_mapped(path: Path, mapped: Any, sha256: str, size: int) -> str:
    """Check the bytes about to be used (a memory map of ``path``: what TensorRT deserializes) against the manifest's
    ``sha256`` and ``size``; one line naming the file when they differ. The digest of these very bytes is kept in
    the per-user cache by the file's stamp, so a later load of the unchanged file skips the hashing (about 10 s per
    16 GB); a file edited or replaced has another stamp and is hashed again. Returns how it was checked."""
    if len(mapped) != size:
        raise ArtifactError(f"size {len(mapped)} differs from the manifest ({size} bytes): truncated or replaced",
                            path=path, hint="rebuild this artifact, or copy the bundle again")
    key, stamp = str(path.resolve()), file_stamp(path)
    cached = _sha256_store().get(key)
    if isinstance(cached, list) and len(cached) == 2 and cached[0] == stamp and cached[1] == sha256:
        return "sha256 checked before (file unchanged since)"
    digest = hashlib.sha256(mapped).hexdigest()
    if digest != sha256:
        raise ArtifactError("sha256 differs from the bundle manifest: the file was modified or corrupted", path=path,
                            hint="rebuild this artifact, or copy the bundle again")
    remember_sha256({key: [stamp, digest]})
    return "sha256 checked now"


def hash_json(data: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys), used for 'inputs unchanged?' decisions."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a unique temp file beside ``path`` (fsync'd), then rename it over ``path``. On any failure
    the temp file is removed and ``path`` is as it was; a write error names ``path`` (a full disk, a file-size
    limit), so the one line the user sees says which file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts are shared like normal files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, its write failures as an ``OSError`` naming the file (torch reports a full disk as
    a RuntimeError from its stream writer, which is not the user's one line)."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "write" not in str(exc).lower():
            raise
        path.unlink(missing_ok=True)
        full = shutil.disk_usage(path.parent).free < (64 << 20)
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      "torch could not write the file", str(path)) from exc


NAME_MAX = 255  # bytes in one file name on Linux file systems


def check_output_file(path: Path, option: str) -> Path:
    """Before any work: ``path`` can become a file (not a folder, a name the file system takes, in a writable
    folder reached without a link loop); one line naming ``option`` otherwise."""
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise InvalidInputError(f"{option} file name is too long ({len(os.fsencode(path.name))} bytes; the file "
                                f"system takes {NAME_MAX})", path=path, hint=f"choose a shorter {option}")
    if path.is_dir():
        raise InvalidInputError(f"{option} is a folder, not a file", path=path, hint=f"give a file path for {option}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), option)
    return path


def write_buffer_atomic(path: Path, data: Any) -> None:
    """``write_bytes_atomic`` for any buffer (a memoryview of TensorRT's ``IHostMemory``): written as it is, never
    copied into a Python ``bytes`` first (a Large FP16 engine is 15 GB)."""
    write_bytes_atomic(path, data)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


MAX_JSON_BYTES = 64 << 20  # a manifest is kilobytes; anything this large is not one


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing/corrupt/absurd file into one clear line."""
    if not path.is_file():
        raise ArtifactError(f"{what} not found", path=path, hint="run the step that produces it first")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{what} is {path.stat().st_size / 2**20:.0f} MiB, not a manifest", path=path,
                            hint="delete it and re-run the step that produces it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc.__class__.__name__
        raise ArtifactError(f"{what} is not valid JSON ({why})", path=path,
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
        if os.path.lexists(probe):  # a link to nothing or a loop of links: exists() says no, writing would fail
            raise InvalidInputError(f"{probe} is a broken symbolic link or a loop of links", path=path,
                                    hint=f"fix the link, or choose another {option}")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "output path is not a directory" if probe == path else f"{probe} is a file, not a directory"
        raise InvalidInputError(what, path=path, hint=f"choose a directory for {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(f"output directory is not writable ({probe} does not allow writing)", path=path,
                                hint=f"choose a writable {option}")
    try:  # os.access answers yes to root everywhere, and /proc, /sys or a read-only mount still refuse: try it
        fd, scratch = tempfile.mkstemp(prefix=".sd35trt-write-test-", dir=probe)
        os.close(fd)
        os.unlink(scratch)
    except OSError as exc:
        raise InvalidInputError(f"output directory is not writable ({probe}: {exc.strerror})", path=path,
                                hint=f"choose a writable {option}") from None
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


def inside(folder: Path, rel: Any, manifest: Path) -> Path:
    """``folder / rel`` for a path a manifest names, refused in one line unless it stays inside ``folder``: relative,
    no ``..``, and not through a symbolic link that leads out (a bundle is shipped to deploy hosts and its plans are
    deserialized: a manifest must not point at /etc/passwd or another folder's files)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise ArtifactError(f"{manifest.name} names a file that is not a path ({str(rel)[:60]!r})", path=manifest,
                            hint="the manifest was edited or damaged: rebuild the artifact")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or rel.startswith("~"):
        raise ArtifactError(f"{manifest.name} names {rel!r}, outside its folder", path=manifest,
                            hint="a manifest may only name files inside its own folder: rebuild the artifact")
    path = folder / rel
    try:
        resolved, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):
        raise ArtifactError(f"{manifest.name} names {rel!r}, which cannot be resolved (a symbolic link loop?)",
                            path=manifest, hint="fix or remove the link, or rebuild the artifact") from None
    if resolved != root and root not in resolved.parents:
        raise ArtifactError(f"{manifest.name} names {rel!r}, which leads outside its folder (to {resolved})",
                            path=manifest, hint="a symbolic link points out of the folder: replace it with the file")
    return path


def verify_files(folder: Path, entries: dict[str, dict[str, Any]], manifest: Path) -> None:
    """Raise naming the first file whose size or sha256 differs from ``entries`` (or that lies outside ``folder``);
    every digest computed is kept in the per-user cache (``check_mapped`` then skips re-hashing the file)."""
    if not isinstance(entries, dict):
        raise ArtifactError(f"{manifest.name} lists its files wrongly (not an object)", path=manifest,
                            hint="the manifest was edited or damaged: rebuild the artifact")
    for rel, entry in entries.items():
        path = inside(folder, rel, manifest)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise ArtifactError(f"{manifest.name} entry for {rel} lacks an integer 'bytes' or a 'sha256'",
                                path=manifest, hint="the manifest was edited or damaged: rebuild the artifact")
        if not path.is_file():
            raise ArtifactError(f"file listed in {manifest.name} is missing", path=path,
                                hint="rebuild this artifact; the folder is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"size {size} differs from manifest ({entry['bytes']} bytes): truncated or replaced",
                                path=path, hint="rebuild this artifact")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(f"sha256 differs from {manifest.name}: the file was modified or corrupted",
                                path=path, hint="rebuild this artifact")
        remember_sha256({str(path.resolve()): [file_stamp(path), digest]})


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
