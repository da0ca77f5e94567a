"""One trainer for the three regimes of docs/design.md §5: standard, adversarial (λ = 0) and consistent loss.

Per batch (x, y):
  1. x* = attack(x, y) with the attack library (PGD by default). The attack runs the model in **eval mode**
     (the library wraps every attack in `eval_mode`), so making x* neither uses nor updates batch-norm
     statistics of a half-trained batch, and x* is an attack on the network that will be deployed.
  2. Clean and adversarial images go through the network **together, as one concatenated batch [x; x*], in
     train mode**. Batch norm therefore normalises both halves with the same batch statistics: φ_l(x) and
     φ_l(x*) pass through identical affine maps, so the consistency distance measures how the representation
     differs and not how two batches' statistics differ (with x* = x both halves, and the distance, are equal).
     The running statistics learn the mixed clean + adversarial distribution that adversarially trained
     models are evaluated on, and one forward pass is cheaper than two. Standard training forwards x alone.
  3. loss = CE(f(x), y) + α·CE(f(x*), y) + λ·Σ_l D(φ_l(x), φ_l(x*)) (`losses.consistent_loss`), φ_l captured
     with `handlers.hooks.capture` (gradients kept).

Data parallel: one process per device under torchrun; `data.batch_size` is the global batch, split evenly over
the ranks; gradients are averaged by DistributedDataParallel; only rank 0 writes files. Crash safety: see
`checkpoint.py`; a resumed run replays the same sampler order, RNG streams and schedule, so its final weights
equal an uninterrupted run's bit for bit (CPU, same thread count, `num_workers=0` for loaders with
randomness; ShapesWorld has none).
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from conceptlens.handlers import zoo
from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.hooks import capture

from . import checkpoint, csg, distributed
from .config import TrainConfig, traced_layers, validate
from .evaluate import evaluate
from .init_weights import load_initial_weights
from .losses import LossTerms, consistent_loss, distance
from .run import RUN_FILE, WEIGHTS_FILE, run_metadata

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False) -> Path:
    """Train per `config` into `out_dir` (or continue the run there when `resume`); return the run dir.

    Works unchanged under torchrun: each process calls `train` and joins the process group itself.
    """
    out = Path(out_dir)
    validate(config)
    if not resume and (out / checkpoint.CHECKPOINT_DIR / checkpoint.LAST).exists():
        raise InvalidInput("out", f"{out} already holds a run; pass --resume {out} to continue it or pick another")
    env = distributed.detect()
    device = distributed.pick_device(config.run.device, env)
    distributed.init(env, device)
    try:
        return _Trainer(config, out, env, device, resume).fit()
    finally:
        distributed.shutdown(env)


def open_data(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The train and validation datasets named by the config (unknown scheme or missing path raise)."""
    from conceptlens.training.data.registry import open_dataset

    size = config.model.input_size
    train_set = open_dataset(config.data.train, "train", size=size)
    val_set = open_dataset(config.data.val or config.data.train, "val", size=size)
    return train_set, val_set


def make_attack(model: nn.Module, config: TrainConfig) -> Any:
    """The training attack from the attack catalogue, on the bare (un-wrapped) model; None for standard."""
    a = config.attack
    if a.name == "none":
        return None
    from conceptlens.handlers.attacks import AttackParams, registry

    return registry.make_attack(a.name, model, AttackParams(
        eps=a.eps, norm=a.norm, steps=a.steps, step_size=a.step_size, random_start=a.random_start,
        ghosts=a.ghost_members))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> Any:
    """Per-step LR schedule: cosine to 0, step decay every `step_size` epochs, one-cycle (constant below 3 steps,
    too few for its two phases), or constant."""
    o = config.optim
    total = max(1, config.run.epochs * steps_per_epoch)
    if o.schedule == "onecycle" and total >= 3:
        # OneCycleLR divides by the length of each phase: keep at least one step of warm-up and one of decay
        # (a short run, e.g. a small fine-tune set, would otherwise end in ZeroDivisionError)
        pct = min(max(o.warmup_fraction, 2 / total), (total - 1) / total)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=o.lr, total_steps=total, pct_start=pct)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if o.schedule == "step":
        every = max(1, o.step_size * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: o.gamma ** (s // every))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    # no weight decay on batch-norm and bias parameters (standard practice; decaying them only hurts)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    attack: Any,
    layers: tuple[str, ...],
    dist: Any,
    net: nn.Module | None = None,
    autocast: Any = None,
    before_forward: Any = None,
    gate: csg.ClassGate | None = None,
) -> LossTerms:
    """The loss of one batch, exactly as the trainer computes it (see the module docstring for the BN choice).

    `model` is the bare ImageClassifier (attacked, hooked); `net` what is forwarded (the DDP wrapper, else
    `model`). x* comes from `attack` (None: standard training); φ_l are captured on `layers` only when λ > 0.
    """
    net = model if net is None else net
    adv = None if attack is None else attack(x, y).adv  # eval mode inside the library; train flags restored
    if before_forward is not None:
        before_forward()
    want_acts = adv is not None and config.loss.consistency_weight > 0
    n = x.shape[0]
    # CSG (training/csg.py): in a gated step the last conv layer's maps are multiplied by the gate rows of the
    # labels, and the gate's sparsity loss joins the total; the consistency term sees the ungated maps
    gating = nullcontext() if gate is None else csg.gated(
        model, csg_layer(config), gate, y if adv is None else torch.cat([y, y]))
    with capture(model, layers if want_acts else ()) as acts, gating, autocast or nullcontext():
        logits = net(x if adv is None else torch.cat([x, adv]))
        terms = consistent_loss(
            logits[:n], y,
            logits_adv=None if adv is None else logits[n:],
            acts_clean={k: v[:n] for k, v in acts.items()} if want_acts else None,
            acts_adv={k: v[n:] for k, v in acts.items()} if want_acts else None,
            adv_weight=config.loss.adv_weight, consistency_weight=config.loss.consistency_weight, dist=dist,
        )
    if gate is not None:
        terms.total = terms.total + config.loss.csg_weight * gate.sparsity_loss(config.loss.csg_sparsity)
    return terms


def csg_layer(config: TrainConfig) -> str:
    """The layer the class-specific gate multiplies: the configured one, else the architecture's last default
    traced layer (the last conv block before pooling)."""
    from conceptlens.handlers import zoo

    return config.loss.csg_layer or zoo.arch_spec(config.model.arch).default_layers[-1]


class _Trainer:
    def __init__(self, config: TrainConfig, out: Path, env: distributed.DistEnv, device: torch.device,
                 resume: bool) -> None:
        self.config, self.out, self.env, self.device, self.resume = config, out, env, device, resume
        if config.data.batch_size % env.world_size:
            raise InvalidInput(
                "data.batch_size", f"{config.data.batch_size} does not split evenly over {env.world_size} processes"
            )
        self.cuda = device.type == "cuda"
        self.amp = config.run.amp and self.cuda
        self.channels_last = config.run.channels_last and self.cuda
        self.layers = traced_layers(config)
        self.dist = distance(config.loss.distance)

        self.train_set, self.val_set = open_data(config)
        classes = list(self.train_set.classes)
        seed_everything(config.run.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        m = config.model
        self.model = zoo.build_model(
            m.arch, classes, input_size=m.input_size, mean=m.mean or None, std=m.std or None
        )
        if m.init_weights:  # fine-tuning; a resumed run then restores its own checkpoint over these
            load_initial_weights(self.model, m.init_weights, replace_head=m.replace_head)
        self.model = self.model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if env.distributed:
            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if self.cuda else None)
        self.attack = make_attack(self.model, config)

        self.sampler = distributed.ResumableSampler(self.train_set, env, seed=config.run.seed)
        self.rank_batch = config.data.batch_size // env.world_size
        self.steps_per_epoch = self.sampler.num_samples // self.rank_batch
        if self.steps_per_epoch < 1:
            raise InvalidInput(
                "data.batch_size", f"{config.data.batch_size} exceeds the {len(self.train_set)} training images"
            )
        # A private generator: the loader must not draw its base seed from the global RNG, or creating the
        # iterator after a resume would shift every later random number.
        self.loader = DataLoader(
            self.train_set, batch_size=self.rank_batch, sampler=self.sampler, drop_last=True,
            num_workers=config.data.num_workers, pin_memory=self.cuda,
            generator=torch.Generator().manual_seed(config.run.seed),
            persistent_workers=False,
        )
        self.optimizer = make_optimizer(self.model, config)
        self.gate = self._make_gate(len(classes)) if config.loss.csg_weight > 0 else None
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.position = checkpoint.Position()
        self.last_eval: dict[str, Any] = {}  # the latest validation result (run.json reports it)

    # --- files (rank 0 only) -----------------------------------------------------------------------------

    def _start_files(self) -> None:
        ckpt = self.out / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
        if self.resume:
            if not ckpt.is_file():
                raise InvalidInput("resume", f"{self.out} holds no checkpoint ({ckpt} is missing)")
            payload = checkpoint.load(ckpt, map_location=self.device)
            if len(payload["rng"]) != self.env.world_size:
                raise InvalidInput(
                    "resume", f"the run used {len(payload['rng'])} processes; resume it with the same number"
                )
            self.position = checkpoint.restore(
                payload, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, rank=self.env.rank,
            )
            self.last_eval = payload["extra"].get("last_eval", {})
            if self.gate is not None and "csg_gate" in payload["extra"]:
                with torch.no_grad():
                    self.gate.weight.copy_(payload["extra"]["csg_gate"])
            self._info("resumed %s at step %d (epoch %d, batch %d)", self.out, self.position.step,
                     self.position.epoch, self.position.batch)
            if self.env.is_main:
                self._truncate_metrics(self.position.step)
            return
        seed_everything(self.config.run.seed + self.env.rank)  # different attack randomness per rank
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = self.config.to_dict()
            resolved["loss"]["layers"] = list(self.layers)
            resolved["world_size"] = self.env.world_size
            (self.out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
            (self.out / METRICS_FILE).write_text("")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records the killed run wrote after its last checkpoint; the resumed run writes them again."""
        path = self.out / METRICS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def _info(self, message: str, *args: Any) -> None:
        if self.env.is_main:  # one copy of each status line, not one per process
            log.info(message, *args)

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.out / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _checkpoint(self) -> None:
        states = distributed.gather_objects(checkpoint.rng_state(), self.env)
        if self.env.is_main:
            checkpoint.save(
                self.out / checkpoint.CHECKPOINT_DIR / checkpoint.LAST, model=self.model,
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                position=self.position, rng_states=states, extra={"last_eval": self.last_eval, **(
                    {} if self.gate is None else {"csg_gate": self.gate.weight.detach().cpu()})},
            )

    # --- the loop ----------------------------------------------------------------------------------------

    def fit(self) -> Path:
        self._start_files()
        distributed.barrier(self.env)
        cfg = self.config
        self._info("training %s (%s) on %s, %d process(es), %d steps/epoch", cfg.model.arch, cfg.regime,
                 self.device, self.env.world_size, self.steps_per_epoch)
        while self.position.epoch < cfg.run.epochs:
            self.last_eval = self._epoch()
        if self.env.is_main:
            self._finish(self.last_eval)
        distributed.barrier(self.env)
        return self.out

    def _epoch(self) -> dict[str, Any]:
        cfg, pos = self.config, self.position
        self.sampler.set_epoch(pos.epoch)
        self.loader.generator.manual_seed(cfg.run.seed + pos.epoch)  # worker seeds: a function of the epoch
        self.sampler.set_start(pos.batch * self.rank_batch)
        self.model.train()
        started, cpu_started = time.perf_counter(), time.process_time()
        bar = tqdm(total=self.steps_per_epoch, initial=pos.batch, desc=f"epoch {pos.epoch + 1}/{cfg.run.epochs}",
                   disable=not (cfg.run.progress and self.env.is_main), leave=False)
        for images, labels in self.loader:
            if pos.batch >= self.steps_per_epoch:
                break
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            terms = self._step(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            pos.step, pos.batch = pos.step + 1, pos.batch + 1
            bar.update()
            if pos.step % cfg.run.log_every == 0:
                values = distributed.all_reduce_mean(terms.detach().to(torch.float64), self.env).tolist()
                record = {"kind": "step", "step": pos.step, "epoch": pos.epoch, "lr": lr}
                record.update(zip(self._term_names, values, strict=True))
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                self._log(record)
            every = cfg.run.checkpoint_every
            if every and pos.step % every == 0 and pos.batch < self.steps_per_epoch:
                self._checkpoint()  # the end-of-epoch checkpoint covers the last batch
        bar.close()
        train_seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started  # this process, all threads: robust to a busy machine
        result = self.last_eval = self._validate()
        pos.epoch, pos.batch = pos.epoch + 1, 0
        record = {"kind": "epoch", "step": pos.step, "epoch": pos.epoch, "train_seconds": train_seconds,
                  "train_cpu_seconds": cpu_seconds,
                  "clean_accuracy": result["clean_accuracy"], "robust_accuracy": result["robust_accuracy"],
                  "robust_eps": self.config.eval_eps, "robust_steps": self.config.eval.steps}
        self._log(record)
        self._info("epoch %d: clean accuracy %.4f, robust accuracy %s, %.1f s", pos.epoch, result["clean_accuracy"],
                 "n/a" if result["robust_accuracy"] is None else f"{result['robust_accuracy']:.4f}", train_seconds)
        self._checkpoint()
        return result

    @property
    def _term_names(self) -> list[str]:
        return ["loss", "ce_clean", "ce_adv", "consistency", *(f"consistency/{n}" for n in self.layers)]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss terms (in `_term_names` order) as one detached vector."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", enabled=True) if self.amp else nullcontext()
        gate = self.gate if self.gate is not None and self.position.epoch % 2 == 0 else None  # CSG: even epochs
        terms = batch_loss(self.model, x, y, self.config, attack=self.attack, layers=self.layers,
                           dist=self.dist, net=self.net, autocast=autocast, before_forward=self._zero_grad, gate=gate)
        self.scaler.scale(terms.total).backward()
        if gate is not None and gate.weight.grad is not None and self.env.distributed:  # DDP does not own the gate
            gate.weight.grad.copy_(distributed.all_reduce_mean(gate.weight.grad, self.env))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if gate is not None:
            gate.renormalize_()
        zero = terms.total.new_zeros(())
        layer_terms = [terms.per_layer.get(name, zero) for name in self.layers]
        return torch.stack([terms.total, terms.ce_clean, terms.ce_adv, terms.consistency, *layer_terms]).detach()

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the attack may have left parameter gradients behind

    def _make_gate(self, classes: int) -> csg.ClassGate:
        """The CSG gate over the gated layer's channels, trained by the same optimiser (no weight decay: the
        sparsity loss is its only regulariser). Training only: it is not part of the model or its weights."""
        layer = csg_layer(self.config)
        with torch.no_grad(), capture(self.model, [layer]) as acts:
            was = self.model.training
            self.model.eval()
            self.model(torch.zeros(1, 3, self.config.model.input_size, self.config.model.input_size,
                                   device=self.device))
            self.model.train(was)
        gate = csg.ClassGate(classes, acts[layer].shape[1]).to(self.device)
        self.optimizer.add_param_group({"params": [gate.weight], "weight_decay": 0.0})
        return gate

    def _validate(self) -> dict[str, Any]:
        e = self.config.eval
        return evaluate(
            self.model, self.val_set, eps=self.config.eval_eps, steps=e.steps, norm=self.config.attack.norm,
            robust_n=e.robust_n, batch_size=e.batch_size, seed=self.config.run.seed, env=self.env,
            progress=self.config.run.progress,
        )

    def _finish(self, last_eval: dict[str, Any]) -> None:
        zoo.save_weights(self.model, self.out / WEIGHTS_FILE)
        meta = run_metadata(
            self.model, self.config, layers=self.layers, world_size=self.env.world_size,
            steps=self.position.step, metrics=last_eval, git_commit=git_commit(),
        )
        (self.out / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.info("run written to %s", self.out)
