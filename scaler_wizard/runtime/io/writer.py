"""Atomic sharded safetensors writing (see :mod:`scaler_wizard.runtime.io`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from scaler_wizard.runtime.io.errors import (
    CheckpointError, MissingShardError, OutputExistsError, OutputWriteError, UnsafeOutputError,
)

DEFAULT_SHARD_SIZE = 5 * 10**9


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, nb in sizes:
        if cur and cur_bytes + nb > max_shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


def parse_size(s: int | str) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', 1234 (bytes). Raises CheckpointError for anything else or a
    size that is not positive."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        t = str(s).strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                 "TB": 10**12, "B": 1}
        mult = 1
        for u, m in units.items():
            if t.endswith(u):
                t, mult = t[: -len(u)].strip(), m
                break
        try:
            v = float(t)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise CheckpointError(f"shard size {s!r}: expected a size such as 500MB, 2GB, 2GiB or a number of bytes")
        n = int(v * mult)
    if n <= 0:
        raise CheckpointError(f"shard size {s!r}: must be positive")
    return n


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(out_dir: str | os.PathLike, input_path: str | os.PathLike | None, force: bool) -> Path:
    out = Path(out_dir).expanduser().resolve()
    if input_path is not None:
        inp = Path(input_path).expanduser().resolve()
        inp_dir = inp if inp.is_dir() else inp.parent
        if _is_within(out, inp_dir):
            raise UnsafeOutputError(f"refusing to write the output {out} into the input directory {inp_dir}")
        if _is_within(inp_dir, out):
            raise UnsafeOutputError(f"refusing to write the output {out}: it contains the input {inp_dir}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.exists() and force and any(out.iterdir()) and not (out / "config.json").is_file():
        # --force replaces a model directory; it never deletes a directory of something else (`-o ~`)
        raise OutputExistsError(f"refusing to replace {out}: it is not empty and not a model directory (no "
                                "config.json); --force only replaces a model directory")
    if out.exists() and force and (out == Path(out.anchor) or out == Path.home().resolve()):
        raise OutputExistsError(f"refusing to replace {out}")
    return out


_ST_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_COPY_FILE_RANGE = [hasattr(os, "copy_file_range")]  # cleared after the first file system refusing it
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardStream:
    """One safetensors file written header-first, then tensor by tensor (see CheckpointWriter.shard)."""

    def __init__(self, path: Path, entries, metadata: dict[str, str]):
        self.path = path
        self.entries = [(n, tuple(int(d) for d in shape), _ST_DTYPES[str(dt).replace("torch.", "")]) for n, shape, dt in entries]
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        for n, shape, st in self.entries:
            nb = _ST_ITEMSIZE[st]
            for d in shape:
                nb *= d
            header[n] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        self.data_bytes = off
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._f.write(len(blob).to_bytes(8, "little"))
        self._f.write(blob)
        self._next = 0
        self._part_left = 0  # bytes still to come of the tensor being written in parts (write_part)

    def write_part(self, name: str, part) -> None:
        """Write the next values, in row-major order, of tensor ``name`` (the next declared one):
        ``part`` is a contiguous tensor of the declared dtype, any shape. The tensor is complete once
        parts with all its declared bytes were written; a part past its end raises CheckpointError."""
        import torch

        if self._part_left == 0:
            if self._next >= len(self.entries):
                raise CheckpointError(f"{self.path.name}: more tensors than declared ({name})")
            want, shape, st = self.entries[self._next]
            if name != want:
                raise CheckpointError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
            self._part_left = self._nbytes(shape, st)
        want, shape, st = self.entries[self._next]
        target = next(getattr(torch, k) for k, v in _ST_DTYPES.items() if v == st)
        if name != want or part.dtype != target or not part.is_contiguous():
            raise CheckpointError(f"{name}: a part of {part.dtype} (contiguous: {part.is_contiguous()}) while "
                                  f"{want!r} ({st}) is being written")
        data = part.reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._part_left:
            raise CheckpointError(f"{name}: parts of more than the declared {st}{list(shape)}")
        self._f.write(data.data)
        self._part_left -= data.nbytes
        if self._part_left == 0:
            self._next += 1

    def write(self, name: str, tensor) -> None:
        import torch

        if self._part_left:
            raise CheckpointError(f"{self.path.name}: {name!r} written while {self.entries[self._next][0]!r} "
                                  "is incomplete")
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path.name}: more tensors than declared ({name})")
        want, shape, st = self.entries[self._next]
        if name != want:
            raise CheckpointError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{name}: declared {st}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        target = next(getattr(torch, k) for k, v in _ST_DTYPES.items() if v == st)
        if tensor.dtype != target and not (tensor.is_floating_point() and target.is_floating_point):
            raise CheckpointError(f"{name}: declared {st}, got {tensor.dtype} (only float casts are done here)")
        t = tensor.detach().contiguous().reshape(-1)
        # Cast while writing, in blocks, so a float32 value never needs a whole second copy.
        step = max(1, (64 << 20) // max(t.element_size(), 1))
        for a in range(0, t.numel(), step):
            block = t[a:a + step]
            if block.dtype != target:
                block = block.to(target)
            self._f.write(block.view(torch.uint8).numpy().data)
        self._next += 1

    def copy_range(self, name: str, src: str, start: int, stop: int, dtype: str,
                   shape: tuple[int, ...]) -> None:
        """Write the next tensor as a byte copy of ``src[start:stop]`` (a stored tensor of ``dtype``
        (torch name) and ``shape``): in the kernel with ``os.copy_file_range`` where the file
        systems allow it, else through a 16 MiB buffer. The dtype and shape must be the declared ones."""
        if self._part_left:
            raise CheckpointError(f"{self.path.name}: {name!r} copied while {self.entries[self._next][0]!r} "
                                  "is incomplete")
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path.name}: more tensors than declared ({name})")
        want, shp, st = self.entries[self._next]
        if name != want:
            raise CheckpointError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
        if tuple(shape) != shp or _ST_DTYPES.get(dtype) != st or stop - start != self._nbytes(shp, st):
            raise CheckpointError(f"{name}: declared {st}{list(shp)}, byte copy of {dtype}{list(shape)}")
        self._f.flush()
        dst = self._f.fileno()
        pos = self._f.tell()
        n = stop - start
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise MissingShardError(f"{src}: file not found (while copying {name!r})") from None
        except OSError as e:
            raise CheckpointError(f"{src}: cannot read: {e}") from None
        with f:
            fd = f.fileno()
            done = 0
            if _COPY_FILE_RANGE[0]:
                try:
                    while done < n:
                        k = os.copy_file_range(fd, dst, n - done, start + done, pos + done)
                        if k == 0:
                            raise CheckpointError(f"{src}: ends inside tensor {name!r}")
                        done += k
                except OSError:  # EXDEV, ENOSYS, EINVAL: a file system without it; copy through userspace
                    _COPY_FILE_RANGE[0] = False
            try:
                while done < n:
                    buf = os.pread(fd, min(16 << 20, n - done), start + done)
                    if not buf:
                        raise CheckpointError(f"{src}: ends inside tensor {name!r}")
                    os.pwrite(dst, buf, pos + done)
                    done += len(buf)
            except OSError as e:
                raise CheckpointError(f"copying {name!r} from {src} to {self.path}: {e}") from None
        self._f.seek(pos + n)
        self._next += 1

    @staticmethod
    def _nbytes(shape, st) -> int:
        nb = _ST_ITEMSIZE[st]
        for d in shape:
            nb *= d
        return nb

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self.entries):
            raise CheckpointError(f"{self.path.name}: {len(self.entries) - self._next} declared tensor(s) never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
        return False


# Set by `scaler-wizard apply`'s SIGINT handler (scaler_wizard.cli) when Ctrl-C arrives. Python drops a
# KeyboardInterrupt raised inside some callbacks (a weakref callback during an import, measured: about
# one Ctrl-C in four during apply's imports went unseen and the output landed); the commit points
# (CheckpointWriter.commit, apply's final rename) check this flag, so a seen-and-lost interrupt still
# stops the output from landing.
_INTERRUPTED = [False]


def note_interrupt(value: bool = True) -> None:
    """Record (or, with False, clear) that the user interrupted the command."""
    _INTERRUPTED[0] = value


def refuse_if_interrupted() -> None:
    """Raise KeyboardInterrupt where an interrupt was recorded (see :func:`note_interrupt`)."""
    if _INTERRUPTED[0]:
        raise KeyboardInterrupt


class WriteBehind:
    """Runs the writes of shard files (``ShardStream.write`` / ``write_part`` / ``copy_range`` calls) in
    one background thread, in the order they are submitted, one at a time: the caller computes the
    next tensor while earlier ones are cast and written (file writes, ``copy_file_range`` and torch's
    casts release the GIL).

    How far the caller may run ahead: a call submitted without ``nbytes`` waits until the calls
    before it have finished (one in flight: at most one output tensor is held beyond what the caller
    holds). A call submitted with ``nbytes`` (the bytes of memory it holds) may queue behind others
    as long as the bytes of the calls queued or running, its own included, stay within
    ``max_bytes``: the executor's tiled outputs queue slabs of a ring of buffers this way (see
    ``execute._write_tiled``), which smooths the bursts of its computation and of the disk.

    An exception raised by a call is re-raised in the caller's thread by the next :meth:`submit` or
    by :meth:`drain`; the calls after it are skipped. :meth:`close` stops the thread (after the
    calls in flight) and must be called before the files are removed or renamed."""

    def __init__(self, max_bytes: int = 0):
        import queue
        import threading

        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._count = 0  # calls queued or running
        self._bytes = 0  # their nbytes
        self._own = 0  # of which not reused buffers (held_bytes)
        self._todo: "queue.SimpleQueue" = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scaler-wizard-write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            nbytes, own = item[2], item[3]
            try:
                if self._error is None:
                    item[0](*item[1])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                item = None  # the tensor is not held while waiting for the next call
                with self._cond:
                    self._count -= 1
                    self._bytes -= nbytes
                    self._own -= own
                    self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn, *args, nbytes: int | None = None, reused: bool = False) -> None:
        """Run ``fn(*args)`` in the thread after the calls before it. Waits until nothing is in flight,
        or, with ``nbytes``, until the bytes in flight plus ``nbytes`` are within ``max_bytes``.
        ``reused``: the bytes are a buffer the caller keeps and counts itself (a slab of a ring), not
        counted by :meth:`held_bytes`."""
        self._raise()
        own = 0 if reused else (nbytes or 0)
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0 or (
                nbytes is not None and self._bytes + nbytes <= self.max_bytes))
            self._count += 1
            self._bytes += nbytes or 0
            self._own += own
        self._todo.put((fn, args, nbytes or 0, own))

    def held_bytes(self) -> int:
        """Bytes held only by the calls queued or running (the tensors handed over with ``nbytes``)."""
        return self._own

    def drain(self) -> None:
        """Wait until every submitted call has run; raise what one of them raised."""
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0)
        self._raise()

    def close(self) -> None:
        """Stop the thread after the calls in flight (if any); raises nothing."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary directories ``.OUT.tmp-<pid>-*`` (and ``.OUT.old-*`` trash, and apply's
    verification staging ``.OUT.unverified-<pid>`` with its ``..OUT.unverified-<pid>.tmp-<pid>-*``) that a killed
    writer of the same OUT left behind: those whose process is gone. Each removal is said on stderr;
    temporaries without a pid (older versions) are only named. Returns what was removed."""
    import re
    import sys

    removed = []
    # .OUT.tmp-<pid>-*, .OUT.old-* and apply's staging .OUT.unverified-<pid> with its own writer's
    # temporary ..OUT.unverified-<pid>.tmp-<pid>-* (the pid in the name is the writer's)
    pat = re.compile(rf"^\.(\.)?{re.escape(out.name)}\.(tmp|old|unverified)-(\d+)?")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if not m or not e.is_dir() or (m.group(1) and m.group(2) != "unverified"):
            continue
        rest = e.name[m.end():]
        ok = rest == "" or rest.startswith(".tmp-") if m.group(2) == "unverified" else rest.startswith("-")
        pid = int(m.group(3)) if m.group(3) and ok else None
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
            sys.stderr.write(f"removed {e}: the temporary output of an interrupted run (process {pid} is gone)\n")
        elif pid is None:
            sys.stderr.write(f"note: {e} looks like the temporary output of an interrupted run; remove it if no "
                             "other run is writing there\n")
    return removed


class CheckpointWriter:
    """Atomic sharded safetensors writer.

    >>> with CheckpointWriter(out, input_path=src, max_shard_size="2GB") as w:
    ...     w.add("a", t)           # buffered; a shard is flushed when the next tensor would overflow it
    ...     w.write_shard({...})    # or write explicit shards (the executor does)
    ...     w.write_config(cfg); w.commit()

    Shards are written as ``model-XXXXX-of-YYYYY.safetensors`` (or ``model.safetensors`` for one) in
    the order they are produced. Leaving the ``with`` block without :meth:`commit` (an exception)
    removes the temporary directory; the output path is untouched until commit.
    """

    def __init__(self, out_dir: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False,
                 metadata: dict[str, str] | None = None):
        self.out = check_output_path(out_dir, input_path, force)
        self.input_path = input_path
        self.force = force
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            from scaler_wizard.runtime.preflight import os_error_reason

            raise OutputWriteError(f"cannot create the output {self.out}: {os_error_reason(e)}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
        self._shard_files: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self._buf: dict[str, Any] = {}
        self._buf_bytes = 0
        self.total_size = 0
        self.bytes_written = 0
        self._names: set[str] = set()
        self.committed = False

    # -- tensors
    def add(self, name: str, tensor) -> None:
        nb = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nb > self.max_shard_size:
            self.flush()
        self._buf[name] = tensor
        self._buf_bytes += nb

    def flush(self) -> None:
        if self._buf:
            buf, self._buf, self._buf_bytes = self._buf, {}, 0
            self.write_shard(buf)

    def write_shard(self, tensors: dict[str, Any]) -> int:
        """Write one shard now; returns its byte size."""
        from safetensors.torch import save_file

        dup = self._names.intersection(tensors)
        if dup:
            raise CheckpointError(f"tensor(s) written twice: {sorted(dup)[:5]}")
        seen_ptrs: set[int] = set()
        clean = {}
        for n, t in tensors.items():
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            if t.numel() and t.data_ptr() in seen_ptrs:  # save_file refuses shared storage
                t = t.clone()
            if t.numel():
                seen_ptrs.add(t.data_ptr())
            clean[n] = t
        fname = f"shard-{len(self._shard_files):05d}.tmp"
        save_file(clean, str(self.tmp / fname), metadata=self.metadata)
        nb = sum(t.numel() * t.element_size() for t in clean.values())
        self._shard_files.append((fname, list(clean)))
        self._names.update(clean)
        self.total_size += nb
        self.bytes_written += (self.tmp / fname).stat().st_size
        return nb

    def shard(self, entries: list[tuple[str, tuple[int, ...], str]]) -> "ShardStream":
        """Open a shard whose tensors (name, shape, dtype name) are known before any is computed.

        The safetensors header is written first; each tensor's bytes then go straight to the file as
        it is produced (``stream.write(name, tensor)``, in ``entries`` order), so the writer holds at
        most one tensor, whatever the shard size."""
        dup = self._names.intersection(n for n, _, _ in entries)
        if dup:
            raise CheckpointError(f"tensor(s) written twice: {sorted(dup)[:5]}")
        fname = f"shard-{len(self._shard_files):05d}.tmp"
        stream = ShardStream(self.tmp / fname, entries, self.metadata)
        self._shard_files.append((fname, [n for n, _, _ in entries]))
        self._names.update(n for n, _, _ in entries)
        self.total_size += stream.data_bytes
        return stream

    def _shard_done(self, stream: "ShardStream") -> None:
        self.bytes_written += stream.path.stat().st_size

    # -- side files
    def write_config(self, config: dict) -> None:
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        shutil.copy2(src, self.tmp / (name or Path(src).name))

    @property
    def dir(self) -> Path:
        """The temporary directory (put extra files here before commit)."""
        return self.tmp

    # -- finish
    def commit(self) -> Path:
        refuse_if_interrupted()
        self.flush()
        n = len(self._shard_files)
        if n == 0:
            raise CheckpointError("no tensors were written")
        weight_map: dict[str, str] = {}
        for i, (tmpname, names) in enumerate(self._shard_files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / tmpname, self.tmp / final)
            for nm in names:
                weight_map[nm] = final
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        # mkdtemp/mkstemp create private (0700/0600) entries; give the output the modes a plain
        # mkdir/open would have (the umask applies), so the model can be shared like any other.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        for f in self.tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        # re-check right before the swap (another process may have created it meanwhile)
        check_output_path(self.out, self.input_path, self.force)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
            os.replace(self.out, trash / "old")
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.committed = True
        return self.out

    def abort(self) -> None:
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        if isinstance(exc, OSError):  # disk full, read-only, permissions: one message, no partial output
            from scaler_wizard.runtime.preflight import os_error_reason

            raise OutputWriteError(f"writing {self.out} failed: {os_error_reason(exc)}; the partial output was "
                                   f"removed and nothing was written at {self.out}") from None
        return False
