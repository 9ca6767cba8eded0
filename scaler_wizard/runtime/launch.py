"""Config files for running ``scaler-wizard train`` on several processes through existing
engines: an accelerate config (``accelerate launch --config_file``) and, for ZeRO, the DeepSpeed
JSON it points at. Batch size, accumulation and clipping are left "auto": ``train`` fills them
from its recipe, so one config serves every recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from scaler_wizard.diagnostics import UsageError

KINDS = ("ddp", "cpu-ddp", "zero1", "zero2", "zero3", "fsdp2")


def deepspeed_config(stage: int, *, offload: bool = False) -> dict:
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, reduce_bucket_size="auto",
                    stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def _yaml(d: dict, indent: int = 0) -> str:
    out = []
    for k, v in d.items():
        pad = "  " * indent
        if isinstance(v, dict):
            out.append(f"{pad}{k}:")
            out.append(_yaml(v, indent + 1))
        elif isinstance(v, bool):
            out.append(f"{pad}{k}: {'true' if v else 'false'}")
        else:
            plain = isinstance(v, str) and v and all(c.isalnum() or c in "_-./" for c in v) \
                and v.lower() not in ("no", "yes", "on", "off", "true", "false", "null", "y", "n")
            out.append(f"{pad}{k}: {v if plain or not isinstance(v, str) else json.dumps(v)}")
    return "\n".join(out)


def emit_config(kind: str, out_dir: str | Path, *, num_processes: int = 2, num_machines: int = 1,
                mixed_precision: str = "bf16", offload: bool = False) -> list[Path]:
    """Write ``accelerate_<kind>.yaml`` (and ``ds_<kind>.json`` for ZeRO) into ``out_dir``."""
    if kind not in KINDS:
        raise UsageError(f"--emit-config: unknown kind `{kind}` (choose from {', '.join(KINDS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cfg: dict = {"compute_environment": "LOCAL_MACHINE", "num_machines": num_machines,
                 "num_processes": num_processes, "machine_rank": 0, "main_training_function": "main",
                 "mixed_precision": mixed_precision, "rdzv_backend": "static", "same_network": True,
                 "use_cpu": False}
    if kind == "ddp":
        cfg["distributed_type"] = "MULTI_GPU"
    elif kind == "cpu-ddp":
        # measured: `use_cpu: true` (like `--cpu`) makes accelerate launch start ONE process whatever
        # num_processes says; the multi-GPU launcher starts them all and `train` then picks
        # MULTI_CPU over gloo because no GPU is visible (ACCELERATE_USE_CPU=1 does the same)
        cfg.update(distributed_type="MULTI_GPU", use_cpu=False, mixed_precision="no")
    elif kind.startswith("zero"):
        stage = int(kind[-1])
        ds_path = out / f"ds_{kind}.json"
        ds_path.write_text(json.dumps(deepspeed_config(stage, offload=offload), indent=2) + "\n")
        written.append(ds_path)
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(ds_path.resolve()), "zero3_init_flag": stage == 3}
        cfg.pop("mixed_precision")  # taken from the DeepSpeed file
    elif kind == "fsdp2":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                              "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": offload,
                              "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                              "fsdp_activation_checkpointing": False}
    path = out / f"accelerate_{kind}.yaml"
    path.write_text(_yaml(cfg) + "\n")
    written.insert(0, path)
    return written
