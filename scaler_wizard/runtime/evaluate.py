"""Capability checks through lm-eval: several models, one comparison table, JSON output.

Tasks are lm-eval task names (hub tasks when online, or YAML tasks under ``include_path``), plus
two built-ins that work offline:

* ``perplexity``: rolling log-likelihood over local text files (split into documents of about
  ``doc_chars`` characters) -> word_perplexity, byte_perplexity, bits_per_byte;
* ``mc``: multiple choice over local jsonl files of ``{"question", "choices", "answer"}``
  -> acc, acc_norm.

Their YAML templates live in ``scaler_wizard/data/lm_eval``; the filled-in tasks and the data
they read are written to a temporary include directory.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from scaler_wizard.diagnostics import UsageError
from scaler_wizard.runtime.preflight import check_model, require_hf_dir

BUILTIN = ("perplexity", "mc")


@dataclass
class EvalReport:
    models: list[str]  # labels, in order
    results: dict[str, dict[str, dict[str, float]]]  # label -> task -> metric -> value
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"models": self.models, "results": self.results, "config": self.config}

    def table(self) -> str:
        """Tasks x metrics as rows, models as columns."""
        rows: list[tuple[str, str]] = []
        for label in self.models:
            for task, metrics in self.results[label].items():
                for m in metrics:
                    if (task, m) not in rows:
                        rows.append((task, m))
        head = ["task", "metric", *self.models]
        body = []
        for task, m in rows:
            vals = []
            for label in self.models:
                v = self.results[label].get(task, {}).get(m)
                vals.append("-" if v is None else f"{v:.4g}")
            body.append([task, m, *vals])
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _template(name: str) -> str:
    return (resources.files("scaler_wizard") / "data" / "lm_eval" / name).read_text()


def _write_task(include: Path, template: str, task: str, rows: list[dict]) -> None:
    """The task's documents as jsonl beside its YAML (lm-eval's `dataset_path: json`)."""
    data = include / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = _template(template).replace("@TASK@", task).replace("@DATA@", str(data.resolve()))
    (include / f"{task}.yaml").write_text(text)


def _split_docs(text: str, doc_chars: int) -> list[str]:
    """Paragraph-aligned documents of about ``doc_chars`` characters."""
    docs, cur = [], ""
    for para in text.replace("\r\n", "\n").split("\n\n"):
        if cur and len(cur) + len(para) > doc_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        docs.append(cur)
    return [d for d in docs if d.strip()]


def write_perplexity_task(include: Path, text_files: list[str], task: str = "sw_perplexity",
                          doc_chars: int = 2000) -> str:
    rows = []
    from scaler_wizard.runtime.data import check_text_file

    for f in text_files:
        check_text_file(f)  # a binary file is refused by name, not scored as replacement characters
        try:
            text = Path(f).read_text(errors="replace")
        except OSError as e:
            raise UsageError(f"cannot read text file {f}: {e.strerror or e}") from None
        rows += [{"text": d, "source": Path(f).name} for d in _split_docs(text, doc_chars)]
    if not rows:
        raise UsageError(f"--text {' '.join(text_files)}: no text to evaluate")
    _write_task(include, "perplexity.yaml.tmpl", task, rows)
    return task


def write_mc_task(include: Path, mc_files: list[str], task: str = "sw_mc") -> str:
    """Validated, normalised (answer as an index) copy of the questions plus the task YAML."""
    rows = []
    for f in mc_files:
        try:
            lines = Path(f).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read multiple-choice file {f}: {e.strerror or e}") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{f}:{i}: not JSON: {e.msg}") from None
            q, choices, ans = d.get("question"), d.get("choices"), d.get("answer")
            if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) for c in choices):
                raise UsageError(f"{f}:{i}: needs \"question\" (string) and \"choices\" (2+ strings)")
            if isinstance(ans, str) and ans in choices:
                ans = choices.index(ans)
            if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
                raise UsageError(f"{f}:{i}: \"answer\" must be a choice index 0..{len(choices) - 1} or a choice text")
            rows.append({"question": q, "choices": choices, "answer": ans})
    if not rows:
        raise UsageError(f"--mc {' '.join(mc_files)}: no questions")
    _write_task(include, "multiple_choice.yaml.tmpl", task, rows)
    return task


def _label(spec: str, used: set[str]) -> tuple[str, str]:
    """``name=path`` or ``path`` (label: the directory name, made unique)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
    else:
        path = spec
        p = Path(spec)
        label = p.name if p.name not in ("final",) and not p.name.startswith("checkpoint-") \
            else f"{p.parent.name}/{p.name}"
    base, n = label, 2
    while label in used:
        label, n = f"{base}#{n}", n + 1
    used.add(label)
    return label, path


BUILTIN_TASKS = ("perplexity", "mc")


def _is_offline_error(e: BaseException) -> bool:
    """Whether ``e`` (or its cause chain) says the hub could not be reached."""
    for _ in range(8):
        if e is None:
            return False
        if isinstance(e, ConnectionError) or "Offline" in type(e).__name__ or "ConnectionError" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
    return False


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def evaluate(models: list[str], tasks: list[str], *, text_files: list[str] = (), mc_files: list[str] = (),
             include_paths: list[str] = (), limit: int | float | None = None, batch_size: int = 4,
             device: str | None = None, dtype: str = "float32", num_fewshot: int | None = None,
             doc_chars: int = 2000, max_length: int | None = None) -> EvalReport:
    """Run lm-eval ``tasks`` on every model in ``models`` (HF dirs or hub ids, ``label=path`` to
    name them). Raises UsageError for unknown tasks or unreadable inputs."""
    if not models:
        raise UsageError("no models to evaluate")
    if not tasks:
        raise UsageError("no tasks: pass --tasks (built-ins: perplexity, mc; or lm-eval task names)")
    used: set[str] = set()
    specs = [_label(spec, used) for spec in models]
    for label, path in specs:  # every model checked (config, weights, shapes) before any work
        flag = f"model {label}=" if label != Path(path).name else "MODEL"
        require_hf_dir(check_model(path, flag=flag), path, flag, "eval")
    import logging

    import torch

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    # lm-eval records its own git hash by running `git` in the working directory: outside a git
    # checkout that prints "fatal: not a git repository" to the user's terminal
    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = lambda: None
    from lm_eval.tasks import TaskManager

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sw-eval-") as tmp:
        include = Path(tmp)
        task_names: list[str] = []
        for t in tasks:
            if t == "perplexity":
                if not text_files:
                    raise UsageError("task `perplexity` needs --text FILE...")
                task_names.append(write_perplexity_task(include, list(text_files), doc_chars=doc_chars))
            elif t == "mc":
                if not mc_files:
                    raise UsageError("task `mc` needs --mc FILE.jsonl...")
                task_names.append(write_mc_task(include, list(mc_files)))
            else:
                task_names.append(t)
        for p in include_paths:
            if not Path(p).is_dir():
                raise UsageError(f"--include-path {p} is not a directory")
        # indexing lm-eval's own few thousand task files takes seconds: only when a task is not local
        tm = TaskManager(include_path=[str(include), *include_paths], include_defaults=False)
        if not set(task_names) <= set(tm.all_tasks):
            tm = TaskManager(include_path=[str(include), *include_paths], include_defaults=True)
        known = set(tm.all_tasks)
        missing = [t for t in task_names if t not in known]
        if missing:
            from scaler_wizard.diagnostics import suggest

            # the built-in tasks first: `perplxity` means `perplexity`, not some hub task that is near
            hints = [f"`{m}`" + (f" (did you mean `{s}`?)" if (s := suggest(m, BUILTIN_TASKS) or suggest(m, known))
                                 else "") for m in missing]
            raise UsageError(f"unknown lm-eval task {', '.join(hints)}; local YAML tasks need --include-path DIR")

        labels, results = [], {}
        for label, path in specs:
            kw = dict(pretrained=path, backend="causal", device=device, batch_size=batch_size, dtype=dtype)
            if max_length:
                kw["max_length"] = max_length
            lm = HFLM(**kw)
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=tm, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                              verbosity="ERROR")
            except Exception as e:
                if not _is_offline_error(e):
                    raise
                hub = [t for t in task_names if t not in ("sw_perplexity", "sw_mc")]
                raise UsageError(f"task {', '.join(hub) or task_names[0]}: its data is on the Hugging Face hub, which "
                                 "cannot be reached (offline, HF_HUB_OFFLINE=1 or no network); run it once online "
                                 "so the data is cached, or describe local data as a YAML task and pass "
                                 "--include-path DIR (the built-ins `perplexity` and `mc` need no hub)") from None
            per_task: dict[str, dict[str, float]] = {}
            for task, metrics in (out or {}).get("results", {}).items():
                task = {"sw_perplexity": "perplexity", "sw_mc": "mc"}.get(task, task)
                clean = {}
                for k, v in metrics.items():
                    if k == "alias" or not isinstance(v, (int, float)) or "_stderr" in k:
                        continue
                    clean[k.split(",")[0]] = _clean(float(v))
                per_task[task] = clean
            labels.append(label)
            results[label] = per_task
            del lm
        cfg = {"tasks": task_names, "limit": limit, "num_fewshot": num_fewshot, "device": device, "dtype": dtype,
               "models": {lab: spec for lab, spec in zip(labels, models)}}
        return EvalReport(labels, results, cfg)
