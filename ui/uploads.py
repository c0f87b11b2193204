"""Files the page received, and whose they are.

In: the paths Gradio's upload route wrote for a login (recorded by `ui.auth.UiGuard`, which sees the
route's response). Out: `PageUploads.take(username, path)`, the bytes of a file that this login
uploaded, removed from disk as they are read; anything else is refused.

Why: a page event names its files by server path, and the client writes that path. Gradio checks it
against its upload folder only in a launched app, not in one mounted on FastAPI, so without this a
client could name any readable file on the server. Here a path is honoured only if this server's
upload route wrote it for the same login; the file lives under the home folder
(`<home>/uploads/page/`), and leaves it after ingestion or refusal, or after `max_age_s` if it is
never used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_AGE_S = 3600.0  # an upload nobody submitted within an hour is deleted
STRAY_AGE_S = 60.0  # Gradio's multipart temp files are renamed within one upload; older ones are litter


class UploadRefused(Exception):
    """The path was not uploaded by this login (or is gone). One message for every case: the refusal
    must not tell whether some other file exists."""

    def __init__(self) -> None:
        super().__init__("that file was not uploaded here in this session; upload it again")


@dataclass(frozen=True)
class Received:
    filename: str
    data: bytes


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def file_payloads(value: Any) -> Iterator[dict[str, Any]]:
    """Every Gradio file object (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`, or any dict
    with a `path`) inside an event's data, however deeply nested."""
    if isinstance(value, dict):
        if "path" in value and (isinstance(value.get("meta"), dict) or "orig_name" in value or "url" in value):
            yield value
        for v in value.values():
            yield from file_payloads(v)
    elif isinstance(value, list):
        for v in value:
            yield from file_payloads(v)


class PageUploads:
    """Which login uploaded which file in the page's upload folder."""

    def __init__(self, folder: Path, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.max_age_s = max_age_s
        self.clock = clock
        # Gradio names an upload by its content's hash, so two logins uploading the same bytes share a path.
        self._owners: dict[str, dict[str, float]] = {}  # real path -> {username: when uploaded}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Empty the folder: uploads of a previous run belong to logins that no longer exist."""
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)

    def inside(self, path: str) -> bool:
        root = _real(self.folder)
        return os.path.commonpath([_real(path), root]) == root

    def received(self, username: str, paths: list[str]) -> None:
        """Record what the upload route just wrote for `username` (paths outside the folder are ignored)."""
        now = self.clock()
        with self._lock:
            for p in paths:
                if isinstance(p, str) and self.inside(p):
                    self._owners.setdefault(_real(p), {})[username] = now
        self.sweep()

    def owners(self, path: str) -> set[str]:
        with self._lock:
            return set(self._owners.get(_real(path), {}))

    def owns(self, username: str, path: str) -> bool:
        return username in self.owners(path)

    def take(self, username: str, path: str | os.PathLike[str]) -> Received:
        """The file's name and bytes, if `username` uploaded it; the file is deleted either way it goes."""
        real = _real(path)
        with self._lock:
            owners = self._owners.get(real, {})
            if username not in owners:
                raise UploadRefused()
            del owners[username]
            last = not owners
            if last:
                del self._owners[real]
        try:
            data = Path(real).read_bytes()
        except OSError as e:
            raise UploadRefused() from e
        finally:
            if last:
                self._remove(real)
        return Received(Path(real).name, data)

    def discard(self, username: str, paths: list[str]) -> None:
        """Delete this login's uploads among `paths` (the page cleared its file list)."""
        for p in paths:
            real = _real(p)
            with self._lock:
                owners = self._owners.get(real, {})
                if owners.pop(username, None) is None or owners:
                    continue
                del self._owners[real]
            self._remove(real)

    def sweep(self, stray_age_s: float = STRAY_AGE_S) -> None:
        """Delete uploads older than `max_age_s` that were never submitted, and the empty temporary
        files Gradio's multipart parser leaves at the folder's top level once they are `stray_age_s` old
        (younger ones may belong to an upload still arriving)."""
        cutoff = self.clock() - self.max_age_s
        stale: list[str] = []
        with self._lock:
            for p, owners in list(self._owners.items()):
                for name in [n for n, t in owners.items() if t < cutoff]:
                    del owners[name]
                if not owners:
                    del self._owners[p]
                    stale.append(p)
        for p in stale:
            self._remove(p)
        wall_cutoff = time.time() - stray_age_s
        for f in self.folder.glob("tmp*"):
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_mtime <= wall_cutoff:
                    f.unlink()

    def pending(self) -> int:
        with self._lock:
            return len(self._owners)

    def _remove(self, real: str) -> None:
        """Remove the file and the per-upload folder Gradio made for it, if now empty."""
        path = Path(real)
        path.unlink(missing_ok=True)
        parent = path.parent
        if parent != self.folder and self.inside(str(parent)):
            with contextlib.suppress(OSError):  # another upload still in it
                parent.rmdir()

