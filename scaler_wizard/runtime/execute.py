"""Out-of-core execution of a TensorProgram over a checkpoint, shard by shard.

Schedule
--------
1. Check the program against the checkpoint headers (every Load exists with the recorded shape) and
   pick each output's dtype: an explicit ``Cast`` at the root wins, then the ``dtype`` argument (for
   floating outputs), then the dtype of the first ``Load`` the output depends on, then the
   checkpoint's main floating dtype (outputs with no input at all).
2. Pack outputs, in program order, into shards of at most ``shard_size`` bytes.
3. For each shard: list the distinct nodes its outputs need (children first), count how many times
   each is consumed, evaluate them in order (float32 compute; Loads read lazily from the reader and
   kept in their stored dtype until consumed) and free every value at its last use. Outputs are
   cast to their dtype and the shard is written. Nothing is kept across shards, so peak memory is
   about one output shard plus the working set of its largest tensor, whatever the model size.
   An output that is a stored tensor unchanged (a Load, same dtype, needed by nothing else) is not
   read at all: its byte range is copied from the input shard into the output shard
   (``os.copy_file_range``, in the kernel; a buffered copy where the file system refuses it).
4. Config (input config + program.config_patch), tokenizer files and the optional model card are
   written, and the temporary directory is renamed into place (atomic; see CheckpointWriter).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from scaler_wizard.compiler.program import (
    FLOAT_DTYPES,
    Cast,
    EvalContext,
    Load,
    Node,
    ProgramError,
    TensorProgram,
    _postorder,
    dtype_name,
    release_last_uses,
    storage_dtypes,
    torch_dtype,
    use_counts,
)
from scaler_wizard.runtime.io.writer import WriteBehind
from scaler_wizard.runtime import tiles
from scaler_wizard.runtime.tiles import MOVES, TileEvaluator, cast_inputs, plan_region, tile_rows
from scaler_wizard.runtime.checkpoint import (
    DEFAULT_SHARD_SIZE,
    ITEMSIZE,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    TensorNotFoundError,
    parse_size,
    plan_shards,
)


class ShapeMismatchError(CheckpointError, ProgramError):
    """The checkpoint's tensors do not have the shapes the program (from the model's config) expects:
    bad input (exit 2 at the CLI), named tensor by tensor."""


class ExecutionError(CheckpointError):
    """A failure while computing an output tensor (names the tensor and the op)."""


@dataclass
class ExecutionReport:
    out_dir: str
    n_outputs: int
    n_shards: int
    tensor_bytes: int  # sum of output tensor sizes
    bytes_written: int  # shard file bytes (with headers)
    bytes_read: int
    input_reads: int
    nodes_computed: int
    wall_s: float
    peak_rss_bytes: int  # sampled during execution (_rss)
    max_rss_bytes: int  # process lifetime peak (getrusage), includes anything before execute()
    peak_held_bytes: int  # largest sum of live tensors held by the executor
    largest_shard_bytes: int
    byte_copies: int = 0  # outputs written as byte copies of a stored tensor (no torch)
    dtypes: dict[str, int] = field(default_factory=dict)  # output dtype -> count

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gb = 1e9
        return (
            f"wrote {self.n_outputs} tensors in {self.n_shards} shard(s), {self.bytes_written / gb:.3f} GB, "
            f"to {self.out_dir} in {self.wall_s:.2f} s; read {self.bytes_read / gb:.3f} GB "
            f"({self.input_reads} reads); peak RSS {self.peak_rss_bytes / gb:.3f} GB, "
            f"peak held {self.peak_held_bytes / gb:.3f} GB (largest shard {self.largest_shard_bytes / gb:.3f} GB)"
        )


def check_program(program: TensorProgram, reader: CheckpointReader) -> None:
    """Every Load names a tensor of the checkpoint with the recorded shape (all problems at once)."""
    missing, wrong = [], []
    for name, load in program.inputs().items():
        if name not in reader:
            missing.append(name)
        elif tuple(reader.shape(name)) != tuple(load.shape):
            wrong.append(f"{name}: program expects {tuple(load.shape)}, checkpoint has {tuple(reader.shape(name))}")
    for n in program.nodes():  # one tensor loaded under two shapes
        if isinstance(n, Load) and n.name in reader and tuple(reader.shape(n.name)) != n.shape:
            msg = f"{n.name}: program expects {n.shape}, checkpoint has {tuple(reader.shape(n.name))}"
            if msg not in wrong:
                wrong.append(msg)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise TensorNotFoundError(
            f"the program reads tensor(s) not in {reader.path}: {', '.join(missing[:5])}{more}"
        )
    if wrong:
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ShapeMismatchError(f"the weights in {reader.path} do not have the shapes its config.json gives (or "
                                 f"the program was compiled for another model): {'; '.join(wrong[:3])}{more}")


def output_dtypes(program: TensorProgram, reader: CheckpointReader, dtype: str | None) -> dict[str, str]:
    default = reader.main_dtype()
    memo: dict[str, str | None] = {}

    def natural(node: Node) -> str | None:
        # iterative: first Cast/Load found depth-first, left to right
        stack = [node]
        while stack:
            n = stack.pop()
            if n.digest in memo and memo[n.digest] is not None:
                return memo[n.digest]
            if isinstance(n, Cast):
                return n.dtype
            if isinstance(n, Load):
                return reader.dtype(n.name)
            stack.extend(reversed(n.children()))
        return None

    res = {}
    for name, out in program.outputs.items():
        node = out.node
        if isinstance(node, Cast):
            res[name] = node.dtype
            continue
        nat = natural(node)
        memo[node.digest] = nat
        if dtype is not None and (nat is None or nat in FLOAT_DTYPES):
            res[name] = dtype
        else:
            res[name] = nat or default
    return res


def merged_config(reader: CheckpointReader, program: TensorProgram, dtype: str | None) -> dict[str, Any]:
    cfg = dict(reader.config)
    cfg.update(program.config_patch)
    if dtype is not None:
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype
    return cfg


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                              transient=False)
            self.p.start()
            self.task = self.p.add_task(label, total=total)

    def advance(self, n: int, desc: str | None = None):
        if self.p is not None:
            self.p.update(self.task, advance=n, **({"description": desc} if desc else {}))

    def stop(self):
        if self.p is not None:
            self.p.stop()


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _release(used, uses: dict, cache: dict) -> int:
    """:func:`release_last_uses`, returning the bytes dropped."""
    return sum(_nbytes(v) for v in release_last_uses(used, uses, cache))


def _close_shard(w: CheckpointWriter, stream) -> None:
    stream.close()  # raises if a declared tensor was never written
    w._shard_done(stream)


def _write_tiled(reg, name: str, out_dtype, cache: dict, sdts: dict, ctx: EvalContext, stream, behind: WriteBehind,
                 slabs: dict, bar: "_Progress") -> int:
    """Compute output ``name`` (the root of region ``reg``) tile by tile into a ring of slabs of
    ``out_dtype`` and hand each full slab to ``behind`` (ShardStream.write_part). Returns the bytes of
    the ring. The boundary values of the region are in ``cache``."""
    import torch

    root = reg.root
    rn = reg.row_numel
    esize = torch.empty((), dtype=out_dtype).element_size()
    tr = tile_rows(reg)
    slab_rows = min(root.shape[0], max(tr, (tiles.SLAB_BYTES // (rn * esize)) // tr * tr))
    need = slab_rows * rn
    # a ring of SLABS buffers of SLAB_BYTES (module tiles) and the index of the one to fill next; the
    # writer queues at most SLABS - 1 of them (behind.max_bytes), so the one filled next is never in flight
    ring = slabs.get(out_dtype)
    if ring is None:
        ring = slabs[out_dtype] = [[torch.empty(tiles.SLAB_BYTES // esize, dtype=out_dtype)
                                    for _ in range(tiles.SLABS)], 0]
    assert need <= ring[0][0].numel()
    final = out_dtype if isinstance(root, MOVES) else None
    storage = {d: torch_dtype(sdts[d]) for d in reg.nodes if sdts.get(d)}
    ev = TileEvaluator(reg, {c.digest: cache[c.digest] for c in reg.boundary}, ctx, final, storage)
    bufs, k = ring
    pos = 0
    rows = root.shape[0]
    for r0 in range(0, rows, tr):
        r1 = min(rows, r0 + tr)
        buf = bufs[k]
        # the concatenations of a value-moving root write their inputs into the slab themselves
        ev.fill(root, r0, r1, buf[pos * rn:(pos + r1 - r0) * rn].view((r1 - r0,) + tuple(root.shape[1:])))
        ev.clear()
        pos += r1 - r0
        if pos == slab_rows or r1 == rows:
            behind.submit(stream.write_part, name, buf[:pos * rn], nbytes=tiles.SLAB_BYTES, reused=True)
            bar.advance(pos * rn * esize)
            k, pos = (k + 1) % tiles.SLABS, 0
    ring[1] = k
    return tiles.SLABS * tiles.SLAB_BYTES


def _rss() -> int:
    """This process's resident set size now, in bytes: ``/proc/self/statm`` where there is one (a
    read of a few bytes), else psutil (whose import costs about 20 ms of apply's start-up)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def execute(
    program: TensorProgram,
    reader: CheckpointReader,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    card: dict | None = None,
    copy_tokenizer: bool = True,
    bytes_through_torch: bool = False,
    extra_files: dict[str, str] | None = None,
    tile: bool = True,
) -> ExecutionReport:
    """Run ``program`` over ``reader`` and write a Hugging Face checkpoint to ``out_dir`` (atomically).

    ``dtype``: output dtype for floating tensors (default: each output keeps its input's dtype).
    ``card``: if given, a dict for :func:`scaler_wizard.runtime.card.render_card`, written as README.md.
    ``bytes_through_torch``: read and write outputs that are unchanged stored tensors through torch
    too (by default their bytes are copied file to file, see :meth:`ShardStream.copy_range`).
    ``extra_files``: file name -> text, written into the output before it is committed (so they land
    with it or not at all: apply's growth record).
    ``tile``: evaluate large computed outputs a block of rows at a time (see
    :mod:`scaler_wizard.runtime.tiles`; the same values, bitwise); False evaluates every node whole.
    """
    # torch is imported at the first output that is computed (byte copies need none)
    t0 = time.perf_counter()
    peak_rss = _rss()
    dtype = None if dtype is None else dtype_name(dtype)
    shard_size = parse_size(shard_size)
    if not program.outputs:
        raise ProgramError("the program has no outputs")

    check_program(program, reader)
    dts = output_dtypes(program, reader, dtype)
    sizes = [(n, o.node.numel * ITEMSIZE[dts[n]]) for n, o in program.outputs.items()]
    size_of = dict(sizes)
    shards = plan_shards(sizes, shard_size)
    total = sum(size_of.values())
    reads0, bytes0 = reader.reads, reader.bytes_read

    ctx = EvalContext(seed=program.seed)
    bar = _Progress(progress and sys.stderr.isatty(), total, "scaler-wizard apply")
    peak_held = 0
    threads = None  # torch's intra-op threads before execute (restored at the end)
    computed = 0
    copied = 0
    try:
        with CheckpointWriter(out_dir, input_path=reader.path, max_shard_size=shard_size, force=force) as w:
            # shard files are written by a thread while the next outputs are computed (up to
            # behind.max_bytes queued; see WriteBehind)
            behind = WriteBehind(max_bytes=(tiles.SLABS - 1) * tiles.SLAB_BYTES)
            slabs: dict[Any, list] = {}  # output dtype -> [ring of SLABS slab buffers, next index]
            ring_bytes = 0  # slab buffers of tiled outputs (allocated once, kept to the end)
            try:
                for si, shard in enumerate(shards):
                    roots: dict[str, list[str]] = {}  # node digest -> output names
                    order: list[Node] = []
                    seen: set[str] = set()
                    for name in shard:
                        node = program.outputs[name].node
                        roots.setdefault(node.digest, []).append(name)
                        _postorder(node, seen, order)
                    sdts = storage_dtypes((program.outputs[name].node, dts[name]) for name in shard)
                    uses = use_counts(order)
                    cache: dict[str, Any] = {}
                    held = 0
                    # large outputs computed tile by tile: their region's inner nodes are never whole
                    regions = {}
                    if tile:
                        for d, names in roots.items():
                            node = program.outputs[names[0]].node
                            if (len(names) == 1 and not uses.get(d) and not isinstance(node, Load)
                                    and dts[names[0]] in FLOAT_DTYPES):
                                reg = plan_region(node, uses, outputs=roots.keys())
                                if reg is not None:
                                    regions[d] = reg
                    inner = {k for d, reg in regions.items() for k in reg.nodes if k != d}
                    # Outputs are streamed to the shard file as they are computed, in the order their
                    # roots complete; the header (names, shapes, dtypes) is known before computing.
                    emit = [name for n in order for name in roots.get(n.digest, [])]
                    stream = w.shard([(name, program.outputs[name].node.shape, dts[name]) for name in emit])
                    for n in order:
                        if n.digest in inner:
                            continue  # computed tile by tile with its region's root
                        if n.digest in regions:
                            reg = regions[n.digest]
                            name = roots[n.digest][0]
                            try:
                                slab_bytes = _write_tiled(reg, name, torch_dtype(dts[name]), cache, sdts, ctx,
                                                          stream, behind, slabs, bar)
                            except CheckpointError:
                                raise
                            except Exception as e:
                                raise ExecutionError(f"computing {n!r} (for {name}) failed: {type(e).__name__}: {e}") from e
                            computed += len(reg.nodes)
                            held -= _release(reg.boundary, uses, cache)  # boundary values, at their last use
                            ring_bytes = max(ring_bytes, slab_bytes * len(slabs))
                            peak_held = max(peak_held, held + ring_bytes + behind.held_bytes())
                            peak_rss = max(peak_rss, _rss())
                            continue
                        rng = None
                        if isinstance(n, Load) and n.digest in roots and not uses.get(n.digest) and not bytes_through_torch:
                            rng = reader.byte_range(n.name)
                            if rng is not None and any(dts[name] != reader.dtype(n.name) for name in roots[n.digest]):
                                rng = None
                        if rng is not None:
                            # an output that is a stored tensor, unchanged: its bytes are copied file to
                            # file (in the kernel where it can), never through Python or torch
                            for name in roots[n.digest]:
                                behind.submit(stream.copy_range, name, rng[0], rng[1], rng[2], reader.dtype(n.name),
                                              n.shape, nbytes=0)  # holds no tensor
                                reader.count_copy(rng[2] - rng[1])
                                bar.advance(size_of[name])
                                copied += 1
                            computed += 1
                            continue
                        import torch  # noqa: F811 - here, not at the top: a program of byte copies never needs it

                        if threads is None:  # one core is the writer thread's (measured: intra-op
                            # threads spinning on a 2-core machine slowed the writes down more than
                            # they sped the tiles up: 12.3-13.1 s with one, 15.2-16.3 s with two)
                            threads = torch.get_num_threads()
                            torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))

                        try:
                            if isinstance(n, Load):
                                val = reader.get(n.name)
                            else:
                                ins = [cache[c.digest] for c in n.children()]
                                # the output dtype where n is an output's root that only moves values
                                # and feeds nothing else (see cast_inputs)
                                out_dts = {dts[name] for name in roots.get(n.digest, [])}
                                final = (torch_dtype(out_dts.pop()) if len(out_dts) == 1 and not uses.get(n.digest)
                                         and isinstance(n, MOVES) else None)
                                ins = cast_inputs(n, ins, final)
                                sdt = sdts.get(n.digest)
                                ctx.storage_dtype = torch_dtype(sdt) if sdt else None
                                val = n.compute(ins, ctx)
                                del ins
                        except CheckpointError:
                            raise
                        except Exception as e:
                            who = ", ".join(roots.get(n.digest, [])) or "an intermediate value"
                            raise ExecutionError(f"computing {n!r} (for {who}) failed: {type(e).__name__}: {e}") from e
                        computed += 1
                        held -= _release(n.children(), uses, cache)  # children, at their last use
                        for name in roots.get(n.digest, []):
                            # cast to the output dtype block by block; queued while within the budget
                            behind.submit(stream.write, name, val, nbytes=_nbytes(val))
                            bar.advance(size_of[name])
                        if uses.get(n.digest, 0) > 0:
                            cache[n.digest] = val
                            held += _nbytes(val)
                        del val
                        # outputs queued for writing (see WriteBehind) are held too
                        peak_held = max(peak_held, held + ring_bytes + behind.held_bytes())
                        peak_rss = max(peak_rss, _rss())
                    assert not cache, "executor bug: values left in cache after the shard"
                    # closed by the writer thread after the shard's last write: the next shard is
                    # computed meanwhile (a drain here left the writer idle at every shard's start)
                    behind.submit(_close_shard, w, stream, nbytes=0)
                    peak_rss = max(peak_rss, _rss())
                behind.drain()
            finally:
                behind.close()
            w.write_config(merged_config(reader, program, dtype))
            if copy_tokenizer:
                reader.save_tokenizer(w.dir)
            if card is not None:
                from scaler_wizard.runtime.card import render_card

                w.write_text("README.md", render_card(card))
            for fname, text in (extra_files or {}).items():
                w.write_text(fname, text)
            out = w.commit()
            written = w.bytes_written
    finally:
        bar.stop()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    return ExecutionReport(
        out_dir=str(out),
        n_outputs=len(program.outputs),
        n_shards=len(shards),
        tensor_bytes=total,
        bytes_written=written,
        bytes_read=reader.bytes_read - bytes0,
        input_reads=reader.reads - reads0,
        nodes_computed=computed,
        wall_s=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_held_bytes=peak_held,
        largest_shard_bytes=max(sum(size_of[n] for n in s) for s in shards),
        dtypes={d: list(dts.values()).count(d) for d in sorted(set(dts.values()))},
        byte_copies=copied,
    )
