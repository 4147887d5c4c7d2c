"""The trainer: darknet's schedule and SGD, gradient accumulation over subdivisions, AMP, EMA,
atomic resumable checkpoints, a NaN guard, evaluation, a metrics CSV per evaluation and one per
iteration, and the run folder's pictures (charts, labels, the first batch, a confusion matrix).
Heads stay opaque: the trainer only calls `model(x, targets) -> (loss, parts)` and `model(x)`
for evaluation."""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..boxes import MAX_NMS, postprocess
from ..data.augment import DarknetAugment
from ..data.dataset import DetectionDataset, ResumableSampler, Sample, collate
from ..data.ssd_augment import SSDAugment
from ..errors import DetkitError
from ..layers.conv import convert_sync_batchnorm
from ..memory import check_fits
from ..model import Model, model_from_cfg
from ..weights import load_darknet_weights, load_darknet_weights_transfer, save_darknet_weights
from .checkpoint import load_checkpoint, load_checkpoint_into, save_checkpoint
from .evaluate import ImageDetections, ImageTruth, evaluate_voc
from .letterbox import default_letterbox, has_ssd_head
from .plots import (
    plot_batch,
    plot_confusion_matrix,
    plot_labels,
    plot_pr_curves,
    plot_results,
    plot_training,
)
from .schedule import Schedule, parameter_groups
from .slicing import check_tiling, predict_sliced
from .tta import predict_views

log = logging.getLogger("detkit")


@dataclass(frozen=True)
class EvaluationReport:
    """What one evaluation during training found, handed to `TrainOptions.on_evaluate` (the CLI
    prints `line()`): the library itself never prints."""

    iteration: int
    max_batches: int
    map50: float
    best_map: float
    loss: float  # mean training loss since the previous evaluation

    def line(self) -> str:
        return (f"iteration {self.iteration}/{self.max_batches}: mAP@0.5 {self.map50:.3f} "
                f"(best {self.best_map:.3f}) loss {self.loss:.3g}")


@dataclass
class TrainOptions:
    cfg: Path
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    out: Path = Path("runs/train/exp")
    weights: Path | None = None
    cutoff: int | None = None
    freeze: int | None = None           # layers 0..N-1 not trained (None: the cfg's stopbackward)
    resume: bool = False
    device: str = "cpu"
    max_batches: int | None = None      # overrides [net]
    batch: int | None = None
    subdivisions: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None        # sgd | adam | adamw; None: adam when [net] adam=1, else sgd
    burn_in: int | None = None
    eval_interval: int = 100            # iterations between evaluations (0: only at the end)
    eval_tile: int | None = None        # evaluate in windows of this size (engine.slicing)
    checkpoint_interval: int = 50
    workers: int = 2
    amp: str = "none"                   # none | fp16 | bf16 (CUDA)
    ema: float = 0.0                    # decay, 0 disables
    ema_warmup: float = 2000.0          # iterations: the decay ramps as 1 - exp(-iteration / this)
    multiscale: bool | None = None      # None: the last head's random=1
    augment: bool = True
    seed: int = 0
    max_nan_steps: int = 10
    quiet: bool = False
    names: list[str] = field(default_factory=list)  # class names, for the plots
    sync_bn: bool = False               # SyncBatchNorm across processes (CUDA)
    exist_ok: bool = False              # a fresh run may replace the run already in `out`
    data: str | None = None             # where train/val came from, recorded for --resume
    val_data: str | None = None
    on_evaluate: Callable[[EvaluationReport], None] | None = None  # called after each evaluation


@dataclass
class TrainResult:
    iterations: int
    best_map: float
    last_map: float
    history: list[dict]


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(hyper: dict, groups: list[dict], learning_rate: float) -> torch.optim.Optimizer:
    """SGD with momentum as darknet trains by default; Adam for [net] adam=1 (darknet's B1, B2,
    eps; decay added to the gradient as darknet's adam_update does, but only where parameter_groups
    puts it); AdamW (decoupled decay) for users who fine-tune that way elsewhere."""
    kind = hyper["optimizer"]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=hyper["momentum"])
    if kind == "adam":
        return torch.optim.Adam(groups, lr=learning_rate, betas=hyper["betas"], eps=hyper["eps"])
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=hyper["betas"], eps=hyper["eps"])
    raise DetkitError(f"optimizer {kind!r} is not one of {', '.join(OPTIMIZERS)}")


def optimizer_kind_of(state: dict) -> str:
    """sgd, adam or adamw from a saved optimizer state_dict: checkpoints written before
    `optimizer_kind` was recorded."""
    group = state["param_groups"][0]
    if "betas" not in group:
        return "sgd"
    return "adamw" if group.get("decoupled_weight_decay") else "adam"


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a single process. NCCL for
    CUDA devices, gloo otherwise (a CPU run on a CUDA machine too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def process_device(device: str) -> torch.device:
    """Plain 'cuda' becomes this process's GPU: LOCAL_RANK under torchrun, else the current one."""
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is None:
            local = os.environ.get("LOCAL_RANK")
            chosen = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        torch.cuda.set_device(chosen)
    return chosen


RUN_FILES = ("last.pt", "best.pt", "last.weights", "metrics.csv")


def check_run_folder(out: Path, resume: bool, exist_ok: bool) -> None:
    """Refuse, before any work, a run folder that is a file, or one that already holds a run
    when this one is fresh: its checkpoints would be replaced and metrics.csv appended to."""
    if out.exists() and not out.is_dir():
        raise DetkitError(f"--out {out} is a file, not a folder")
    if resume:
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not exist_ok:
        raise DetkitError(f"--out {out} already holds a run ({', '.join(held)}): continue it with "
                          f"--resume {out}, replace it with --exist-ok, or pick another folder")


def make_run_folder(out: Path, replace: bool) -> None:
    """Create `out`; with `replace` (--exist-ok) the old run's metrics.csv and iterations.csv
    go, so their rows are not mixed with the new run's."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if replace:
            for name in ("metrics.csv", "iterations.csv"):
                (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise DetkitError(f"--out {out}: cannot create the run folder ({exc.strerror or exc})"
                          ) from None
    if not os.access(out, os.W_OK):
        raise DetkitError(f"--out {out}: the folder is not writable")


class Trainer:
    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.device = process_device(options.device)
        self.rank, self.world = distributed_context(self.device)
        torch.manual_seed(options.seed)
        random.seed(options.seed)
        check_run_folder(options.out, options.resume, options.exist_ok)
        self.model = model_from_cfg(options.cfg)
        if not self.model.heads:
            raise DetkitError(f"{options.cfg}: has no detection layer to train")
        check_tiling(options.eval_tile, 0.25, "--eval-tile")  # not after a whole run
        if options.weights is not None and not options.resume:
            self._load_pretrained(options.weights, options.cutoff)
        if options.sync_bn:
            self._sync_batchnorm()
        saved = load_checkpoint(options.out / "last.pt", map_location="cpu") if options.resume else None
        self.frozen = self._freeze(saved)
        self.model.to(self.device)
        self.hyper = self._hyper()
        self.schedule = Schedule.from_net(self.model.net)
        self._apply_overrides()
        self._check_memory()
        self._keep_resumed_optimizer(saved)
        self.ema = copy.deepcopy(self.model).eval() if options.ema > 0 else None
        self.optimizer = make_optimizer(self.hyper, parameter_groups(self.model, self.hyper["decay"]),
                                        self.schedule.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=options.amp == "fp16" and self.device.type == "cuda")
        self.iteration, self.best_map, self.history = 0, -1.0, []
        self._minutes_before = 0.0  # training minutes of the runs this one resumes
        make_run_folder(options.out, replace=options.exist_ok and not options.resume)
        if saved is not None:
            self._resume(saved, options.out / "last.pt")
        self.train_model = self._wrap_ddp(self.model)
        self._batch_mean_loss = all(getattr(h, "loss_is_batch_mean", False) for h in self.model.heads)

    # -- set-up -----------------------------------------------------------------------------
    def _load_pretrained(self, weights: Path, cutoff: int | None) -> None:
        """Darknet .weights (optionally the first `cutoff` layers) or a detkit .pt."""
        if weights.suffix in (".pt", ".pth"):
            load_checkpoint_into(self.model, weights)
            return
        # Without a cutoff every layer is loaded; a file trained for another class count (COCO's
        # 80 into a 1-class cfg) is recognised by its length and only the convolutions sized by
        # the class count are re-initialised. --cutoff N loads layers 0..N-1 only.
        if cutoff is None:
            report = load_darknet_weights_transfer(self.model, weights)
            fresh = set(report.reinitialised)
        else:
            report = load_darknet_weights(self.model, weights, cutoff=cutoff)
            fresh = set(range(cutoff, len(self.model.layers)))
        primed = self.model.init_head_biases(fresh)
        log.info("pretrained: %d layers from %s; prior objectness on fresh head layers %s",
                 report.layers_loaded, weights, primed)

    def _sync_batchnorm(self) -> None:
        """Batch statistics over every process (torch's SyncBatchNorm runs on CUDA only)."""
        if self.world == 1:
            log.warning("--sync-bn: a single process has nothing to synchronise; ignored")
            return
        if self.device.type != "cuda":
            raise DetkitError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU")
        count = convert_sync_batchnorm(self.model)
        log.info("SyncBatchNorm: %d batch-norm layers synchronised over %d processes", count, self.world)

    def _freeze(self, saved: dict | None) -> int:
        """Layers 0..N-1 get no gradient; returns N (see `_frozen_count`).

        Fine-tuning a pretrained backbone on a few images, its early layers hold general features
        that a small data set can only overfit; they are also the costliest to back-propagate
        (the largest maps), so freezing them makes each iteration faster.
        """
        frozen = self._frozen_count(saved)
        for layer in self.model.layers[:frozen]:
            for param in layer.parameters():
                param.requires_grad_(False)
        if frozen:
            log.info("layers 0..%d frozen (not trained)", frozen - 1)
        return frozen

    def _frozen_count(self, saved: dict | None) -> int:
        """A resumed run keeps its count (`--freeze` may only repeat it); else `--freeze N`, else
        one past the last darknet `stopbackward=1` layer (the backward pass stops there)."""
        requested = self.options.freeze
        if saved is not None:
            recorded = int(saved.get("frozen_layers", 0))
            if requested is not None and requested != recorded:
                raise DetkitError(f"--freeze {requested} differs from the resumed run's {recorded}: "
                                  f"resume with the same value")
            return recorded
        if requested is None:
            stops = [section.index for section in self.model.sections
                     if section.index >= 0 and section.get_int("stopbackward", 0)]
            requested = max(stops) + 1 if stops else 0
        if not 0 <= requested < len(self.model.layers):
            raise DetkitError(f"--freeze {requested}: the network has {len(self.model.layers)} layers "
                              f"(0..{len(self.model.layers) - 1}); at least the last must train")
        return requested

    def _hyper(self) -> dict:
        net = self.model.net
        hyper = {
            "batch": net.get_int("batch", 1), "subdivisions": net.get_int("subdivisions", 1),
            "momentum": net.get_float("momentum", 0.9), "decay": net.get_float("decay", 0.0001),
            "jitter": getattr(self.model.heads[-1], "jitter", 0.2), "hue": net.get_float("hue", 0.0),
            "saturation": net.get_float("saturation", 1.0), "exposure": net.get_float("exposure", 1.0),
            "random": bool(getattr(self.model.heads[-1], "random", 0)),
            "flip": bool(net.get_int("flip", 1)), "rot90": bool(net.get_int("rot90", 0)),
            "random_scale": net.get_float("random_scale", 0.0), "mosaic": bool(net.get_int("mosaic", 0)),
            "optimizer": "adam" if net.get_int("adam", 0) else "sgd",
            "betas": (net.get_float("B1", 0.9), net.get_float("B2", 0.999)), "eps": net.get_float("eps", 1e-7),
        }
        if not 0.0 <= hyper["random_scale"] < 1.0:
            raise net.error(f"random_scale={hyper['random_scale']} must be in [0, 1)")
        return hyper

    def _apply_overrides(self) -> None:
        o = self.options
        for key in ("batch", "subdivisions"):
            if getattr(o, key) is not None:
                self.hyper[key] = getattr(o, key)
        if o.max_batches is not None:
            self.schedule.max_batches = o.max_batches
        if o.learning_rate is not None:
            self.schedule.learning_rate = o.learning_rate
        if o.burn_in is not None:
            self.schedule.burn_in = o.burn_in
        if o.optimizer is not None:
            self.hyper["optimizer"] = o.optimizer
        for key in ("batch", "subdivisions"):
            if self.hyper[key] < 1:
                raise DetkitError(f"{key}={self.hyper[key]} must be at least 1 (--{key} or [net] {key})")
        if self.hyper["batch"] % (self.hyper["subdivisions"] * self.world):
            raise DetkitError(f"batch={self.hyper['batch']} must divide by subdivisions="
                              f"{self.hyper['subdivisions']} x processes={self.world}")
        if self.schedule.max_batches <= 0:
            raise DetkitError("max_batches must be positive ([net] max_batches or --max-batches)")

    def _warn_if_all_warm_up(self) -> None:
        """A run no longer than burn_in never reaches its learning rate (darknet's warm-up ramps
        as (i / burn_in)^power), so a short trial run would silently learn next to nothing."""
        total, burn_in = self.schedule.max_batches, self.schedule.burn_in
        if self.rank != 0 or burn_in <= 0 or total > burn_in:
            return
        peak = self.schedule.rate(total - 1)
        log.warning("warning: max_batches %d <= burn_in %d: the whole run is warm-up at learning "
                    "rates below lr %g (at most %.2g); pass --burn-in N with N < %d",
                    total, burn_in, self.schedule.learning_rate, peak, total)

    def _check_memory(self) -> None:
        """One micro-batch's training activations at the largest input size this run uses."""
        micro = self.hyper["batch"] // self.hyper["subdivisions"] // self.world
        multiscale = self.options.multiscale if self.options.multiscale is not None else self.hyper["random"]
        size = (608, 608) if multiscale else self.model.input_size
        check_fits(self.model.activation_bytes(size, batch=micro, training=True), self.device,
                   f"training {Path(self.options.cfg).name} at {size[0]}x{size[1]}, micro-batch {micro}")

    def _keep_resumed_optimizer(self, saved: dict | None) -> None:
        """A resumed run keeps its optimiser (`--optimizer` may only repeat it): SGD's momentum
        buffers and Adam's moments mean nothing to each other, yet torch loads one's state into
        the other without a word, and the run would go on without its momentum."""
        if saved is None:
            return
        recorded = saved.get("optimizer_kind") or optimizer_kind_of(saved["optimizer"])
        requested = self.options.optimizer
        if requested is not None and requested != recorded:
            raise DetkitError(f"--optimizer {requested} differs from the resumed run's {recorded}: "
                              f"resume with the same optimizer (or without --optimizer)")
        self.hyper["optimizer"] = recorded

    def _wrap_ddp(self, model):
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": self.iteration,
                "seen": self.model.seen, "best_map": self.best_map,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "torch_rng": torch.get_rng_state(), "cfg": str(Path(self.options.cfg).resolve()),
                "data": self.options.data, "val_data": self.options.val_data,
                "frozen_layers": self.frozen, "optimizer_kind": self.hyper["optimizer"],
                "minutes": self._minutes()}

    def _minutes(self) -> float:
        """Training wall-clock minutes, earlier runs of a resumed training included, so that
        metrics.csv's time axis continues instead of restarting at 0 after --resume."""
        if not hasattr(self, "_started"):
            return self._minutes_before
        return self._minutes_before + (time.perf_counter() - self._started) / 60

    def save(self, name: str = "last.pt") -> bool:
        """Write a checkpoint unless the model went non-finite: a diverged run must never replace
        the last good checkpoint (it could not be resumed); whether it was written."""
        if self.rank != 0:
            return False
        if not self._finite():
            log.warning("warning: %s not written: the model holds NaN or infinite values at "
                        "iteration %d; the last finite checkpoint is kept", name, self.iteration)
            return False
        save_checkpoint(self.options.out / name, self._state())
        return True

    def _finite(self) -> bool:
        """Every float weight and statistic finite (batch norm's running stats go NaN in the
        forward pass of a diverging step, even when the update itself is skipped)."""
        models = [self.model] + ([self.ema] if self.ema is not None else [])
        checks = [torch.isfinite(t).all() for m in models for t in m.state_dict().values()
                  if t.is_floating_point()]
        return bool(torch.stack(checks).all()) if checks else True   # one host-device sync

    def _save_with_weights(self, checkpoint: str, weights: str) -> bool:
        """A .pt checkpoint and, when it was written, the same weights as darknet .weights (the
        EMA's when on, as load_checkpoint_into deploys from the .pt), both atomic."""
        if not self.save(checkpoint):
            return False
        save_darknet_weights(self.ema or self.model, self.options.out / weights, seen=self.model.seen)
        return True

    def _save_at_exit(self, failing: bool) -> None:
        """last.pt and last.weights when the loop ends; while another error is on its way out,
        a failing save (disk full again) is logged, not raised over it."""
        try:
            self._save_with_weights("last.pt", "last.weights")
        except DetkitError as exc:
            if not failing:
                raise
            log.debug("final save skipped: %s", exc)

    def _resume(self, state: dict, path: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.iteration, self.model.seen = int(state["iteration"]), int(state["seen"])
        self.best_map = float(state["best_map"])
        self._minutes_before = float(state.get("minutes", 0.0))
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # -- data -------------------------------------------------------------------------------
    def _augment_settings(self) -> DarknetAugment | SSDAugment | None:
        """SSD's augmentation (photometric, expand, min-IoU crop, flip, warp) for models with an
        SSD head, darknet's (jitter, HSV, flip, placement; the cfg's keys) for the others."""
        if not self.options.augment:
            return None
        if has_ssd_head(self.model):
            if self.hyper["mosaic"]:
                log.warning("mosaic=1 is ignored for SSD heads: they train with SSD's augmentation")
            return SSDAugment()
        return DarknetAugment(jitter=self.hyper["jitter"], hue=self.hyper["hue"],
                              saturation=self.hyper["saturation"], exposure=self.hyper["exposure"],
                              flip=self.hyper["flip"], rot90=self.hyper["rot90"],
                              random_scale=self.hyper["random_scale"], mosaic=self.hyper["mosaic"])

    def _loader(self):
        dataset = DetectionDataset(self.options.train, self.model.input_size, self._augment_settings(),
                                   seed=self.options.seed, max_boxes=getattr(self.model.heads[-1], "max_boxes", 200),
                                   letterbox=default_letterbox(self.model))
        micro = self.hyper["batch"] // self.hyper["subdivisions"] // self.world
        sampler = ResumableSampler(dataset, seed=self.options.seed,
                                   start=self.iteration * self.hyper["batch"], rank=self.rank, world=self.world)
        return torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collate,
                                           num_workers=self.options.workers,
                                           persistent_workers=self.options.workers > 0)

    def _scale_for(self, iteration: int) -> tuple[int, int]:
        """Darknet multi-scale: every 10 iterations a size in [320, 608] (step 32), 608 at the end."""
        random_sizes = self.options.multiscale if self.options.multiscale is not None else self.hyper["random"]
        if not random_sizes:
            return self.model.input_size
        if iteration >= self.schedule.max_batches - 200:
            return (608, 608)
        generator = torch.Generator().manual_seed(self.options.seed * 100003 + iteration // 10)
        dim = (int(torch.randint(0, 10, (1,), generator=generator)) + 10) * 32
        return (dim, dim)

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        self._warn_if_all_warm_up()   # here: a setting refused during setup stays one error line
        self._started = time.perf_counter()  # wall clock of this process (see _minutes)
        self._write_label_plot()
        loader = iter(self._loader())
        nan_steps = 0
        stop = {"now": False}
        previous = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        quiet = bool(self.options.quiet or self.rank)
        bar = tqdm(total=self.schedule.max_batches, initial=self.iteration,
                   disable=True if quiet else None,   # None: a bar on a terminal only
                   desc="train", unit="it")
        last_map = self.best_map
        failing = True
        try:
            while self.iteration < self.schedule.max_batches and not stop["now"]:
                started = time.perf_counter()
                loss, parts, finite = self._step(loader)
                nan_steps = 0 if finite else nan_steps + 1
                if nan_steps >= self.options.max_nan_steps:
                    raise DetkitError(f"loss was not finite for {nan_steps} iterations in a row "
                                      f"(iteration {self.iteration}): lower the learning rate or check the labels")
                self.iteration += 1
                rate = self.hyper["batch"] / (time.perf_counter() - started)
                self._log(bar, loss, parts, rate)
                if self.iteration % self.options.checkpoint_interval == 0:
                    self.save()
                if self.options.eval_interval and self.iteration % self.options.eval_interval == 0:
                    last_map = self._evaluate_and_keep_best()
            if not stop["now"] and (not self.options.eval_interval
                                    or self.iteration % self.options.eval_interval):
                last_map = self._evaluate_and_keep_best()
            failing = False
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            self._save_at_exit(failing)
        if stop["now"]:
            raise KeyboardInterrupt
        self._leave_process_group()
        return TrainResult(self.iteration, self.best_map, last_map, self.history)

    def _leave_process_group(self) -> None:
        """After a finished run, every process waits for rank 0 (its final evaluation and save)
        and then tears the process group down itself. Left to interpreter exit, a process that
        finished first destroys its gloo connections while rank 0 still holds them: under load
        that was seen to end a rank in SIGABRT (once, in a full test run on two busy cores)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _step(self, loader) -> tuple[float, dict, bool]:
        """One darknet iteration: `subdivisions` forward/backward passes, then one update."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.rate(self.iteration)
        self.model.train()
        size = self._scale_for(self.iteration)
        total, parts_sum = 0.0, {}
        # Darknet heads return a sum over images (divide by the batch); a head whose loss is
        # already a batch mean (SSD, as torchvision) is averaged over the micro-batches instead.
        divisor = self.hyper["subdivisions"] if self._batch_mean_loss else self.hyper["batch"] // self.world
        for micro in range(self.hyper["subdivisions"]):
            images, targets, _ = next(loader)
            if self.iteration == 0 and micro == 0:
                self._write_batch_plot(images, targets)
            x = images.to(self.device, non_blocking=True).float().div_(255)
            if (x.shape[3], x.shape[2]) != size:
                x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False)
            self.model.seen += self.hyper["batch"] // self.hyper["subdivisions"]  # darknet: before forward
            with self._autocast():
                loss, parts = self.train_model(x, targets.to(self.device))
            self.scaler.scale(loss / divisor).backward()
            total += float(loss.detach())
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + float(value.detach())
        finite = math.isfinite(total) and self._grads_finite()
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._update_ema()
        else:
            log.warning("iteration %d: loss or gradient not finite; update skipped", self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        per = self.hyper["subdivisions"] if self._batch_mean_loss else self.hyper["batch"]
        return total / per, {k: v / per for k, v in parts_sum.items()}, finite

    def _autocast(self):
        if self.options.amp == "none" or self.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        dtype = torch.bfloat16 if self.options.amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _grads_finite(self) -> bool:
        if self.scaler.is_enabled():
            return True  # the scaler skips steps with inf/NaN gradients itself
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # ultralytics' warm-up (2000 updates) keeps the average near the raw weights for a run of a
        # few hundred iterations; --ema-warmup shortens it for such runs
        decay = self.options.ema * (1 - math.exp(-self.iteration / max(self.options.ema_warmup, 1e-9)))
        with torch.no_grad():
            for ema_t, t in zip(self.ema.state_dict().values(), self.model.state_dict().values(), strict=True):
                if ema_t.dtype.is_floating_point:
                    ema_t.mul_(decay).add_(t.detach(), alpha=1 - decay)
                else:
                    ema_t.copy_(t)

    def _log(self, bar, loss: float, parts: dict, rate: float) -> None:
        postfix = {"loss": f"{loss:.3f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}",
                   "img/s": f"{rate:.1f}"}
        postfix.update({k: f"{v:.3f}" for k, v in parts.items()})
        if self.device.type == "cuda":
            postfix["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}G"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        self.history.append({"iteration": self.iteration, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                             **parts})
        self._write_iteration(self.history[-1])

    def _write_iteration(self, row: dict) -> None:
        """iterations.csv: one row per iteration (lr, loss and its parts), for the loss and lr
        charts; metrics.csv keeps one averaged row per evaluation. Appended as it goes, so a
        killed run keeps its rows (a resume re-logs the iterations after last.pt, and the charts
        keep the latest run through each iteration)."""
        if self.rank != 0:
            return
        path = self.options.out / "iterations.csv"
        new = not path.exists()
        if new or getattr(self, "_iteration_fields", None) is None:
            self._iteration_fields = list(row) if new else csv_header(path)
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._iteration_fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate_and_keep_best(self) -> float:
        """Score the validation set (evaluate_samples' mAP), keep best.pt and best.weights,
        write metrics.csv and the charts, and report the line to `on_evaluate`. Without a
        validation set only the training charts are drawn."""
        if self.rank != 0:
            return -1.0
        if not self.options.val:
            self._write_training_plots()
            return -1.0
        model = self.ema or self.model
        detections, truths = predict_samples(model, self.options.val, self.device, tile=self.options.eval_tile)
        result = evaluate_voc(detections, truths)
        mean_ap = result.map
        row = self._write_metrics(mean_ap)
        if mean_ap > self.best_map:
            self.best_map = mean_ap
            self._save_with_weights("best.pt", "best.weights")
        self._write_plots(result, confusion_matrix(detections, truths, self.model.num_classes))
        report = EvaluationReport(self.iteration, self.schedule.max_batches, mean_ap, self.best_map,
                                  float(row["loss"]))
        log.info("%s", report.line())
        if self.options.on_evaluate is not None:
            self.options.on_evaluate(report)
        return mean_ap

    def _write_metrics(self, mean_ap: float) -> dict:
        """One CSV row per evaluation: the loss and its parts averaged over the iterations since
        the previous row (one iteration's loss is too noisy to plot), and the latest rate."""
        path = self.options.out / "metrics.csv"
        start = getattr(self, "_metrics_mark", 0)
        window = self.history[start:] or self.history[-1:] or [{}]
        self._metrics_mark = len(self.history)
        row = {"iteration": self.iteration, "seen": self.model.seen, "map50": mean_ap,
               "lr": window[-1].get("lr", float("nan"))}
        if hasattr(self, "_started"):
            row["minutes"] = round(self._minutes(), 3)
        for key in window[-1]:
            if key not in row and key != "iteration":
                row[key] = float(np.mean([entry.get(key, np.nan) for entry in window]))
        row.setdefault("loss", float("nan"))
        new = not path.exists()
        fields = list(row) if new else path.read_text().splitlines()[0].split(",")
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row

    def _write_training_plots(self) -> None:
        """loss.png and lr.png (per iteration), map.png (per evaluation) and results.png."""
        out = self.options.out
        plot_training(out / "metrics.csv", out, iterations_csv=out / "iterations.csv")
        plot_results(out / "metrics.csv", out / "iterations.csv", out / "results.png")

    def _write_plots(self, result, matrix: np.ndarray) -> None:
        """The training charts, this evaluation's precision-recall curves and its confusion
        matrix (rewritten at every evaluation, so the run ends with the final one's)."""
        out = self.options.out
        self._write_training_plots()
        names = self.options.names or None
        plot_pr_curves(result.curves(names), out / "pr.png", ap=result.named_ap(names))
        plot_confusion_matrix(matrix, out / "confusion_matrix.png", names,
                              title=f"Confusion matrix (conf {CONFUSION_CONF:g}, IoU {CONFUSION_IOU:g})")

    def _write_label_plot(self) -> None:
        """labels.jpg: the training labels' classes, centres and sizes, before any training."""
        if self.rank != 0:
            return
        samples = self.options.train
        classes = np.concatenate([np.asarray(s.classes, np.int64).ravel() for s in samples] or [np.zeros(0)])
        boxes = np.concatenate([np.asarray(s.boxes, np.float64).reshape(-1, 4) for s in samples]
                               or [np.zeros((0, 4))])
        plot_labels(classes, boxes, self.options.out / "labels.jpg", self.options.names or None,
                    self.model.num_classes)

    def _write_batch_plot(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """train_batch0.jpg: the run's first (micro-)batch as the network gets it, augmented,
        with its target boxes (RGB CHW uint8 from the loader, drawn as BGR)."""
        if self.rank != 0:
            return
        pictures = images.permute(0, 2, 3, 1).numpy()[..., ::-1]
        plot_batch(pictures, targets.numpy(), self.options.out / "train_batch0.jpg",
                   self.options.names or None, self.model.num_classes)


CONFUSION_CONF = 0.25  # ultralytics' ConfusionMatrix thresholds
CONFUSION_IOU = 0.5


def csv_header(path: Path) -> list[str]:
    """The column names of an existing CSV (its first line)."""
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box in `a` (M, 4) with every one in `b` (N, 4): (M, N)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_one_to_one(iou: np.ndarray, iou_thresh: float) -> np.ndarray:
    """(K, 2) (truth, detection) index pairs with IoU > iou_thresh, each detection and then
    each truth kept once, at its highest IoU: ultralytics' ConfusionMatrix.process_batch."""
    truth, det = np.nonzero(iou > iou_thresh)
    pairs = np.stack([truth, det], 1).astype(np.int64)
    for column in (1, 0):  # one truth per detection, then one detection per truth
        pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
        pairs = pairs[np.unique(pairs[:, column], return_index=True)[1]]
    return pairs


def confusion_matrix(detections: list[ImageDetections], truths: list[ImageTruth], num_classes: int,
                     conf_thresh: float = CONFUSION_CONF, iou_thresh: float = CONFUSION_IOU) -> np.ndarray:
    """(C+1, C+1) counts, rows predicted class, columns true class, index C the background.

    As ultralytics' ConfusionMatrix: detections scoring > conf_thresh are matched to labels
    whatever their classes (IoU > iou_thresh, one to one, best IoU first), so a box found with
    the wrong class lands off the diagonal; a label nothing matched counts in the background
    row (missed), a detection that matched nothing in the background column (false alarm).
    mAP alone says neither which classes are confused nor whether errors are misses or
    false alarms."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")
    seen = [int(np.max(c, initial=-1)) for t in (detections, truths) for c in (x.classes for x in t)]
    num_classes = max(num_classes, max(seen, default=-1) + 1)  # never a class in the background slot
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for det, truth in zip(detections, truths, strict=True):
        keep = np.asarray(det.scores) > conf_thresh
        det_boxes = np.asarray(det.boxes, np.float64).reshape(-1, 4)[keep]
        det_classes = np.asarray(det.classes, np.int64)[keep]
        true_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
        true_classes = np.asarray(truth.classes, np.int64)
        pairs = match_one_to_one(pairwise_iou(true_boxes, det_boxes), iou_thresh)
        np.add.at(matrix, (det_classes[pairs[:, 1]], true_classes[pairs[:, 0]]), 1)
        missed = np.setdiff1d(np.arange(len(true_classes)), pairs[:, 0])
        np.add.at(matrix, (num_classes, true_classes[missed]), 1)
        unmatched = np.setdiff1d(np.arange(len(det_classes)), pairs[:, 1])
        np.add.at(matrix, (det_classes[unmatched], num_classes), 1)
    return matrix


@torch.no_grad()
def predict_samples(model: Model, samples: list, device, batch: int = 8, conf_thresh: float = 0.005,
                    nms_thresh: float = 0.45, tta: bool = False, max_det: int = 300,
                    tile: int | None = None, tile_overlap: float = 0.25
                    ) -> tuple[list[ImageDetections], list[ImageTruth]]:
    """Inference on every sample, letterboxed or stretched as the model is run by `detect`;
    detections and truths in original-image pixels. `tta`: every view of `engine.tta`, merged;
    at most `max_det` detections per image, the best scored. `tile`: each image is cut into
    overlapping windows of that size (engine.slicing), as `detect --tile` does, one image at a
    time (`batch` unused), `max_det` then per window."""
    was_training = model.training
    model.eval()
    try:
        if tile is not None:
            return _predict_samples_sliced(model, samples, device, conf_thresh, nms_thresh, tta,
                                           max_det, tile, tile_overlap)
        return _predict_samples_letterboxed(model, samples, device, batch, conf_thresh, nms_thresh,
                                            tta, max_det)
    finally:
        model.train(was_training)


def _predict_samples_letterboxed(model: Model, samples: list, device, batch: int, conf_thresh: float,
                                 nms_thresh: float, tta: bool, max_det: int
                                 ) -> tuple[list[ImageDetections], list[ImageTruth]]:
    """predict_samples through the data set's loader, `batch` images a forward pass."""
    letterbox = default_letterbox(model)
    dataset = DetectionDataset(samples, model.input_size, None, letterbox=letterbox)
    net_w, net_h = model.input_size
    detections, truths = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        x = torch.stack([item[0] for item in items]).to(device).float().div_(255)
        preds = predict_views(model, x) if tta else model(x)
        # at most MAX_NMS candidates per image, as detect: eight TTA views of an SSD's 8732
        # priors at conf 0.005 otherwise ran for over 20 minutes in 10 GB
        kept = postprocess(preds, conf_thresh, nms_thresh, max_det, merge=tta, max_nms=MAX_NMS)
        for out, (_, _, index) in zip(kept, items, strict=True):
            sample = samples[index]
            width, height = image_size(sample.image)
            dx, dy, new_w, new_h = place_only(width, height, net_w, net_h) if letterbox else (0, 0, net_w, net_h)
            out = out.cpu().double().numpy()
            scale = np.array([width / new_w, height / new_h, width / new_w, height / new_h])
            boxes = (out[:, :4] - [dx, dy, dx, dy]) * scale
            detections.append(ImageDetections(boxes, out[:, 4], out[:, 5].astype(int)))
            truths.append(truth_in_pixels(sample, width, height))
    return detections, truths


def _predict_samples_sliced(model: Model, samples: list, device, conf_thresh: float,
                            nms_thresh: float, tta: bool, max_det: int, tile: int,
                            tile_overlap: float) -> tuple[list[ImageDetections], list[ImageTruth]]:
    """predict_samples with every image cut into windows, through detect's own pipeline."""
    import functools

    from .predict import predict_letterboxed
    from .sources import as_bgr, read_image_or_raise

    check_tiling(tile, tile_overlap)
    predict = functools.partial(predict_letterboxed, model, input_size=model.input_size, device=device,
                                letterbox=default_letterbox(model), conf_thresh=conf_thresh,
                                nms_thresh=nms_thresh, max_det=max_det, tta=tta)
    detections, truths = [], []
    for sample in samples:
        image = as_bgr(read_image_or_raise(sample.image))
        rows = predict_sliced(image, tile, tile_overlap, predict, nms_thresh).double().numpy()
        detections.append(ImageDetections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int)))
        truths.append(truth_in_pixels(sample, image.shape[1], image.shape[0]))
    return detections, truths


def image_size(path) -> tuple[int, int]:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return (image.shape[1], image.shape[0]) if image is not None else (1, 1)


def place_only(width: int, height: int, net_w: int, net_h: int) -> tuple[float, float, float, float]:
    from ..data.augment import letterbox_placement

    return letterbox_placement(width, height, net_w, net_h)


def truth_in_pixels(sample, width: int, height: int) -> ImageTruth:
    boxes = sample.boxes.astype(np.float64) * [width, height, width, height]
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    difficult = getattr(sample, "difficult", None)
    return ImageTruth(xyxy, sample.classes.astype(int), difficult, width, height)


def evaluate_samples(model: Model, samples: list, device, use_07_metric: bool = False, **kwargs):
    """VOC mAP@0.5 at darknet's evaluation thresholds (0.005, NMS 0.45)."""
    detections, truths = predict_samples(model, samples, device, **kwargs)
    return evaluate_voc(detections, truths, use_07_metric=use_07_metric)
