"""The LeWM trainer: the published recipe, a memory plan from a VRAM budget, resumable runs.

``Trainer(dataset, out_dir, config).fit()`` (or :func:`train`) trains on the Two-Room
training windows of ``dataset`` (rendered on the device by default) and writes to
``out_dir``:

- ``metrics.jsonl``: one JSON object per line with a ``"kind"``:
  ``{"kind": "setup", "step", "epoch", "device", "memory_plan", "chunk_size",
  "predicted_peak_bytes", "compile", "sdpa_backend", "sdpa_reason"}`` when a run starts or
  resumes (``compile``: null, or the compiled step's backend, mode, pieces and whether it
  replays CUDA graphs; ``sdpa_backend``: the attention kernel of the encoder, see
  :func:`lewm_fast.backend.choose_sdpa`),
  ``{"kind": "train", "step", "epoch", "pred_loss", "sigreg_loss", "loss", "grad_norm"
  (pre-clip), "lr", "step_time", "samples_per_s", "peak_vram_bytes"}`` for every step,
  ``{"kind": "val", "step", "epoch", "pred_loss", "sigreg_loss", "loss"}`` each epoch (in
  eval mode, BatchNorm statistics recalibrated as ``TrainConfig.bn_recalibrate`` says),
  ``{"kind": "eval", "step", "epoch", "success_rate", ...}`` after each evaluation, and
  ``{"kind": "skip", "step", "epoch", "in_a_row"}`` for each step skipped as non-finite.
  ``step`` counts optimiser steps from 1 (the step a record describes), ``epoch`` is the
  0-based epoch. Step records are written at each flush (every ``log_every`` steps, the
  loop's only host synchronisation): ``step_time`` and ``samples_per_s`` are averages over
  the flush interval, ``peak_vram_bytes`` the allocator peak over it (null off CUDA).
- ``checkpoints/``: a checkpoint after every epoch, at ``max_steps``, and on SIGINT/SIGTERM
  (see :mod:`lewm_fast.train.state`); ``resume=True`` continues from the newest one.
- ``model/``: the final model in the release format; ``best_model/``: the model of the
  best evaluation when an evaluator is given (with the BatchNorm statistics it was
  evaluated with: recalibrated ones under ``TrainConfig.bn_recalibrate``).

Steps whose loss or gradient norm is not finite are skipped on the device (the fused AdamW
update is masked, BatchNorm running statistics are restored); ``max_nonfinite_steps`` of
them in a row abort the run (``NonFiniteLossError``) without writing a checkpoint, so the
newest checkpoint is the last good state. Under torchrun, every process trains on its
share of each global batch (see :mod:`lewm_fast.train.distributed`); rank 0 writes the
run folder (on one node, or a filesystem every node shares) and runs the evaluator while
the other ranks wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _checks
from .._io import write_text_atomic
from ..backend import SdpaChoice, choose_sdpa, sdpa_context
from ..checkpoint import save_pretrained
from ..data.windows import TrainingWindows, as_dataset
from ..reference.jepa import eval_mode
from ..sigreg import SIGReg
from . import distributed as _dist
from .batchnorm import recalibrated_batchnorm
from .compiled import CompiledStep, compile_backend, compile_step
from .config import RESUME_FREE_FIELDS, TrainConfig
from .memory import MemoryEstimate, cap_vram, choose_plan, format_size, free_vram, parse_size, uncap_vram
from .state import RunState, latest_checkpoint, load_checkpoint, save_checkpoint
from .step import EAGER, StepFunctions, _encode_frames, forward_backward, loss_head

__all__ = [
    "Trainer",
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "MetricsBuffer",
    "lr_factor",
    "METRICS_FILE",
]

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of 0-based ``step``: linear warm-up over ``warmup`` steps
    ((step + 1) / warmup), then a cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    """How a run ended: ``status`` is "completed", "early_stopped", "max_steps" or "interrupted"."""

    status: str
    step: int
    epoch: int
    out_dir: Path
    checkpoint: Path | None
    memory: MemoryEstimate
    best_success_rate: float | None = None
    signal: int | None = None


class MetricsBuffer:
    """Per-step values held as they come, device tensors unsynchronised, until a flush.

    ``add(**values)`` appends one row of 0-d tensors (left on their device, unread) and
    plain Python values. ``flush()`` reads every tensor of every row with one
    device-to-host copy, returns ``(rows, seconds)`` with those tensors as Python floats and
    ``seconds`` the mean wall time per row since the previous non-empty flush (or since the
    buffer was made), and empties the buffer. An empty buffer returns ``([], 0.0)`` and
    leaves the clock running.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._since = time.perf_counter()

    def add(self, **values: Any) -> None:
        """Append one row, e.g. ``add(step=3, loss=loss_tensor)``."""
        self._rows.append(values)

    def flush(self) -> tuple[list[dict[str, Any]], float]:
        """The rows since the last flush with their tensors read, and seconds per row."""
        if not self._rows:
            return [], 0.0
        rows, self._rows = self._rows, []
        slots = [(row, key) for row in rows for key, value in row.items() if torch.is_tensor(value)]
        if slots:
            numbers = torch.stack([row[key].reshape(()) for row, key in slots]).tolist()  # the host sync
            for (row, key), number in zip(slots, numbers):
                row[key] = number
        now = time.perf_counter()
        seconds = (now - self._since) / len(rows)
        self._since = now
        return rows, seconds


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Train a LeWM model on a Two-Room dataset.

    Args:
        dataset: a dataset folder, ``TwoRoomDataset`` or ``TrainingWindows`` (whose
            dataset is used; windows are rebuilt on ``device``).
        out_dir: run folder for metrics, checkpoints and the final model.
        config: a :class:`TrainConfig` (default: the published recipe, 10 epochs).
        device: "auto" (CUDA if available), "cpu", "cuda[:N]"; under torchrun with CUDA
            each process uses ``cuda:LOCAL_RANK``.
        evaluator: optional ``evaluator(model) -> {"success_rate": float, ...}``, called in
            eval mode every ``config.eval_every_epochs`` epochs (on rank 0), after the
            validation and with the same BatchNorm statistics (recalibrated when
            ``config.bn_recalibrate`` > 0); drives early stopping and ``best_model/``. The
            model comes back with the modes and ``requires_grad`` flags it had (and, under
            ``bn_recalibrate``, the head BatchNorm buffers).
        resume: continue from the newest checkpoint in ``out_dir`` (it must exist). Without
            it, ``out_dir`` must not hold checkpoints yet.

    Raises ValueError for a bad config or evaluator, or a run folder that does not match
    ``resume``. :meth:`fit` builds the rest, which stays readable after it returns:
    ``ctx`` (rank and world size), ``device``, ``windows`` (:class:`TrainingWindows`),
    ``model``, ``optimizer``, ``scheduler``, ``memory`` (the :class:`MemoryEstimate` in use),
    ``step_functions`` (the step's pieces: :data:`~lewm_fast.train.step.EAGER` or a
    :class:`~lewm_fast.train.compiled.CompiledStep`), ``sdpa`` (the encoder's attention
    backend, a :class:`~lewm_fast.backend.SdpaChoice`), ``run_state`` (the :class:`RunState`:
    step, epoch, best evaluation, ...).
    """

    def __init__(
        self,
        dataset,
        out_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        device: str | torch.device = "auto",
        evaluator: Callable[[nn.Module], dict] | None = None,
        resume: bool = False,
    ):
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if evaluator is not None and not callable(evaluator):
            raise ValueError("evaluator must be a callable evaluator(model) -> dict with 'success_rate'")
        self.dataset = as_dataset(dataset)
        self.out_dir = Path(out_dir)
        self.evaluator = evaluator
        self.resume = bool(resume)
        self.device = _checks.resolve_device(device)
        if self.resume and latest_checkpoint(self.out_dir) is None:
            raise ValueError(f"resume=True but {self.out_dir} holds no checkpoint to resume from")
        if not self.resume and latest_checkpoint(self.out_dir) is not None:
            raise ValueError(
                f"{self.out_dir} already holds a training checkpoint; resume it (--resume) or choose "
                "another output folder"
            )
        self._stop_signal: int | None = None
        self._capped = False
        self._owns_group = False
        # Built by fit() (they need the process group and this process's device); see _setup.
        self.ctx: _dist.DistContext | None = None
        self.local_batch = 0
        self.windows: TrainingWindows | None = None
        self.steps_per_epoch = 0
        self.total_steps = 0
        self.warmup_steps = 0
        self.model: nn.Module | None = None
        self.params: list[nn.Parameter] = []
        self.bn_buffers: list[torch.Tensor] = []
        self.sigreg: SIGReg | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.skip_on_device = False
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.memory: MemoryEstimate | None = None
        self.step_functions: StepFunctions = EAGER
        self.sdpa: SdpaChoice | None = None
        self.run_state = RunState()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Join the process group; build windows, model, optimizer, memory plan and step
        (compiled or not, attention backend); load the checkpoint (resume) or seed the
        random streams; start metrics.jsonl with a setup record."""
        cfg = self.config
        self.ctx, self.device, self._owns_group = _dist.init_from_env(self.device)
        if cfg.batch_size % self.ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                f"{self.ctx.world_size}"
            )
        self.local_batch = cfg.batch_size // self.ctx.world_size
        self._build_windows()
        self._build_model()
        self._build_optimizer()
        self.memory = self._plan_memory()
        self._build_step()
        self.run_state = RunState()
        if self.resume:
            self._load()
        else:
            torch.manual_seed(cfg.seed + self.ctx.rank)  # dropout and SIGReg draws; rank 0's A is broadcast
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._prepare_metrics()
            self._log([self._setup_record()])

    def _build_windows(self) -> None:
        cfg = self.config
        self.windows = TrainingWindows(
            self.dataset,
            source=cfg.data_source,
            device=self.device,
            image_size=cfg.model.encoder.image_size,
            num_frames=cfg.model.predictor.num_frames + 1,
        )
        per_epoch = len(self.windows.train_ids) // cfg.batch_size
        if per_epoch == 0:
            raise ValueError(
                f"the training split has {len(self.windows.train_ids)} windows, fewer than one batch of "
                f"{cfg.batch_size}; use a larger dataset or a smaller batch_size"
            )
        self.steps_per_epoch = min(per_epoch, cfg.epoch_steps or per_epoch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_fraction * self.total_steps)

    def _build_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = cfg.model.build(backend=cfg.backend).to(self.device)
        if self.ctx.active:
            _dist.convert_batchnorm(model)
            _dist.broadcast_module(model)
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bn_buffers = [b for m in model.modules() if isinstance(m, nn.BatchNorm1d) for b in m.buffers()]
        self.sigreg = SIGReg(cfg.sigreg_knots, cfg.sigreg_num_proj, backend=cfg.backend).to(self.device)

    def _build_optimizer(self) -> None:
        cfg = self.config
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        try:  # the fused update takes a device-side "skip" flag: no host sync per step
            self.optimizer = torch.optim.AdamW(self.params, fused=True, **kwargs)
            self.skip_on_device = True
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.AdamW(self.params, **kwargs)
            self.skip_on_device = False
        total, warmup, ratio = self.total_steps, self.warmup_steps, cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, ratio)
        )

    def _plan_memory(self) -> MemoryEstimate:
        cfg = self.config
        explicit = cfg.vram_budget not in (None, "auto")
        budget = parse_size(cfg.vram_budget) if explicit else free_vram(self.device)
        estimate = choose_plan(
            cfg.model,
            self.local_batch,
            budget,
            plan=cfg.memory_plan,
            chunk_size=cfg.chunk_size,
            precision=cfg.precision,
        )
        if explicit and cfg.enforce_vram_budget:
            self._capped = cap_vram(self.device, budget)
        if self.ctx.is_main:
            where = (
                f"VRAM budget {format_size(budget)}" + (" (free memory)" if not explicit else "")
                if budget is not None
                else f"no VRAM budget on {self.device.type}"
            )
            print(f"[lewm-fast train] {where}; {estimate.describe()}", flush=True)
            if budget is not None and estimate.peak_bytes > budget:
                warnings.warn(
                    f"memory plan {estimate.plan} is predicted to need {format_size(estimate.peak_bytes)}, "
                    f"more than the budget {format_size(budget)}",
                    stacklevel=3,
                )
        return estimate

    def _build_step(self) -> None:
        """The encoder's attention backend for this device and precision, and the step's
        pieces: compiled for the memory plan when ``TrainConfig.compile`` asks."""
        cfg = self.config
        vit = cfg.model.encoder.vit_config()
        heads = vit.num_attention_heads
        dtype = cfg.autocast_dtype or next(self.model.parameters()).dtype
        self.sdpa = choose_sdpa(self.device, dtype, (heads, 1 + vit.num_patches, vit.hidden_size // heads))
        backend = compile_backend(cfg.compile)
        if backend is not None:
            self.step_functions = compile_step(self.memory.plan, self.device, backend)
        if self.ctx.is_main:
            compiled = "eager"
            if isinstance(self.step_functions, CompiledStep):
                c = self.step_functions
                graphs = ", CUDA graphs" if c.cudagraphs else ""
                compiled = f"torch.compile {c.backend} ({'+'.join(c.pieces)}{graphs})"
            sdpa = f"{self.sdpa.backend} ({self.sdpa.reason})"
            print(f"[lewm-fast train] step: {compiled}; encoder attention: {sdpa}", flush=True)

    def _setup_record(self) -> dict[str, Any]:
        """The metrics.jsonl record of how this run (or resumption) computes its steps."""
        fns = self.step_functions
        return {
            "kind": "setup",
            "step": self.run_state.step,
            "epoch": self.run_state.epoch,
            "device": str(self.device),
            "memory_plan": self.memory.plan,
            "chunk_size": self.memory.chunk_size,
            "predicted_peak_bytes": self.memory.peak_bytes,
            "compile": fns.describe() if isinstance(fns, CompiledStep) else None,
            **self.sdpa.to_dict(),
        }

    # ------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        rng = _rng_state(self.device)
        if self.ctx.active:
            states: list = [None] * self.ctx.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            **self.run_state.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": states,
            "world_size": self.ctx.world_size,
            "device_type": self.device.type,
        }

    def _save(self) -> Path | None:
        state = self._trainer_state()  # collective under torchrun: every rank calls it
        folder = None
        if self.ctx.is_main:
            folder = save_checkpoint(
                self.out_dir,
                self.run_state.step,
                self.model,
                self.config.model,
                state,
                self.config.to_dict(),
                keep=self.config.keep_checkpoints,
            )
        if self.ctx.active:
            dist.barrier()
        return folder or latest_checkpoint(self.out_dir)

    def _load(self) -> None:
        folder = latest_checkpoint(self.out_dir)
        state, saved = load_checkpoint(folder, self.model)
        current = self.config.to_dict()
        changed = sorted(k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k])
        if changed:
            raise ValueError(
                f"cannot resume {folder}: the run was configured differently in {changed} "
                f"(only {list(RESUME_FREE_FIELDS)} may change on resume)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.run_state = RunState.from_dict(state)
        step, states = self.run_state.step, state["rng"]
        if len(states) == self.ctx.world_size and state["device_type"] == self.device.type:
            _set_rng_state(states[self.ctx.rank], self.device)
        else:
            warnings.warn(
                f"resuming a run saved with {len(states)} process(es) on {state['device_type']} with "
                f"{self.ctx.world_size} on {self.device.type}: random streams are reseeded, so the "
                "continuation is not bit-identical",
                stacklevel=3,
            )
            torch.manual_seed(self.config.seed + self.ctx.rank + step)
        if self.ctx.is_main:
            epoch = self.run_state.epoch
            print(f"[lewm-fast train] resumed {folder} at step {step} (epoch {epoch})", flush=True)

    # ----------------------------------------------------------------- metrics
    def _prepare_metrics(self) -> None:
        """Start metrics.jsonl, or on resume drop records past the checkpoint's step."""
        path = self.out_dir / METRICS_FILE
        if not self.resume:
            path.write_text("")
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash
                if record.get("step", 0) <= self.run_state.step:
                    kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _log(self, records: list[dict]) -> None:
        if not self.ctx.is_main or not records:
            return
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=True) + "\n")

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))  # a second signal acts at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    def _stop_requested(self) -> bool:
        """Whether any process got SIGINT/SIGTERM (a collective under torchrun)."""
        flag = self._stop_signal or 0
        if self.ctx.active:
            t = torch.tensor([flag], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
            self._stop_signal = flag or None
        return bool(flag)

    # ------------------------------------------------------------------ data
    def _epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of the rest of the current epoch's batches (seeded by epoch)."""
        run = self.run_state
        return self.windows.batches(
            "train",
            self.config.batch_size,
            seed=self.config.seed + run.epoch,
            start=run.step_in_epoch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    # ------------------------------------------------------------------ steps
    def _train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its losses, pre-clip gradient norm and ``skipped``
        (1.0 when non-finite, update skipped) as 0-d device tensors, unsynchronised."""
        cfg = self.config
        saved = [b.clone() for b in self.bn_buffers]
        losses = forward_backward(
            self.model,
            self.sigreg,
            batch,
            self.memory.plan,
            self.memory.chunk_size,
            cfg.sigreg_weight,
            autocast_dtype=cfg.autocast_dtype,
            world_size=self.ctx.world_size,
            functions=self.step_functions,
            sdpa_backend=self.sdpa.backend,
        )
        pred_loss, sigreg_loss = losses["pred_loss"], losses["sigreg_loss"]
        if self.ctx.active:
            pred_loss = _dist.all_reduce_gradients(
                self.params, extra=pred_loss.reshape(1) / self.ctx.world_size
            )[0]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        loss = pred_loss + cfg.sigreg_weight * sigreg_loss
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.skip_on_device:
            self.optimizer.found_inf = bad.float()  # the fused AdamW skips its update when set
            self.optimizer.step()
        elif not bool(bad):  # host check: only without the fused optimizer
            self.optimizer.step()
        with torch.no_grad():
            for buffer, old in zip(self.bn_buffers, saved):
                buffer.copy_(torch.where(bad, old, buffer))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "pred_loss": pred_loss,
            "sigreg_loss": sigreg_loss,
            "loss": loss,
            "grad_norm": grad_norm.float(),
            "skipped": bad.float(),
        }

    @torch.no_grad()
    def _validate(self) -> dict | None:
        cfg = self.config
        ids = self.windows.val_ids
        w = self.ctx.world_size
        global_batch = min(cfg.batch_size, ids.shape[0] // w * w)
        if global_batch == 0:
            return None
        n = ids.shape[0] // global_batch
        if cfg.val_max_batches:
            n = min(n, cfg.val_max_batches)
        batches = self.windows.batches("val", global_batch, shuffle=False, rank=self.ctx.rank, world_size=w)
        devices = [self.device] if self.device.type == "cuda" else []
        enabled = cfg.autocast_dtype is not None
        sums = torch.zeros(2, device=self.device)
        with eval_mode(self.model), torch.random.fork_rng(devices=devices), sdpa_context(self.sdpa.backend):
            torch.manual_seed(cfg.seed)  # the same SIGReg directions at every validation
            for batch in itertools.islice(batches, n):
                pixels = batch["pixels"]
                b, t = pixels.shape[:2]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled):
                    cls = _encode_frames(self.model.encoder, pixels.float().flatten(0, 1))
                    emb = self.model.projector(cls).view(b, t, -1)
                    losses = loss_head(
                        self.model, emb, batch["action"], sigreg=self.sigreg, lambd=cfg.sigreg_weight
                    )
                # pred_loss is this rank's mean, SIGReg already the global batch's value
                sums += torch.stack([losses["pred_loss"].float(), losses["sigreg_loss"].float()]) / w
        if self.ctx.active:
            dist.all_reduce(sums)
        pred, sig = (sums / n).tolist()
        return {"pred_loss": pred, "sigreg_loss": sig, "loss": pred + cfg.sigreg_weight * sig}

    def _evaluate(self) -> dict | None:
        """Run the evaluator on rank 0; returns its numbers and whether to stop early."""
        result = None
        if self.ctx.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            # the model goes in in eval mode and comes out exactly as it went in, whatever the
            # evaluator changed about modes or requires_grad flags
            with eval_mode(self.model), torch.random.fork_rng(devices=devices):
                result = self.evaluator(self.model)
            if not isinstance(result, dict) or "success_rate" not in result:
                raise ValueError(
                    "evaluator must return a dict with 'success_rate', "
                    f"got {type(result).__name__}: {result!r}"
                )
            result = {
                k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        if self.ctx.active:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result

    # --------------------------------------------------------------------- run
    def fit(self) -> TrainResult:
        """Train until the epochs are done, early stopping, ``max_steps`` or a signal.

        Returns a :class:`TrainResult`. Raises NonFiniteLossError after
        ``max_nonfinite_steps`` non-finite steps in a row, ValueError for a training split
        smaller than one batch, a batch the processes cannot share evenly, or a checkpoint
        (resume) configured differently.
        """
        try:
            self._setup()
            return self._fit()
        finally:
            if self._capped:  # the allocator cap of an explicit budget lasts for the run only
                uncap_vram(self.device)
                self._capped = False
            if self._owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, run = self.config, self.run_state
        stop_at = min(self.total_steps, cfg.max_steps or self.total_steps)
        bar = tqdm(
            total=stop_at,
            initial=run.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (cfg.progress and self.ctx.is_main),
        )
        previous = self._install_signal_handlers()
        try:
            status = self._run_steps(stop_at, bar)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        checkpoint = self._save()
        if status == "interrupted" and self.ctx.is_main:
            name = signal.Signals(self._stop_signal).name
            print(
                f"[lewm-fast train] {name}: stopped at step {run.step}; checkpoint {checkpoint}; "
                "continue with --resume",
                file=sys.stderr,
                flush=True,
            )
        if status in ("completed", "early_stopped") and self.ctx.is_main:
            save_pretrained(self.model, self.out_dir / "model", config=cfg.model)
        return TrainResult(
            status,
            run.step,
            run.epoch,
            self.out_dir,
            checkpoint,
            self.memory,
            run.best_success,
            self._stop_signal,
        )

    def _run_steps(self, stop_at: int, bar) -> str:
        """Take steps until step ``stop_at``, early stopping or a signal; returns the status."""
        cfg, run = self.config, self.run_state
        metrics = MetricsBuffer()
        batches = self._epoch_batches()
        stop = False
        while True:
            if run.step_in_epoch == self.steps_per_epoch:
                if self._end_epoch():
                    return "early_stopped"
                batches = self._epoch_batches()
            if stop or run.step >= stop_at:
                break
            lr = self.optimizer.param_groups[0]["lr"]
            values = self._train_step(next(batches))
            run.advance()
            metrics.add(step=run.step, epoch=run.epoch, **values, lr=lr)
            bar.update(1)
            if (
                run.step % cfg.log_every == 0
                or run.step_in_epoch == self.steps_per_epoch
                or run.step == stop_at
            ):
                self._flush(metrics, bar)
                if self.ctx.active:  # agree on a signal at the same step on every rank
                    stop = self._stop_requested()
            if not self.ctx.active and self._stop_signal:
                self._flush(metrics, bar)
                stop = True
        if self._stop_signal:
            return "interrupted"
        return "max_steps" if run.step < self.total_steps else "completed"

    def _flush(self, metrics: MetricsBuffer, bar) -> None:
        """Write the buffered steps' records (the loop's only host sync) and count non-finite
        steps; ``max_nonfinite_steps`` in a row raise NonFiniteLossError."""
        cfg, run = self.config, self.run_state
        rows, step_time = metrics.flush()
        if not rows:
            return
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        timing = {
            "step_time": step_time,
            "samples_per_s": cfg.batch_size / step_time,
            "peak_vram_bytes": peak,
        }
        records = []
        for row in rows:
            skipped = row.pop("skipped")
            records.append({"kind": "train", **row, **timing})
            run.record_step(bool(skipped))
            if not skipped:
                continue
            records.append(
                {
                    "kind": "skip",
                    "step": row["step"],
                    "epoch": row["epoch"],
                    "in_a_row": run.nonfinite_in_a_row,
                }
            )
            if self.ctx.is_main:
                warnings.warn(
                    f"step {row['step']}: non-finite loss or gradient norm (loss {row['loss']}, grad norm "
                    f"{row['grad_norm']}); update skipped ({run.nonfinite_in_a_row} in a row, abort at "
                    f"{cfg.max_nonfinite_steps})",
                    stacklevel=2,
                )
        self._log(records)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}", refresh=False)
        if run.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{run.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (last: "
                f"step {rows[-1]['step']}); aborting. The newest checkpoint in {self.out_dir} is "
                "the last good state"
            )

    def _end_epoch(self) -> bool:
        """Validation, evaluation and the epoch checkpoint; True when early stopping triggers."""
        cfg, run = self.config, self.run_state
        stop = False
        with self._recalibrated_batchnorm():
            val = self._validate()
            if val is not None:
                self._log([{"kind": "val", "step": run.step, "epoch": run.epoch, **val}])
            if self.evaluator is not None and (run.epoch + 1) % cfg.eval_every_epochs == 0:
                result = self._evaluate()
                self._log([{"kind": "eval", "step": run.step, "epoch": run.epoch, **result}])
                if run.record_eval(float(result["success_rate"]), cfg.early_stop_min_delta):
                    if self.ctx.is_main:  # with the BatchNorm statistics it was evaluated with
                        save_pretrained(self.model, self.out_dir / "best_model", config=cfg.model)
                else:
                    patience = cfg.early_stop_patience
                    stop = patience is not None and run.evals_since_best >= patience
        run.next_epoch()
        self._save()
        return stop

    def _recalibrated_batchnorm(self):
        """The context of an epoch's validation and evaluation: the head BatchNorm statistics
        recomputed on the first ``bn_recalibrate`` batches of the epoch's shuffle (this
        process's share) and put back afterwards; a no-op context when it is 0."""
        cfg, run = self.config, self.run_state
        if cfg.bn_recalibrate == 0:
            return contextlib.nullcontext()
        batches = self.windows.batches(
            "train",
            cfg.batch_size,
            seed=cfg.seed + run.epoch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        return recalibrated_batchnorm(
            self.model,
            itertools.islice(batches, cfg.bn_recalibrate),
            autocast_dtype=cfg.autocast_dtype,
            sdpa_backend=self.sdpa.backend,
        )


def train(
    dataset,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    evaluator: Callable[[nn.Module], dict] | None = None,
    resume: bool = False,
    **overrides,
) -> TrainResult:
    """Train LeWM: ``Trainer(dataset, out_dir, config.override(overrides), ...).fit()``.

    ``overrides`` are TrainConfig fields, e.g. ``train("data/two_room", "runs/a", epochs=2)``.
    """
    config = config or TrainConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return Trainer(dataset, out_dir, config, device=device, evaluator=evaluator, resume=resume).fit()
