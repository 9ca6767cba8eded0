"""How fast is `apply` compared with just copying the bytes?

Builds (once, cached under ./bench-cache/) a random TinyLlama-1.1B-shaped bf16 checkpoint (hidden 2048,
ffn 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000), written tensor by tensor with the project's
CheckpointWriter, then times, each in its own subprocess (so peak RSS figures do not mix):

* ``raw``: a streaming copy of the same output bytes -- for each output tensor, read its source tensor
  with safetensors and write shards of the same size with ``safetensors.torch.save_file``;
* ``execute``: ``scaler_wizard.runtime.execute.execute`` of the program (outputs that are stored
  tensors unchanged are byte-copied file to file, ``os.copy_file_range``);
* ``torch``: the same with ``bytes_through_torch=True`` (every output read into and written from torch:
  the executor before byte copies);
* ``cp``: an in-kernel copy (``shutil.copyfile``: ``sendfile``/``copy_file_range``) of the input shards,
  scaled to the output's byte count (``x raw`` column uses ``raw``; ``cp`` is the disk's floor).

Programs (``--program``):

* ``depth``: the plan ``duplicate layers 6..16`` (scaled to the model) compiled by the real compiler: 22 -> 32 layers,
  SOLAR-style (copies of layers 6..15 inserted after layer 15);
* ``width``: the plan ``widen ffn x2 net2net`` + ``widen hidden to 2560 lemon`` (computed outputs:
  gathers, splits, random fan-in, LEMON residues);
* ``loads``: a hand-built program of pure Loads (the same 22 -> 32 depth map), the executor's floor.

The raw baseline writes, for every output tensor, bytes of the same shape and dtype made from one
input tensor it reads (so it reads and writes as much as a copy can), in the same shards.

Whole commands (``--suite cli``, the default; issue 11's table), each a fresh process timed from
outside (wall; CPU = user + system from wait4; peak RSS = the larger of wait4's high-water mark and
50 ms sampling of the process tree), in one run, the order reversed every other round (``--rounds``).
Before each, the previous output is deleted, ``sync`` is called and the input shards are read
(``--input-cache warm``; ``cold`` drops them from the page cache instead), so every command starts
from the same state; the ratios are given of medians and paired (the median over rounds of the two
runs of one round, which cancels the machine's drift):

* ``apply``: ``scaler-wizard apply PLAN --model SRC -o OUT --no-verify`` (start-up included);
* ``verify``: ``scaler-wizard apply PLAN --model SRC -o OUT`` (the default: verifies, then lands);
* ``copy``: a userspace byte copy of as many bytes as the output's shards (``cat SHARDS | head -c N``);
* ``cp``: an in-kernel copy (coreutils ``cp``: ``copy_file_range``) of input shards, repeated until
  as many bytes as the output's were copied, its time scaled to exactly that many bytes;
* ``mergekit``: mergekit's ``passthrough`` merge of the same layer order (``mergekit-yaml``),
  installed on demand into its own virtual environment under the cache directory (``python -m
  venv``; the project's environment is on its path read-only through a ``.pth`` file, so pip adds
  only what is missing, into that environment); skipped with a note when it cannot be installed
  (no network, a build error). Its output is compared with apply's tensor by tensor (bytes).

    .venv/bin/python benchmarks/apply_speed.py --rounds 2                 # the table of the README
    .venv/bin/python benchmarks/apply_speed.py --suite program --order raw,execute,torch,cp

    .venv/bin/python benchmarks/apply_speed.py                # 1.1B (about 2.2 GB in, 3.2 GB out)
    .venv/bin/python benchmarks/apply_speed.py --small        # a 4-layer toy of the same shape family
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=4000)

LAYER_TENSORS = [
    ("self_attn.q_proj.weight", lambda c: (c["hidden_size"], c["hidden_size"])),
    ("self_attn.k_proj.weight", lambda c: (c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"], c["hidden_size"])),
    ("self_attn.v_proj.weight", lambda c: (c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"], c["hidden_size"])),
    ("self_attn.o_proj.weight", lambda c: (c["hidden_size"], c["hidden_size"])),
    ("mlp.gate_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    ("mlp.up_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    ("mlp.down_proj.weight", lambda c: (c["hidden_size"], c["intermediate_size"])),
    ("input_layernorm.weight", lambda c: (c["hidden_size"],)),
    ("post_attention_layernorm.weight", lambda c: (c["hidden_size"],)),
]


def plan_for(program: str, dims: dict, new_layers: int) -> str:
    """The benchmark plans, scaled to the model (TinyLlama: `duplicate layers 6..16` for 22 -> 32;
    `widen ffn x2 net2net` + `widen hidden to 2560 lemon`)."""
    n = dims["num_hidden_layers"]
    if program == "depth":
        k = new_layers - n
        a = (n - k) // 2
        return f"duplicate layers {a}..{a + k}\n"
    return f"widen ffn x2 net2net\nwiden hidden to {dims['hidden_size'] * 5 // 4} lemon\n"


def shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (c["vocab_size"], c["hidden_size"]))]
    for i in range(c["num_hidden_layers"]):
        out += [(f"model.layers.{i}.{n}", f(c)) for n, f in LAYER_TENSORS]
    out += [("model.norm.weight", (c["hidden_size"],)), ("lm_head.weight", (c["vocab_size"], c["hidden_size"]))]
    return out


def build_checkpoint(dst: Path, dims: dict, shard_size: str) -> Path:
    import torch
    from transformers import LlamaConfig

    from scaler_wizard.runtime.checkpoint import CheckpointWriter

    if (dst / "config.json").is_file():
        return dst
    cfg = LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False).to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["architectures"] = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with CheckpointWriter(dst, max_shard_size=shard_size) as w:
        for name, shp in shapes(dims):
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
            w.add(name, t)  # the writer holds at most one shard
        w.write_config(cfg)
        w.commit()
    print(f"built {dst} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dst


def depth_program(reader, new_layers: int):
    """SOLAR-style depth up-scaling n -> new_layers: first m layers, then the last m layers (m = new/2)."""
    from scaler_wizard.compiler.program import Load, TensorProgram

    n = reader.config["num_hidden_layers"]
    m = new_layers // 2
    src = list(range(0, m)) + list(range(n - (new_layers - m), n))
    p = TensorProgram(config_patch={"num_hidden_layers": new_layers},
                      metadata={"plan": f"depth {n} -> {new_layers} (SOLAR: layers 0..{m - 1} + {n - (new_layers - m)}..{n - 1})"})
    p.copy_through("model.embed_tokens.weight", reader.shape("model.embed_tokens.weight"))
    for j, i in enumerate(src):
        for suffix, _ in LAYER_TENSORS:
            name = f"model.layers.{i}.{suffix}"
            p.add(f"model.layers.{j}.{suffix}", Load(name, reader.shape(name)), exactness="approx",
                  status="original" if i == j else "new", explain=f"copy of layer {i}")
    for name in ("model.norm.weight", "lm_head.weight"):
        p.copy_through(name, reader.shape(name))
    return p


class _PeakRSS:
    """Samples this process's RSS every few ms (getrusage's ru_maxrss is inherited across exec on Linux,
    so a child would report its parent's peak)."""

    def __init__(self, period: float = 0.005):
        import threading

        import psutil

        self.proc, self.period, self.peak = psutil.Process(), period, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child(args) -> dict:
    """One timed run, in this (fresh) process."""
    if args.child == "build":
        build_checkpoint(Path(args.dst), SMALL if args.small else TINYLLAMA, args.shard_size)
        return {}
    from scaler_wizard.runtime.checkpoint import open_checkpoint, parse_size, plan_shards

    reader = open_checkpoint(args.src)
    if args.program == "loads":
        prog = depth_program(reader, args.new_layers)
    else:
        from scaler_wizard import api

        prog = api.compile(plan_for(args.program, reader.config, args.new_layers), str(args.src))
    dst = Path(args.dst)
    if dst.exists():
        shutil.rmtree(dst)
    import torch  # noqa: F401  (imports outside the timed region)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from scaler_wizard.compiler.program import Load
    from scaler_wizard.runtime.execute import execute

    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":  # --huge-pages on: as `scaler-wizard apply` runs
        from scaler_wizard.cli import tune_allocator

        tune_allocator()
    rss = _PeakRSS().__enter__()
    rss_before = rss.peak
    t0 = time.perf_counter()
    if args.child == "cp":
        dst.mkdir(parents=True)
        total = 0
        files = sorted(Path(args.src).glob("*.safetensors"))
        want = sum(out.node.numel * 2 for out in prog.outputs.values())  # bf16 throughout
        k = 0
        while total < want:  # copy the input shards until as many bytes as the output were copied
            f = files[k % len(files)]
            shutil.copyfile(f, dst / f"{k}-{f.name}")
            total += f.stat().st_size
            k += 1
        bytes_out = total
        extra = {}
    elif args.child == "raw":

        def first_load(node):
            if isinstance(node, Load):
                return node
            for c in node.children():
                found = first_load(c)
                if found is not None:
                    return found
            return None

        src_of, shape_of = {}, {}
        for name, out in prog.outputs.items():
            ld = first_load(out.node)
            src_of[name] = ld.name if ld is not None else next(iter(reader.names()))
            shape_of[name] = tuple(out.node.shape)
        esize = {n: 2 for n in src_of}  # the benchmark model is bf16 throughout
        sizes = [(n, esize[n] * int(torch.tensor(shape_of[n]).prod())) for n in src_of]
        shards = plan_shards(sizes, parse_size(args.shard_size))
        dst.mkdir(parents=True)
        total = 0
        for k, shard in enumerate(shards):
            buf = {}
            for n in shard:
                info = reader.info(src_of[n])
                with safe_open(info.file, "pt") as f:
                    t = f.get_tensor(reader._resolve(src_of[n]))
                numel = int(torch.tensor(shape_of[n]).prod())
                flat = t.reshape(-1)
                if flat.numel() < numel:
                    flat = flat.repeat((numel + flat.numel() - 1) // flat.numel())
                buf[n] = flat[:numel].reshape(shape_of[n]).clone()
            save_file(buf, str(dst / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in buf.values())
            del buf
        bytes_out = total
        extra = {}
    else:
        if args.slabs:
            from scaler_wizard.runtime import tiles

            tiles.SLABS = args.slabs
        rep = execute(prog, reader, dst, shard_size=args.shard_size, progress=False,
                      bytes_through_torch=args.child == "torch", tile=not args.no_tile)
        bytes_out = rep.tensor_bytes
        extra = {"peak_held_bytes": rep.peak_held_bytes, "largest_shard_bytes": rep.largest_shard_bytes,
                 "n_shards": rep.n_shards, "byte_copies": rep.byte_copies}
    wall = time.perf_counter() - t0
    rss.__exit__(None, None, None)
    return {"mode": args.child, "wall_s": wall, "bytes_out": bytes_out, "max_rss_bytes": rss.peak,
            "rss_before_bytes": rss_before, **extra}


# ----------------------------------------------------------------------------------- whole commands


def _timed(cmd, env: dict, shell: bool = False) -> dict:
    """Wall, CPU (user+sys, wait4) and peak RSS (max of wait4's high-water mark and 50 ms sampling
    of the process tree) of one command."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from verify_memory import Sampler

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env, shell=shell)
        smp = Sampler(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        peak = max(smp.stop(), ru.ru_maxrss * 1024)
        fo.seek(0)
        fe.seek(0)
        return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss": peak,
                "rc": os.waitstatus_to_exitcode(status), "stdout": fo.read(), "stderr": fe.read()}


def _mergekit(cache: Path) -> tuple[Path | None, str]:
    """mergekit-yaml from a virtual environment of its own under ``cache`` (made on first use);
    (None, why) when it cannot be installed."""
    venv = cache / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe, ""
    base = getattr(sys, "_base_executable", sys.executable)
    r = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"python -m venv failed: {r.stderr.strip()[-300:]}"
    # the project's packages (torch, transformers, ...) visible read-only: pip installs only what
    # is missing, into this environment (it never uninstalls outside it)
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    mine = next((venv / "lib").glob("python*/site-packages"))
    (mine / "project-env.pth").write_text(str(site) + "\n")
    print("installing mergekit into", venv, "...", file=sys.stderr)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "mergekit"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not exe.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"pip install mergekit failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return exe, ""


def _mergekit_config(dims: dict, new_layers: int, src: Path, path: Path) -> None:
    """A passthrough merge with the layer order the depth plan gives (first the layers up to the
    end of the duplicated range, then the range again, then the rest)."""
    n = dims["num_hidden_layers"]
    k = new_layers - n
    a = (n - k) // 2
    slices = [(0, a + k), (a, a + k), (a + k, n)]
    lines = ["merge_method: passthrough", "dtype: bfloat16", "slices:"]
    for lo, hi in slices:
        if hi > lo:
            lines += ["  - sources:", f"      - model: {src}", f"        layer_range: [{lo}, {hi}]"]
    path.write_text("\n".join(lines) + "\n")


def _same_tensors(a: Path, b: Path) -> str:
    """'identical' when both checkpoints hold the same tensor names with the same bytes, else what differs."""
    from scaler_wizard.runtime.checkpoint import open_checkpoint

    ra, rb = open_checkpoint(a), open_checkpoint(b)
    if set(ra.names()) != set(rb.names()):
        return f"different tensor names ({len(set(ra.names()) ^ set(rb.names()))} differ)"
    for n in ra.names():
        (fa, sa, ea), (fb, sb, eb) = ra.byte_range(n), rb.byte_range(n)
        if ea - sa != eb - sb or ra.dtype(n) != rb.dtype(n) or ra.shape(n) != rb.shape(n):
            return f"{n}: different dtype or shape"
        with open(fa, "rb") as x, open(fb, "rb") as y:
            for off in range(0, ea - sa, 64 << 20):
                k = min(64 << 20, ea - sa - off)
                if os.pread(x.fileno(), k, sa + off) != os.pread(y.fileno(), k, sb + off):
                    return f"{n}: different bytes"
    return "identical"


def _input_cache(files: list[Path], state: str) -> None:
    """Put every command of the cli suite in the same page-cache state for its inputs (untimed).

    ``warm``: read the input shards just before the command, so each starts with them cached. Needed
    on VMs that page out idle file pages (this one runs a DAMON ``pageout`` scheme: unmapped file pages
    idle for about a minute are dropped at 128 MiB/s). Without it, the first command of a round
    re-read its 2.1 GB input from the disk while the others found it cached (measured: 2.1 GB of
    ``workingset_refault_file`` in the first apply, 7.2 s against 2.9-3.1 s for the next ones).
    ``cold``: drop the inputs' cached pages (``POSIX_FADV_DONTNEED``, after the ``sync`` above), so
    every command reads its input from the disk."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            if state == "cold":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                buf = bytearray(16 << 20)
                while fh.readinto(buf):
                    pass


def cli_suite(args, dims: dict, name: str, src: Path, new_layers: int) -> int:
    cache = Path(args.cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # the commands run as an installed package does: byte code cached (written by the warm-up run
    # below). With PYTHONDONTWRITEBYTECODE set (this sandbox sets it) every start compiled the
    # project's ~150 modules again: 0.2 s of builtins.compile under cProfile, on every `apply`.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    plan = cache / f"depth-{name}.expand"
    plan.write_text(plan_for("depth", dims, new_layers))
    cli = [sys.executable, "-m", "scaler_wizard", "apply", str(plan), "--model", str(src), "--no-progress",
           "--shard-size", args.shard_size, "--force", "-o"]
    inputs = sorted(src.glob("*.safetensors"))
    modes = args.order.split(",") if args.order != "raw,execute,torch,cp" else ["apply", "verify", "copy", "cp", "mergekit"]
    notes = []
    mk = None
    if "mergekit" in modes:
        mk, why = _mergekit(cache)
        if mk is None:
            notes.append(f"mergekit skipped: {why}")
            modes.remove("mergekit")
        else:
            _mergekit_config(dims, new_layers, src, cache / f"mergekit-{name}.yml")
    # warm the structure cache, the byte code and the page cache, and measure the output's size (not
    # timed; run every time, so the first timed command is not the only one that starts cold). Twice:
    # the second run replaces the first one's output (--force), so the first timed command, like every
    # later one, starts just after an output of this size was deleted. On this VM (free page reporting
    # to the host) a first timed command that wrote into memory that had been free for a while instead
    # took 2-3x as long, in system time (measured: apply 10.0 s wall, 9.0 s CPU, against 2.9-4.0 s for
    # the six later rounds; cp 4.8 s against 2.2-4.6 s).
    ref = cache / f"out-{name}-reference"
    for _ in range(2):
        r = subprocess.run(cli + [str(ref), "--no-verify"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
    bytes_out = sum(f.stat().st_size for f in ref.glob("*.safetensors"))
    results: dict[str, list] = {m: [] for m in modes}
    load = []
    for rnd in range(args.rounds):
        order = modes if rnd % 2 == 0 else modes[::-1]
        for mode in order:
            dst = cache / f"out-{name}-{mode}"
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()  # one run's dirty pages must not slow the next
            _input_cache(inputs, args.input_cache)
            load.append(os.getloadavg()[0])
            scale = 1.0
            if mode == "apply":
                r = _timed(cli + [str(dst), "--no-verify"], env)
            elif mode == "verify":
                r = _timed(cli + [str(dst), "--format", "json"], env)
            elif mode == "copy":
                dst.mkdir(parents=True)
                reps = -(-bytes_out // sum(f.stat().st_size for f in inputs))
                files = " ".join(f"'{f}'" for f in inputs * reps)
                r = _timed(f"cat {files} | head -c {bytes_out} > '{dst}/copy.bin'", env, shell=True)
            elif mode == "cp":
                dst.mkdir(parents=True)
                cmds, total, k = [], 0, 0
                while total < bytes_out:
                    f = inputs[k % len(inputs)]
                    cmds.append(f"cp '{f}' '{dst}/{k}-{f.name}'")
                    total += f.stat().st_size
                    k += 1
                r = _timed(" && ".join(cmds), env, shell=True)
                scale = bytes_out / total
            elif mode == "mergekit":
                r = _timed([str(mk), str(cache / f"mergekit-{name}.yml"), str(dst), "--out-shard-size", "1B",
                            "--no-copy-tokenizer"], env)
                if r["rc"] == 0 and rnd == 0:  # in a child: this process stays small (see _timed)
                    same = subprocess.run([sys.executable, __file__, "--child", "same", "--src", str(dst), "--dst",
                                           str(ref)], capture_output=True, text=True, env=env)
                    notes.append(f"mergekit's output vs apply's: {(same.stdout or same.stderr).strip()[-300:]}")
            else:
                raise SystemExit(f"unknown mode {mode!r} for --suite cli")
            if r["rc"] != 0 and not (mode == "verify" and r["rc"] == 1):
                print(f"{mode} failed (exit {r['rc']}):\n{r['stderr'][-3000:]}", file=sys.stderr)
                return 1
            r["wall_s"] *= scale
            r["cpu_s"] *= scale
            if mode == "verify":
                txt = r["stdout"]
                v = json.loads(txt[txt.index("{"):])["verification"]
                r["verification"] = {k: v.get(k) for k in ("passed", "judged", "max_rel", "notes")}
            results[mode].append(r)
            print(f"round {rnd + 1} {mode:<9} {r['wall_s']:8.2f} s  CPU {r['cpu_s']:7.2f} s  peak RSS "
                  f"{r['peak_rss'] / 1e9:6.3f} GB  (load {load[-1]:.1f})", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(dst, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ref, ignore_errors=True)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    base = {k: med([r["wall_s"] for r in results[k]]) for k in ("copy", "cp") if results.get(k)}

    def paired(mode: str, against: str) -> float:
        """The median over rounds of MODE's time over AGAINST's in the same round: the two ran
        back to back, so the machine's drift (30-50% within minutes here) cancels out."""
        pairs = list(zip(results.get(mode, []), results.get(against, [])))
        return med([a["wall_s"] / b["wall_s"] for a, b in pairs]) if pairs else float("nan")

    print(f"plan: {plan_for('depth', dims, new_layers).strip()} ({dims['num_hidden_layers']} -> {new_layers} layers); "
          f"model {name}; output {bytes_out / 1e9:.2f} GB; {args.rounds} round(s), order reversed every other "
          f"round; inputs {args.input_cache} in the page cache at each start; load average {min(load):.1f}-{max(load):.1f} (1 min, at each start; {os.cpu_count()} CPUs)")
    print(f"{'run':<9} {'wall s (median)':>16} {'runs':>20} {'CPU s':>8} {'x copy':>7} {'x cp':>6} "
          f"{'paired x copy':>14} {'paired x cp':>12} {'peak RSS GB':>12}")
    for mode, rs in results.items():
        w = med([r["wall_s"] for r in rs])
        xs = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
        print(f"{mode:<9} {w:16.2f} {xs:>20} {med([r['cpu_s'] for r in rs]):8.1f} "
              f"{w / base['copy'] if 'copy' in base else float('nan'):7.2f} {w / base['cp'] if 'cp' in base else float('nan'):6.2f} "
              f"{paired(mode, 'copy'):14.2f} {paired(mode, 'cp'):12.2f} "
              f"{max(r['peak_rss'] for r in rs) / 1e9:12.3f}")
    print("paired: the median over rounds of the run's time over the copy's (or cp's) in the same round")
    for r in results.get("verify", []):
        notes.append(f"verification: {r['verification']}")
        break
    for n in notes:
        print("note:", n)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(ROOT / "bench-cache"))
    ap.add_argument("--small", action="store_true", help="a small model of the same family (smoke test)")
    ap.add_argument("--shard-size", default="1GB", help="input and output shard size")
    ap.add_argument("--program", default="depth", choices=["depth", "width", "loads"])
    ap.add_argument("--new-layers", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--order", default="raw,execute,torch,cp",
                    help="run order (comma separated; --suite cli default: apply,verify,copy,cp,mergekit)")
    ap.add_argument("--suite", default="cli", choices=["cli", "program"],
                    help="cli: whole commands, ratios to copies (default); program: the executor in-process")
    ap.add_argument("--rounds", type=int, default=1, help="--suite cli: rounds (order reversed every other)")
    ap.add_argument("--input-cache", default="warm", choices=["warm", "cold"],
                    help="--suite cli: before each timed command, read the input shards (warm, the default) "
                         "or drop them from the page cache (cold, every command reads from the disk)")
    ap.add_argument("--huge-pages", default="on", choices=["on", "off"],
                    help="--suite program: THP_MEM_ALLOC_ENABLE and malloc's thresholds (scaler_wizard.cli."
                         "tune_allocator) for every child, as `scaler-wizard apply` sets them (on), or left "
                         "unset (off)")
    ap.add_argument("--slabs", type=int, default=0,
                    help="program suite: slabs in the executor's ring (runtime.tiles.SLABS; default: its own)")
    ap.add_argument("--no-tile", action="store_true",
                    help="--suite program: the executor evaluates every node whole (execute(tile=False))")
    ap.add_argument("--child", choices=["raw", "execute", "torch", "cp", "build", "same"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "same":
        print(_same_tensors(Path(args.src), Path(args.dst)))
        return 0
    if args.child:
        res = child(args)
        if res:
            print(json.dumps(res))
        return 0

    dims = SMALL if args.small else TINYLLAMA
    name = "small-random-bf16" if args.small else "tinyllama-1.1b-random-bf16"
    cache = Path(args.cache)
    src = cache / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.suite == "program" and args.huge_pages == "on":
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # what the CLI sets for apply (scaler_wizard.cli.entry)
    if not (src / "config.json").is_file():  # build in a subprocess: keeps this process small
        subprocess.run([sys.executable, __file__, "--child", "build", "--dst", str(src), "--shard-size",
                        args.shard_size] + (["--small"] if args.small else []), check=True, env=env)
    new_layers = args.new_layers or (dims["num_hidden_layers"] * 32 // 22)
    if args.suite == "cli":
        return cli_suite(args, dims, name, src, new_layers)
    results = {}
    for mode in args.order.split(","):
        dst = cache / f"out-{name}-{mode}"
        os.sync()  # do not let one run's dirty pages slow the next one down
        cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--dst", str(dst),
               "--shard-size", args.shard_size, "--new-layers", str(new_layers), "--program", args.program] + (
                  ["--no-tile"] if args.no_tile else []) + (["--slabs", str(args.slabs)] if args.slabs else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results.setdefault(mode, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    runs = results
    # a mode given more than once in --order: its median run (by wall time), every wall time listed
    results = {m: sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2] for m, rs in runs.items()}
    raw = results.get("raw", {}).get("wall_s", float("nan"))
    what = (f"loads ({dims['num_hidden_layers']} -> {new_layers} layers)" if args.program == "loads"
            else plan_for(args.program, dims, new_layers).strip().replace("\n", "; "))
    print(f"program: {args.program}: {what}; model {name}, shard size {args.shard_size}; "
          f"THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
          f"{'; whole-node evaluation (--no-tile)' if args.no_tile else ''}"
          f"{f'; {args.slabs} slabs' if args.slabs else ''}")
    print(f"{'mode':<8} {'wall s':>8} {'GB out':>8} {'GB/s':>6} {'x raw':>6} {'peak RSS GB':>12} {'held GB':>8}")
    for mode, r in results.items():
        gb = r["bytes_out"] / 1e9
        held = r.get("peak_held_bytes")
        walls = "" if len(runs[mode]) < 2 else "  runs: " + ", ".join(f"{x['wall_s']:.2f}" for x in runs[mode])
        print(f"{mode:<8} {r['wall_s']:8.2f} {gb:8.3f} {gb / r['wall_s']:6.2f} {r['wall_s'] / raw:6.2f} "
              f"{max(x['max_rss_bytes'] for x in runs[mode]) / 1e9:12.3f} "
              f"{'' if held is None else f'{held / 1e9:8.3f}'}{walls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
