"""Crash-safe file writing: every file goes through a temporary file in the same folder and a rename, so a
crash or a full disk never leaves a half-written file that a later run reads as valid."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from promptclip.faults import fault_point

TEMPORARY_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; the file being replaced is unchanged."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, str(cause), str(path))
        what = "the disk quota is used up" if cause.errno == errno.EDQUOT else "the disk is full"
        self.message = (
            f"{what}: writing {path} failed{_free_space(path.parent)}; the previous {path.name} (if any) is "
            "unchanged. Free some space (or write to another disk, e.g. with --runs-dir), then run the command "
            "again; with --resume a training run continues from its last checkpoint."
        )

    def __str__(self) -> str:
        return self.message


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free on the file system of {folder})"


@contextlib.contextmanager
def atomic_path(path: str | Path, fault: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    A full disk raises `DiskFullError` naming the file, and leaves `path` as it was. `fault` names the
    test hook point (see `promptclip.faults`) reached once the temporary file is filled.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as err:
        raise _disk_full_or(err, path) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if fault is not None:
            fault_point(fault, partial=tmp)
        # mkstemp makes 0600, and a writer may have recreated the file (safetensors does): set the mode a
        # new file gets under the umask only now, just before the rename.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # make the rename itself survive a power cut
    except OSError as err:
        raise _disk_full_or(err, path) from err
    except Exception as err:  # a writer's own error type for a failed system call (safetensors raises one)
        code = os_error_code(err)
        if code is None:
            raise
        raise _disk_full_or(OSError(code, os.strerror(code), str(path)), path) from err
    finally:
        tmp.unlink(missing_ok=True)


_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def os_error_code(err: BaseException) -> int | None:
    """The errno behind an error that is not an OSError: Rust's I/O errors, which safetensors passes on as its
    own `SafetensorError`, keep it only in their text ("... No space left on device (os error 28)")."""
    found = _OS_ERROR_TEXT.search(str(err))
    return int(found.group(1)) if found else None


def _disk_full_or(err: OSError, path: Path) -> OSError:
    if isinstance(err, DiskFullError) or err.errno not in DISK_FULL_ERRNOS:
        return err
    return DiskFullError(path, err)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves behind when a process is killed mid-write. Only call
    it on a folder this process owns (a run folder whose lock it holds)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMPORARY_SUFFIX)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _current_umask() -> int:
    # Linux reports the umask in /proc; setting and restoring it instead briefly changes it for every thread.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, fault: str | None = None) -> None:
    with atomic_path(path, fault) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, fault: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault)


def atomic_write_json(path: str | Path, data: Any, fault: str | None = None) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", fault)


def atomic_write_with(path: str | Path, writer: Callable[[Path], None], fault: str | None = None) -> None:
    """Let `writer` fill a temporary file (e.g. `safetensors.torch.save_file`), then rename it into place."""
    with atomic_path(path, fault) as tmp:
        writer(tmp)


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so a multi-GB checkpoint is never held in memory."""
    return sha256_files([path], chunk_size)


def sha256_files(paths: Iterable[str | Path], chunk_size: int = 1 << 22) -> str:
    """One sha256 over several files read in order (a sharded checkpoint)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()
