"""The artifact store shared by runs: content-addressed objects, verified before use, claimed while
they are computed, and collected when no kept run references them.

Layout under the store's root (a local folder, or any fsspec URL):

    objects/<kind>/<key[:2]>/<key>.<ext>   the artifact (safetensors or PNG), named by its content key
    objects/<kind>/<key[:2]>/<key>.json    its record: sha256, size, time, metadata; written last (the commit)
    locks/<kind>/<key[:2]>/<key>.lock      claims (local stores): an flock held while one process computes it
    runs/<id>.json                         runs that use the store: the path of each run's manifest

An object counts only once its record exists and the object matches it (sha256, size, and the key in
its own metadata). A local store gets atomic renames, hard links into run folders and flock claims;
a URL store gets whole-object writes moved into place, copies, and no claims (see the README).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stagediff.artifacts.files import (
    ArtifactError,
    atomic_write_bytes,
    canonical_safetensors,
    png_metadata,
    safetensors_metadata,
    sha256_bytes,
)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

T = TypeVar("T")
# compiled: a denoiser's compiled code (--compile), inductor's cache folder as a tar in a safetensors byte tensor
KINDS = {"embeddings": "safetensors", "latents": "safetensors", "images": "png", "compiled": "safetensors"}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss", "r2"}  # fsspec protocols with atomic PUTs


@dataclass(frozen=True)
class Record:
    """What the store knows about one object; `metadata` is a copy of the object's own."""

    kind: str
    key: str
    sha256: str
    size: int
    created: float  # seconds since the epoch
    metadata: dict[str, str]


class Claim:
    """The right to compute one object: an exclusive flock, released on `release()` or when the process dies."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def is_url(location: str) -> bool:
    return "://" in location


class Store:
    """A store at a local folder (full guarantees) or an fsspec URL (see the module docstring)."""

    def __init__(self, location: str | Path, options: dict[str, Any] | None = None) -> None:
        """`options`: fsspec storage options of a URL store (e.g. {"endpoint_url": ...} for s3://); fsspec's
        `FSSPEC_<PROTOCOL>_<OPTION>` variables and the client's own (`AWS_ENDPOINT_URL`) apply too."""
        self.location = str(location)
        self.options = dict(options or {})
        self.local = not is_url(self.location)
        if self.local:
            self.root = str(Path(self.location).absolute())
        else:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.location, **self.options)
            protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
            self.object_store = bool(protocols & OBJECT_STORES)

    # 1. Files: the only place that knows local from fsspec

    def path(self, name: str) -> str:
        """The full path (local) or URL path (fsspec) of a store-relative name, for messages and links."""
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            if self.local:
                return Path(self.path(name)).read_bytes()
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write atomically: on disk a temporary sibling (fsynced), then a rename over `name`; on an object
        store one PUT of the final key (it appears whole or not at all; a "rename" there is a copy and a
        delete); elsewhere a temporary sibling moved over `name`."""
        if self.local:
            atomic_write_bytes(self.path(name), data)
            return
        if self.object_store:
            self.fs.pipe_file(self.path(name), data)
            return
        folder, _, base = self.path(name).rpartition("/")
        tmp = f"{folder}/.{base}.{secrets.token_hex(6)}.tmp"
        self.fs.makedirs(folder, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self.path(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(self.path(name))
            else:
                self.fs.rm_file(self.path(name))

    def list(self, folder: str) -> list[str]:
        """Store-relative names of every file under `folder`."""
        if self.local:
            base = Path(self.path(folder))
            files = base.rglob("*") if base.exists() else []
            return sorted(str(p.relative_to(self.root)) for p in files if p.is_file())
        if not self.fs.exists(self.path(folder)):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(prefix) for p in self.fs.find(self.path(folder)))

    def stat(self, name: str) -> tuple[int, float | None]:
        """(size, modification time or None where the filesystem does not tell)."""
        if self.local:
            st = os.stat(self.path(name))
            return st.st_size, st.st_mtime
        info = self.fs.info(self.path(name))
        try:
            mtime = self.fs.modified(self.path(name)).timestamp()
        except (NotImplementedError, AttributeError, ValueError):
            mtime = None
        return int(info.get("size") or 0), mtime

    # 2. Objects

    @staticmethod
    def object_name(kind: str, key: str) -> str:
        return f"objects/{kind}/{key[:2]}/{key}.{KINDS[kind]}"

    @staticmethod
    def record_name(kind: str, key: str) -> str:
        return f"objects/{kind}/{key[:2]}/{key}.json"

    def get(self, kind: str, key: str) -> tuple[Record, bytes] | None:
        """The verified object and its record; None if it was never committed; ArtifactError if damaged."""
        raw = self.read(self.record_name(kind, key))
        if raw is None:
            return None
        path = self.path(self.object_name(kind, key))
        try:
            record = Record(**json.loads(raw))
        except (ValueError, TypeError):
            raise ArtifactError(f"artifact record {self.path(self.record_name(kind, key))} is unreadable") from None
        if (record.kind, record.key) != (kind, key):
            raise ArtifactError(f"artifact record {self.path(self.record_name(kind, key))} is for another artifact")
        data = self.read(self.object_name(kind, key))
        if data is None:
            raise ArtifactError(f"artifact {path} is missing")
        if len(data) != record.size or sha256_bytes(data) != record.sha256:
            raise ArtifactError(
                f"artifact {path} is corrupted: {len(data)} bytes, sha256 {sha256_bytes(data)[:12]}… "
                f"!= recorded {record.size} bytes, {record.sha256[:12]}…"
            )
        try:
            made_for = (png_metadata(data) if KINDS[kind] == "png" else safetensors_metadata(data)).get("key")
        except ValueError:
            made_for = None
        if made_for != key:
            raise ArtifactError(f"artifact {path} was made for key {made_for!r}, not for its own key {key[:12]}…")
        return record, data

    def check(self, kind: str, key: str) -> Record | None:
        """The record of a verified object, None if it is not there; ArtifactError if it is damaged."""
        found = self.get(kind, key)
        return None if found is None else found[0]

    def usable(self, kind: str, key: str) -> bool:
        try:
            return self.check(kind, key) is not None
        except ArtifactError:
            return False

    def load(self, kind: str, key: str) -> bytes:
        found = self.get(kind, key)
        if found is None:
            raise ArtifactError(f"artifact {self.path(self.object_name(kind, key))} is missing")
        return found[1]

    def put(self, kind: str, key: str, data: bytes, metadata: dict[str, str]) -> Record:
        """Commit an object: drop its old record, write the object, then its record (readers see none or all)."""
        record = Record(kind, key, sha256_bytes(data), len(data), time.time(), dict(metadata))
        self.remove(self.record_name(kind, key))
        self.write(self.object_name(kind, key), data)
        self.write(self.record_name(kind, key), json.dumps(asdict(record), indent=1).encode())
        return record

    def save_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Record:
        from safetensors.torch import save

        metadata = {**metadata, "key": key}
        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
        return self.put(kind, key, canonical_safetensors(data), metadata)

    def load_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.load(kind, key))

    def save_png(self, kind: str, key: str, image: Image, metadata: dict[str, str]) -> Record:
        from PIL.PngImagePlugin import PngInfo

        metadata = {**metadata, "key": key}
        info = PngInfo()
        for name, value in metadata.items():
            info.add_text(name, value)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return self.put(kind, key, buffer.getvalue(), metadata)

    def materialize(self, kind: str, key: str, dest: str | Path) -> None:
        """Make `dest` (a file of a run) the object: a hard link where possible, else a verified copy."""
        dest = Path(dest)
        if self.local:
            source = self.path(self.object_name(kind, key))
            with contextlib.suppress(OSError):
                if os.path.samefile(source, dest):
                    return
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
            try:
                os.link(source, tmp)
                os.replace(tmp, dest)
                return
            except OSError:  # another filesystem, or links not allowed: copy instead
                tmp.unlink(missing_ok=True)
        atomic_write_bytes(dest, self.load(kind, key))

    # 3. Claims: at most one process computes an object at a time

    def lock_name(self, kind: str, key: str) -> str:
        return f"locks/{kind}/{key[:2]}/{key}.lock"

    def claim(self, kind: str, key: str, wait: bool) -> Claim | None:
        """Take the object's claim; without `wait`, None if another process holds it.

        URL stores have no claims (always granted): two runs may then compute the same object twice.
        """
        if not self.local:
            return Claim(None)
        path = self.path(self.lock_name(kind, key))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return Claim(fd)
            except FileNotFoundError:
                pass
            os.close(fd)  # gc removed this lock file while we waited for it: take the new one

    def claimed_batches(
        self,
        kind: str,
        items: list[T],
        key_of: Callable[[T], str],
        size: int,
        pause: float = 0.0,
        held: list[Claim] | None = None,
    ) -> Iterator[list[T]]:
        """Batches of the items this process has to compute, each claimed until the caller has written it.

        One item per key; items already in the store are dropped. First every free item is claimed
        without waiting; then the items other processes were computing are waited for in key order (so
        two processes never wait on each other) and handed out only if their process did not write them.
        `pause`: seconds to sleep after each batch (a test hook: crash tests land a kill between batches).
        `held`: keep each batch's claims there, for the caller to release, instead of releasing them when
        the next batch is asked for (a caller that computes several batches at once).
        """
        first: dict[str, T] = {}
        for item in items:
            first.setdefault(key_of(item), item)
        busy: list[T] = []
        for wait, queue in ((False, list(first.values())), (True, busy)):
            if wait:
                busy.sort(key=key_of)
            while queue:
                batch: list[tuple[T, Claim]] = []
                while queue and len(batch) < size:
                    item = queue.pop(0)
                    claim = self.claim(kind, key_of(item), wait=wait)
                    if claim is None:
                        busy.append(item)  # another process is computing it: come back later
                    elif self.usable(kind, key_of(item)):
                        claim.release()  # written by another process meanwhile
                    else:
                        batch.append((item, claim))
                if not batch:
                    continue
                try:
                    yield [item for item, _ in batch]
                finally:
                    for _, claim in batch:
                        if held is None:
                            claim.release()
                        else:
                            held.append(claim)
                if pause:
                    time.sleep(pause)

    # 4. Runs that use the store: each is a root of gc from before it reads or writes any artifact

    @contextlib.contextmanager
    def gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Held shared while a run registers, exclusive while gc runs (local stores): a run registered after gc
        read the roots waits for it, so gc never removes what a run it did not see is about to use."""
        if not self.local:
            yield
            return
        path = self.path("locks/gc.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def register_run(self, manifest_path: str | Path, root: dict[str, Any] | None = None) -> None:
        """Make a run a root: its summary's path, its record's, and `root`, what its items are made from (gc
        derives the keys of a run that has not completed from it)."""
        path, host = str(Path(manifest_path).absolute()), socket.gethostname()
        name = hashlib.sha256(f"{host}:{path}".encode()).hexdigest()[:32]  # the same path on two machines: two runs
        entry = {"manifest": path, "host": host, "registered": time.time(), **({"root": root} if root else {})}
        with self.gc_lock(exclusive=False):
            self.write(f"runs/{name}.json", json.dumps(entry).encode())

    def runs(self) -> dict[str, dict[str, Any]]:
        """Registered runs: store-relative name of the entry -> the entry ({"manifest": path, "root": ...})."""
        found = {}
        for name in self.list("runs"):
            try:
                entry = json.loads(self.read(name) or b"")
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("manifest"), str):
                found[name] = entry
        return found
