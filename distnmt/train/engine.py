"""Two engines behind one small interface: PyTorch DDP and DeepSpeed.

The training loop only calls ``train_step(batches)`` (one optimizer step over
``train.accumulate`` micro-batches), ``state_for_checkpoint()``,
``save_sharded(dir)`` and ``load(...)``. Everything engine-specific (wrapping,
mixed precision, loss scaling, gradient accumulation, clipping, the LR
schedule, how optimizer state is saved) stays in this file.

Loss normalisation is the same for both engines and exact: each rank scales
its summed token loss by ``world / global_target_tokens`` (or ``world /
global_sentences`` with ``train.loss_norm: sentence``; one all-reduce of a
scalar per step), so after the engines average gradients over ranks the
update equals a single-process step on all ranks' micro-batches together,
however unevenly the tokens fall across ranks and micro-batches.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distnmt.checkpoint import DEEPSPEED_TAG, deepspeed_dir
from distnmt.config import Config, ConfigError
from distnmt.data.batch import Batch
from distnmt.data.tokenizer import PAD_ID
from distnmt.train.optim import build_optimizer
from distnmt.train.schedule import build_scheduler


@dataclass
class StepStats:
    """What one optimizer step reports (this rank's part of loss and tokens).

    The step's figures stay where they were computed: reading a CUDA tensor on the
    host waits for every kernel queued before it, so the engine reads none of them.
    ``*_t`` fields are tensors (on the training device, or on the CPU where the value
    was born on the host); accumulate them on the device and read them when logging.
    The plain-named properties read them on the host (a sync each on a GPU): for a
    log line, or for a caller that has not moved to the tensors yet.
    """

    loss_sum_t: torch.Tensor  # 0-d fp32: summed token loss of this rank's micro-batches
    tokens: int  # real target tokens of this rank (counted on the host at collate time)
    padded_tokens: int
    grad_norm_t: torch.Tensor  # 0-d: norm of the all-reduced gradients before clipping (NaN: not computed)
    lr: float
    loss_scale_t: torch.Tensor  # 0-d: the fp16 loss scale after this step (1 otherwise)
    # False when this rank saw a non-finite loss or gradient norm; the engine then
    # applied no update (fp16: the loss scaler skipped it; fp32/bf16: skipped here).
    finite_t: torch.Tensor  # 0-d bool

    @property
    def loss_sum(self) -> float:
        return float(self.loss_sum_t)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scale_t)

    @property
    def finite(self) -> bool:
        return bool(self.finite_t)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _host_to_device(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``device`` without a blocking copy.

    From pageable memory a CUDA copy waits for the stream; from pinned memory with
    ``non_blocking`` it is queued like a kernel.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def loss_count(batches: list[Batch], loss_norm: str = "token") -> int:
    """What this rank's summed token loss is divided by (summed over ranks): its target
    tokens (``train.loss_norm: token``, a per-token mean) or its sentences (``sentence``:
    the per-sentence sum of GroundHog / dl4mt, the scale of the paper's clipping and eps)."""
    if loss_norm == "sentence":
        return sum(b.src.size(0) for b in batches)
    return sum(b.num_target_tokens() for b in batches)


def loss_scale_factor(batches: list[Batch], device: torch.device, loss_norm: str = "token") -> torch.Tensor | float:
    """``world / global target tokens`` (or sentences, see :func:`loss_count`) of this
    step, over all ranks and micro-batches.

    One process: a host float (the counts are known on the host). Several: one
    all-reduce of a scalar on the device, divided there; nothing is read back.
    Both round like the float64 division ``world / tokens`` cast to fp32.
    """
    local = float(loss_count(batches, loss_norm))
    world = _world()
    if world == 1:
        return 1.0 / max(local, 1.0)
    total = _host_to_device([local], torch.float64, device)
    dist.all_reduce(total)
    return (world / total.clamp(min=1.0)).to(torch.float32).squeeze(0)


def global_tokens(batches: list[Batch], device: torch.device) -> float:
    """Target tokens of this step over all ranks and micro-batches (a host read: for tests and logs)."""
    total = torch.tensor([float(sum(b.num_target_tokens() for b in batches))], dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(total)
    return float(total.item())


def token_loss_sum(logits: torch.Tensor, batch: Batch, label_smoothing: float) -> torch.Tensor:
    """Summed cross-entropy over real target tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch.tgt_out.flatten(),
        ignore_index=PAD_ID, reduction="sum", label_smoothing=label_smoothing,
    )


class Engine(ABC):
    """One optimizer step at a time; knows how to checkpoint itself."""

    module: torch.nn.Module  # the bare model (for evaluation weights)
    # Test seam (DISTNMT_FAULT_NAN, set by the training loop): the next step's loss
    # is made NaN, as a diverging model's would be, to exercise the non-finite guard.
    poison_loss: bool = False

    @abstractmethod
    def train_step(self, batches: list[Batch]) -> StepStats: ...

    @abstractmethod
    def state_for_checkpoint(self) -> dict[str, Any]:
        """What rank 0 puts into state.pt (always including the full fp32 "model" weights).

        Every rank calls it: under DeepSpeed it gathers partitioned weights (a collective)."""

    def save_sharded(self, directory: Path) -> None:
        """Per-rank state written by every rank into its own copy of the checkpoint dir."""

    @abstractmethod
    def load(self, state: dict[str, Any], directory: Path) -> None:
        """Restore from rank 0's state.pt dict and the checkpoint directory."""


class DDPEngine(Engine):
    """torch DistributedDataParallel (gloo on CPU, NCCL on GPU) with autocast and GradScaler."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, wrap: Any) -> None:
        self.cfg = cfg
        self.device = device
        self.module = model
        # wrap = ray.train.torch.prepare_model: DDP when world > 1 (passed in so that
        # this file works without Ray, e.g. in single-process tests).
        self.model = wrap(model) if _world() > 1 else model
        # Fused Adam on CUDA: fewer kernels, and a skipped step needs no host read.
        self.optimizer = build_optimizer(model.parameters(), cfg.optim, fused=device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    def _autocast(self):
        if self.cfg.train.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self, batches: list[Batch]) -> StepStats:
        scale = loss_scale_factor(batches, self.device, self.cfg.train.loss_norm)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, batch in enumerate(batches):
            # Gradients are all-reduced once, on the last micro-batch only.
            last = i == len(batches) - 1
            sync = nullcontext() if last or self.model is self.module else self.model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.model(batch.src, batch.src_lengths, batch.tgt_in)
                loss_sum = token_loss_sum(logits, batch, self.cfg.optim.label_smoothing)
                if self.poison_loss:
                    loss_sum = loss_sum * math.nan
                self.scaler.scale(loss_sum * scale).backward()
            losses.append(loss_sum.detach())
        loss_total = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_norm if self.cfg.optim.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        lr = self.scheduler.get_last_lr()[0]
        # The gradient norm is of the all-reduced gradients, so every rank agrees on it
        # and takes the same decision (this rank's loss alone could make them differ).
        grads_finite = torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            # fp16: the scaler finds the overflow itself, skips the update and lowers
            # its scale (on the device for a fused optimizer; one read otherwise).
            self.scaler.step(self.optimizer)
        else:
            # fp32/bf16 have no scaler: a NaN update would ruin the weights for good,
            # so it is not applied at all.
            self._step_unless(grads_finite)
        self.scaler.update()
        self.scheduler.step()
        return StepStats(
            loss_sum_t=loss_total,
            tokens=sum(b.num_target_tokens() for b in batches),
            padded_tokens=sum(b.tgt_out.numel() for b in batches),
            grad_norm_t=grad_norm.detach(), lr=lr,
            loss_scale_t=self._loss_scale(),
            finite_t=grads_finite & torch.isfinite(loss_total),
        )

    def _loss_scale(self) -> torch.Tensor:
        """The scaler's scale as a tensor (``get_scale()`` would read it on the host).

        A copy: ``update()`` changes the scaler's tensor in place at the next step.
        """
        scale = self.scaler._get_scale_async() if self.scaler.is_enabled() else None
        return torch.ones(()) if scale is None else scale.detach().clone()

    def _step_unless(self, grads_finite: torch.Tensor) -> None:
        """The optimizer step, skipped when the gradients are not finite.

        A fused optimizer (``_step_supports_amp_scaling``: Adam/AdamW with fused=True,
        built so on CUDA) takes the decision on the device, through the same
        ``found_inf`` input GradScaler gives it: no host read. Any other (Adadelta,
        foreach Adam) needs the flag on the host: the one read of a step, after the
        backward and clipping have been queued.
        """
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]
            self.optimizer.found_inf = (~grads_finite).to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(grads_finite):
            self.optimizer.step()

    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, state: dict[str, Any], directory: Path) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


# YAML keys that DeepSpeed's JSON must not contradict: (json path, value from config).
def _owned_keys(cfg: Config, world: int) -> dict[tuple[str, ...], Any]:
    return {
        # Batches are token budgets made by our sampler: one "micro batch" per step
        # to DeepSpeed, accumulated train.accumulate times.
        ("train_micro_batch_size_per_gpu",): 1,
        ("gradient_accumulation_steps",): cfg.train.accumulate,
        ("train_batch_size",): cfg.train.accumulate * world,
        ("gradient_clipping",): cfg.optim.clip_norm,
        ("bf16", "enabled"): cfg.train.precision == "bf16",
        ("fp16", "enabled"): cfg.train.precision == "fp16",
    }


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The JSON named by train.deepspeed_config, completed from the YAML; contradictions are errors."""
    path = Path(cfg.train.deepspeed_config or "")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"train.deepspeed_config: cannot read {path} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage {stage!r}: DeepSpeed has stages 0, 1, 2 and 3")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'optimizer'/'scheduler'; distnmt passes torch ones built from optim.* in the YAML")
    for keys, value in _owned_keys(cfg, world).items():
        node: Any = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if keys[-1] in node and node[keys[-1]] != value:
            raise ConfigError(
                f"{path}: {'.'.join(keys)} is {node[keys[-1]]!r} but the YAML config implies {value!r} "
                "(set it through the YAML: train.precision, train.accumulate, optim.clip_norm) or remove it"
            )
        node[keys[-1]] = value
    return ds


# DeepSpeed's name for its shared-memory collective kernel (op_builder/cpu/comm.py).
SHM_COMM_OP = "deepspeed_shm_comm"


def import_deepspeed():
    """``deepspeed``, imported late (importing it probes accelerators and takes seconds),
    with its shared-memory collective kernel switched off before any engine exists.

    On a CPU accelerator DeepSpeed compiles that kernel with g++ the first time a process
    group starts (about 45 s on 2 cores, again for every new virtual environment) and uses
    it only in ``inference_all_reduce``; training's collectives go through
    torch.distributed (gloo here, NCCL on GPUs) either way. ``deepspeed.ops`` keeps its
    compatibility table as one module-level dict so that edits to it persist: marking the
    kernel incompatible makes ``build_shm_op`` return None without compiling.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return deepspeed


class DeepSpeedEngine(Engine):
    """deepspeed.initialize on Ray's process group; ZeRO 0-3, bf16 or fp16 from the JSON + YAML."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device,
                 universal: Optional[Path] = None) -> None:
        deepspeed = import_deepspeed()

        self.cfg = cfg
        self.device = device
        self.ds_config = deepspeed_config(cfg, _world())
        # A checkpoint from another world size, converted (train/reshard.py): DeepSpeed
        # must know at initialize() to re-partition it on load.
        self.universal = universal
        if universal is not None:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        optimizer = build_optimizer(model.parameters(), cfg.optim)  # a torch optimizer: no op compilation
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,  # Ray Train already made the process group
        )
        self.module = self.engine.module

    def train_step(self, batches: list[Batch]) -> StepStats:
        scale = loss_scale_factor(batches, self.device, self.cfg.train.loss_norm)
        losses = []
        for batch in batches:
            logits = self.engine(batch.src, batch.src_lengths, batch.tgt_in)
            loss_sum = token_loss_sum(logits, batch, self.cfg.optim.label_smoothing)
            if self.poison_loss:
                loss_sum = loss_sum * math.nan
            # Already normalised over all micro-batches: no further division by GAS.
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            losses.append(loss_sum.detach())
        loss_total = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        # DeepSpeed skips the update itself on overflow in fp16 (and in bf16 with
        # bf16.check_grad_overflow), reading its flags on the host as it decides; the
        # norm is None when ZeRO does not compute it, a float or a tensor otherwise.
        grad_norm = self.engine.get_global_grad_norm()
        norm_t = (grad_norm.detach().float().reshape(()) if isinstance(grad_norm, torch.Tensor)
                  else torch.tensor(math.nan if grad_norm is None else float(grad_norm)))
        scale_now = getattr(self.optimizer, "cur_scale", None) or getattr(self.optimizer, "loss_scale", 1.0)
        finite = torch.isfinite(loss_total)
        if grad_norm is not None:
            finite = finite & torch.isfinite(norm_t).to(finite.device)
        return StepStats(
            loss_sum_t=loss_total,
            tokens=sum(b.num_target_tokens() for b in batches),
            padded_tokens=sum(b.tgt_out.numel() for b in batches),
            grad_norm_t=norm_t,
            lr=float(self.engine.get_lr()[0]),
            loss_scale_t=torch.as_tensor(scale_now, dtype=torch.float32).detach().clone(),
            finite_t=finite,
        )

    def state_for_checkpoint(self) -> dict[str, Any]:
        """Every parameter whole and in fp32, for the evaluator and `translate`.

        A collective (every rank calls it, as Trainer.save does). ZeRO-3 holds a
        slice of each parameter per rank (the module's own tensors are empty), and
        with bf16 or fp16 the module holds low-precision copies while the optimizer
        updates fp32 master weights, partitioned under ZeRO-1/2/3: DeepSpeed's
        ``safe_get_full_fp32_param`` gathers a master weight over the ranks. Where
        there is no master copy (fp32 without ZeRO), the parameter is the weight.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) not in full:  # tied weights: gathered once
                master = safe_get_full_fp32_param(param)
                if master is None:
                    if hasattr(param, "ds_id"):
                        raise RuntimeError(f"ZeRO-3 parameter {name} has no fp32 master to gather")
                    master = param.detach()
                full[id(param)] = master.detach().float().cpu().clone()
            weights[name] = full[id(param)]
        for name, buffer in self.module.named_buffers():
            weights[name] = buffer.detach().cpu().clone()
        return {"model": weights}

    def save_sharded(self, directory: Path) -> None:
        # A collective: every rank writes its optimizer partition (ZeRO) into its
        # own copy of the directory; Ray merges the copies in storage.
        self.engine.save_checkpoint(str(deepspeed_dir(directory)), tag=DEEPSPEED_TAG)

    def load(self, state: dict[str, Any], directory: Path) -> None:
        source = self.universal if self.universal is not None else deepspeed_dir(directory)
        path, _ = self.engine.load_checkpoint(
            str(source), tag=DEEPSPEED_TAG,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"{source}: DeepSpeed found no checkpoint to load")


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage of train.deepspeed_config (0 for DDP)."""
    if cfg.train.backend != "deepspeed":
        return 0
    return int(deepspeed_config(cfg, 1).get("zero_optimization", {}).get("stage", 0))


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device, wrap: Optional[Any] = None,
                 universal: Optional[Path] = None) -> Engine:
    """The engine train.backend names; ``universal``: DeepSpeed state to load from another world size."""
    if cfg.train.backend == "deepspeed":
        return DeepSpeedEngine(cfg, model, device, universal)
    return DDPEngine(cfg, model, device, wrap or (lambda m: torch.nn.parallel.DistributedDataParallel(m)))
