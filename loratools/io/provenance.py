"""Provenance: what loratools did, recorded in the safetensors metadata of everything it writes.

Record (JSON in the metadata key "loratools"):
    {"version", "command", "options": {...}, "inputs": {role: {"name": basename,
                                                              "files": {file: sha256, ...}}}}

Note: digests without a second pass on the critical path.
    Hashing a 15 GB base costs ~10 s at SHA-256 speed. The digests are computed in a background thread
    while the command streams its tensors (hashlib releases the GIL) and written at close: each
    placeholder digest has the final length (64 hex characters), so the header reserved at open time
    fits the final record exactly and no data offset moves.

Note: digests started before torch is imported.
    The command line calls `start_digests(inputs)` first thing, before it imports torch (~2 s of one
    core), so the other core hashes the inputs meanwhile (DigestCache). Nothing in this module imports
    torch, and neither may it.

Output paths are left out on purpose: the same inputs and flags give the same bytes wherever the
output goes.
"""
from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import Future
from pathlib import Path

from .. import __version__

PLACEHOLDER = "0" * 64
CHUNK = 8 * 2**20


def weight_files(path: str | Path) -> list[Path]:
    """The files whose digests identify an input: safetensors weights, shard index, adapter config."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    files = [f for f in sorted(p.iterdir()) if f.is_file() and
             (f.suffix in (".safetensors", ".gguf") or f.name.endswith(".index.json") or f.name == "adapter_config.json")]
    return files


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class DigestCache:
    """sha256 digests of input files, computed ahead on a background thread, each handed out once.

    A cache in the plain sense: a digest is used only while its file is unchanged (same device,
    inode, size and mtime), so whether an entry exists changes how soon a record is ready, never
    what it says. The command line fills the process's one cache (EARLY_DIGESTS) before it imports
    torch; a Provenance takes its digests from the cache it is given.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Future]] = {}  # resolved path -> (stat stamp, digest)
        self._lock = threading.Lock()

    def start(self, *paths: str | Path) -> None:
        """Start hashing the weight files of these inputs on a background thread.

        Only a head start: missing or unreadable inputs are skipped here and reported by the command."""
        jobs = []
        for f in (f for p in paths for f in weight_files(p)):
            try:
                key, stamp = str(f.resolve()), _stamp(f)
            except OSError:
                continue
            future = Future()
            with self._lock:
                self._entries[key] = (stamp, future)
            jobs.append((f, future))

        def run():
            for f, future in jobs:
                try:
                    future.set_result(sha256_file(f))
                except BaseException as e:  # the consumer hashes again and reports the error itself
                    future.set_exception(e)

        if jobs:
            threading.Thread(target=run, name="loratools-early-digests", daemon=True).start()

    def holds(self, path: str | Path) -> bool:
        """True while a digest of this file is started and not yet handed out."""
        with self._lock:
            return str(Path(path).resolve()) in self._entries

    def wait(self) -> None:
        """Wait until every digest started so far is computed (or failed)."""
        with self._lock:
            futures = [future for _, future in self._entries.values()]
        for future in futures:
            future.exception()

    def digest(self, path: Path) -> str:
        """sha256 of a file: the digest started ahead when the file is unchanged since, else hashed now."""
        try:
            key = str(path.resolve())
        except OSError:
            key = None
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            stamp, future = entry
            if future.exception() is None and _stamp(path) == stamp:  # a failed early hash is simply redone
                return future.result()
        return sha256_file(path)


EARLY_DIGESTS = DigestCache()


def start_digests(*paths: str | Path) -> None:
    """Start hashing these inputs into EARLY_DIGESTS (what every command does before importing torch)."""
    EARLY_DIGESTS.start(*paths)


class Provenance:
    """The provenance record of one output: placeholders at open, input digests filled in at close.

    `start()` begins hashing the inputs on a background thread; a writer given this object
    (`write_checkpoint(..., provenance=p)`, `ShardWriter(..., provenance=p)`) reserves
    `placeholder_metadata()` in the header at open and writes `final_metadata()` at close, which
    waits for the digests.
    """

    def __init__(self, command: str, options: dict, inputs: dict[str, str | Path | list],
                 digests: DigestCache = EARLY_DIGESTS):
        self._record = {
            "version": __version__,
            "command": command,
            "options": {k: v for k, v in sorted(options.items()) if v is not None},
            "inputs": {},
        }
        self._files: list[tuple[str, Path]] = []
        for role, value in inputs.items():
            paths = value if isinstance(value, (list, tuple)) else [value]
            for i, path in enumerate(paths):
                key = f"{role}[{i}]" if isinstance(value, (list, tuple)) else role
                files = weight_files(path)
                self._record["inputs"][key] = {"name": Path(path).name, "files": {f.name: PLACEHOLDER for f in files}}
                self._files += [(key, f) for f in files]
        self._cache = digests
        self._placeholder = self._dump()
        self._digests: dict[tuple[str, str], str] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _dump(self) -> str:
        return json.dumps(self._record, sort_keys=True, default=str)

    def _hash_all(self) -> None:
        try:
            for key, f in self._files:
                self._digests[(key, f.name)] = self._cache.digest(f)
        except BaseException as e:  # surfaced in final_metadata()
            self._error = e

    def start(self) -> "Provenance":
        """Start hashing the inputs on a background thread (hashlib releases the GIL); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash_all, name="loratools-digests", daemon=True)
            self._thread.start()
        return self

    def placeholder_metadata(self) -> dict[str, str]:
        """The metadata to reserve at open: every digest a placeholder of its final length."""
        return {"loratools": self._placeholder}

    def final_metadata(self) -> dict[str, str]:
        """The metadata to write at close, with every input digest (waits for them)."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        for (key, name), digest in self._digests.items():
            self._record["inputs"][key]["files"][name] = digest
        return {"loratools": self._dump()}


def provenance(command: str, options: dict, inputs: dict) -> Provenance:
    """A started Provenance, to pass to a writer as `provenance=`.

    Args:
        command: the command name recorded ("merge", "extract", ...).
        options: the options that decide the output bytes (None values are left out).
        inputs: role -> path, or role -> list of paths (recorded as "role[i]").
    Example:
        >>> write_checkpoint(out, ..., provenance=provenance("convert", {"dtype": "auto"}, {"checkpoint": src}))
    """
    return Provenance(command, options, inputs).start()


def read_provenance(metadata: dict[str, str]) -> dict | None:
    """The provenance record in a safetensors metadata dict: None without one, {"raw": text} if not JSON."""
    raw = metadata.get("loratools")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"raw": raw}


def verify_inputs(record: dict, given: dict[str, str | Path]) -> list[dict]:
    """Compare a recorded provenance with files given now; one row per recorded file of a given role.

    Returns rows {"role", "file", "recorded", "actual", "ok"}.
    """
    rows = []
    for role, path in given.items():
        entry = (record or {}).get("inputs", {}).get(role)
        if entry is None:
            rows.append({"role": role, "file": None, "recorded": None, "actual": None, "ok": False})
            continue
        actual = {f.name: f for f in weight_files(path)}
        for name, digest in sorted(entry.get("files", {}).items()):
            got = sha256_file(actual[name]) if name in actual else None
            rows.append({"role": role, "file": name, "recorded": digest, "actual": got, "ok": got == digest})
    return rows
