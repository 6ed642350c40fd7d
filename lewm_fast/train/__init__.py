"""Training LeWM: one step under any memory plan, memory plans from a VRAM budget, the trainer.

- :func:`forward_backward` — the training loss's forward and backward on a window batch
  under a memory plan ("whole", "checkpoint", "two_pass"), exact to the whole-batch step;
  :func:`compile_step` — the same step's pieces under ``torch.compile`` (``TrainConfig.compile``);
  :func:`loss_head` — the loss formula on embeddings, shared by validation and probes.
- :func:`choose_plan` / :func:`estimate_peak` — the plan for a VRAM budget from a
  documented peak-memory model.
- :class:`Trainer` / :func:`train` with :class:`TrainConfig` — the published recipe,
  JSONL metrics, atomic resumable checkpoints, non-finite step skipping, torchrun;
  :class:`RunState` — where a run stands (step, epoch, ...), saved whole in checkpoints;
  :class:`MetricsBuffer` — per-step device values read with one host sync per flush;
  :func:`recalibrated_batchnorm` — the heads' BatchNorm statistics recomputed for an
  evaluation and put back (``TrainConfig.bn_recalibrate``).

Importing this package never touches a GPU.
"""

from .batchnorm import head_batchnorms, recalibrate_batchnorm, recalibrated_batchnorm
from .compiled import COMPILE_BACKENDS, CompiledStep, compile_step
from .config import TRAIN_PRESETS, TrainConfig
from .distributed import GlobalBatchNorm1d, all_reduce_gradients, convert_batchnorm
from .memory import MemoryEstimate, choose_plan, estimate_peak, free_vram, parse_size
from .state import RunState, latest_checkpoint, load_checkpoint, save_checkpoint
from .step import EAGER, PLANS, StepFunctions, default_chunk_size, forward_backward, loss_head
from .trainer import METRICS_FILE, MetricsBuffer, NonFiniteLossError, Trainer, TrainResult, lr_factor, train

__all__ = [
    "forward_backward",
    "loss_head",
    "PLANS",
    "default_chunk_size",
    "StepFunctions",
    "EAGER",
    "compile_step",
    "CompiledStep",
    "COMPILE_BACKENDS",
    "choose_plan",
    "estimate_peak",
    "MemoryEstimate",
    "free_vram",
    "parse_size",
    "TrainConfig",
    "TRAIN_PRESETS",
    "Trainer",
    "TrainResult",
    "train",
    "lr_factor",
    "NonFiniteLossError",
    "METRICS_FILE",
    "MetricsBuffer",
    "RunState",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "GlobalBatchNorm1d",
    "convert_batchnorm",
    "all_reduce_gradients",
    "head_batchnorms",
    "recalibrate_batchnorm",
    "recalibrated_batchnorm",
]
