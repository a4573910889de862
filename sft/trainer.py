"""`FSDPSFTTrainer`: builds data, model, optimizer and checkpoint I/O, then runs the training loop.

The entry points (sft/fsdp_sft_trainer.py, sft/sft_trainer.py) compose and validate the config, start the
process group and the meshes, and call `train`. The trainer owns one loop:
each optimizer step runs this rank's micro-batches with gradient sync only on the last, and
normalises by the number of target tokens of the whole global batch, so the loss and the
update do not depend on how the batch is split over ranks and micro-batches. The loop never
waits for the GPU: batches are pinned and copied asynchronously, counts come from the host, and
the one read-back of a step (loss, gradient norm, counts) comes after the last backward.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from transformers import GenerationConfig

from sft.checkpoint.extra_state import set_rng_state
from sft.checkpoint.manager import FSDPCheckpointManager
from sft.cli import TrainingError
from sft.config.model_checks import check_vocab
from sft.config.schema import DTYPES, SFTConfig, to_dict
from sft.data.batch import MicroBatch, tensor_to_device, to_device
from sft.data.build import build_dataset
from sft.data.cache import cache_location
from sft.data.loader import MicroBatchBuilder, build_train_loader
from sft.data.prefetch import BuildWindow, prefetched
from sft.data.processor import vision_processor
from sft.data.sampler import StepBatchSampler, eval_indices
from sft.data.scan import write_bad_samples
from sft.data.storage import TokenizeShard
from sft.data.vision_batch import VisionInputs
from sft.loop.budget import TokenBudget, choose_token_budget
from sft.loop.callbacks import StepCallback, callback_factories, make_callbacks
from sft.loop.flops import flops_reason, peak_flops_per_gpu, useful_flops
from sft.loop.loggers import MetricsLogger
from sft.loop.optim import build_optimizer, build_scheduler
from sft.loop.plan import make_plan
from sft.loop.preemption import Preempted, PreemptionWatcher
from sft.loop.readback import StepReadback
from sft.loop.sync_check import sync_debug
from sft.loop.throughput import StepTimer, step_rates
from sft.models.loading import build_meta_model, load_hf_config, load_tokenizer, load_weights
from sft.models.moe import routing_inputs
from sft.ops.fp8 import fp8_gathers, refresh_fp8_scales, token_multiple
from sft.ops.fused_ce import compile_ahead
from sft.parallel.distributed import DistContext
from sft.parallel.fsdp import apply_compile, apply_fsdp, apply_recompute

logger = logging.getLogger("sft")


class NonFiniteError(TrainingError):
    pass


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FSDPSFTTrainer:
    """Supervised fine-tuning of one model on this process's ranks: build everything, then `fit()`.

    `callbacks` (and any added by `add_callback` or named in `SFT_CALLBACKS`, sft/loop/callbacks.py)
    are called after each step's metrics are logged, on every rank.
    """

    def __init__(self, cfg: SFTConfig, ctx: DistContext, callbacks: Sequence[StepCallback] = ()) -> None:
        self.cfg, self.ctx = cfg, ctx
        seed_everything(cfg.trainer.seed)  # first: the model's init and the data order draw from it
        factories = callback_factories()  # SFT_CALLBACKS: a bad name fails before anything is loaded
        self.tokenizer, self.hf_config, self.generation_config = self._build_tokenizer()
        self.processor = self._build_processor()  # images in the data only (vision-language SFT), else None
        self.train_ds, self.val_ds = self._build_data()  # before the model: bad data fails before loading
        self.plan = make_plan(cfg, ctx.world_size, len(self.train_ds))
        self.model = self._build_model()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.budget = self._build_budget()  # measures the sharded model; may recompute fewer layers
        self.sampler, self.loader = self._build_loader()
        self.ckpt, self.preemption = self._build_io()
        # Step state. sync_debug: torch.cuda.set_sync_debug_mode around the micro-batch loop and the queued
        # update ("error" in the GPU tests). _aux_weight: the MoE router aux loss's weight in units of the CE
        # sum, set per step on the device. build_window: opened at each step's read-back, so the next step
        # is built while the device drains this one.
        self.sync_debug: str | int = "default"
        self.preempt_requested = False
        self._aux_weight: torch.Tensor | float = 0.0
        self.peak_flops = self._peak_flops()  # None on CPU, an unknown GPU or uncounted FLOPs: no train/mfu
        self.build_window = BuildWindow()
        self.state = TrainState()
        run_id = self._resume()  # before the metrics logger: a resumed run continues its wandb run
        self.fp8_scales = self._fp8_scales()  # model.fp8 tensorwise: weight scales refreshed after every update
        self.metrics = self._build_metrics(run_id)
        self.callbacks: list[StepCallback] = [*callbacks, *make_callbacks(factories, self)]

    def add_callback(self, callback: StepCallback) -> None:
        """Call `callback.on_step_end(step, metrics)` after each step's metrics are logged (every rank)."""
        self.callbacks.append(callback)

    # ----- construction -----
    def _build_tokenizer(self) -> tuple:
        tokenizer, hf_config = load_tokenizer(self.cfg), load_hf_config(self.cfg)
        check_vocab(tokenizer, hf_config)  # before the datasets: ids beyond the embedding
        try:
            generation_config = GenerationConfig.from_pretrained(self.cfg.model.partial_pretrain)
        except OSError:  # the folder has no generation_config.json: derive one from the model config
            generation_config = GenerationConfig.from_model_config(hf_config)
        return tokenizer, hf_config, generation_config

    def _build_processor(self):
        return vision_processor(self.cfg, self.tokenizer)

    def _build_data(self) -> tuple:
        d = self.cfg.data
        train_ds = self._dataset(d.train_files, d.train_max_samples)
        val_ds = self._dataset(d.val_files, d.val_max_samples) if d.val_files else None
        write_bad_samples(self.cfg.trainer.default_local_dir, {"train": train_ds, "val": val_ds}, self.ctx.rank)
        return train_ds, val_ds

    def _dataset(self, files, max_samples: int):
        # Every rank needs the whole dataset; each tokenizes 1/world of it and they exchange.
        shard = TokenizeShard(self.ctx.rank, self.ctx.world_size, self.ctx.world_group)
        return build_dataset(
            files,
            self.tokenizer,
            self.cfg.data,
            max_samples,
            pad_to_max_length=not self.cfg.use_remove_padding,
            shard=shard if self.ctx.world_size > 1 else None,
            cache_dir=cache_location(self.cfg.data.cache, self.cfg.data.cache_dir, self.cfg.trainer.default_local_dir),
            processor=self.processor,
        )

    def _build_model(self) -> torch.nn.Module:
        model = build_meta_model(self.hf_config, self.cfg, vision=self.processor is not None)
        if self.cfg.model.compile:
            apply_compile(model)
        apply_fsdp(model, self.cfg, self.ctx)
        load_weights(model, self.cfg, self.ctx)
        model.train()
        if model.fused_loss:  # hidden states reach the loss in bf16 (sft/parallel/fsdp.py::mixed_precision)
            vocab = model.lm.get_output_embeddings().weight.shape[0]
            compile_ahead(self.ctx.device, vocab, torch.bfloat16, model.softcap)
        return model

    def _build_optimizer(self) -> tuple:
        o = self.cfg.optim
        optimizer = build_optimizer(self.model, o.lr, tuple(o.betas), o.weight_decay, self.ctx.device.type)
        scheduler = build_scheduler(
            optimizer,
            total_steps=self.plan.total_steps,
            warmup_steps=self.plan.warmup_steps,
            kind=o.lr_scheduler,
            min_lr_ratio=o.min_lr_ratio,
            num_cycles=o.num_cycles,
            wsd_decay_ratio=o.wsd_decay_ratio,
        )
        return optimizer, scheduler

    def _build_budget(self) -> TokenBudget | None:
        budget = choose_token_budget(self.cfg, self.hf_config, self.model, self.ctx.device, self.ctx.world_group)
        if budget is not None and budget.recompute is not None:
            apply_recompute(self.model, budget.recompute)
        return budget

    def _build_loader(self) -> tuple:
        cfg, ctx, tokens = self.cfg, self.ctx, self.budget.tokens if self.budget else None
        sampler = StepBatchSampler(
            len(self.train_ds),
            cfg.data.train_batch_size,
            ctx.dp_rank,
            ctx.dp_size,
            cfg.trainer.seed,
            cfg.data.micro_batch_size_per_gpu,
            lengths=self.train_ds.lengths,
            # Each GPU of an SP group holds 1/sp of the packed row: the row may be sp times the budget.
            token_budget=tokens * ctx.sp_size if tokens else None,
        )
        return sampler, build_train_loader(sampler, self._builder(self.train_ds))

    def _builder(self, ds) -> MicroBatchBuilder:
        return MicroBatchBuilder(
            ds,
            self.cfg.use_remove_padding,
            self.tokenizer.pad_token_id,
            self.ctx.sp_rank,
            self.ctx.sp_size,
            pin_memory=self.ctx.device.type == "cuda",
            token_multiple=token_multiple(self.cfg.model.fp8),
            vision=None
            if self.processor is None
            else VisionInputs(self.processor, self.hf_config, self.model.image_token_id),
        )

    def _build_io(self) -> tuple[FSDPCheckpointManager, PreemptionWatcher]:
        tc = self.cfg.trainer
        ckpt = FSDPCheckpointManager(
            tc.default_local_dir,
            self.ctx,
            tc.checkpoint.save_contents,
            tc.checkpoint.load_contents,
            tc.max_ckpt_to_keep,
            DTYPES[tc.checkpoint.hf_dtype],
        )
        return ckpt, PreemptionWatcher(self.ctx.world_group, self.ctx.device, tc.preempt_grace_s)

    def _resume(self) -> str | None:
        """Load the checkpoint that `trainer.resume_mode` asks for, if any; its wandb run id."""
        path = self.ckpt.find_resume_step(self.cfg.trainer.resume_mode, self.cfg.trainer.resume_from_path)
        if path is None:
            return None
        extra = self.ckpt.load(path, self.model, self.optimizer)
        logger.info("resumed from %s", self.ckpt.loaded_path or path)
        if extra is None:
            return None
        self.scheduler.load_state_dict(extra["scheduler"])
        self.state = TrainState(**extra["train_state"])
        if extra.get("world_size") == self.ctx.world_size:
            set_rng_state(extra["rng"])
        return extra.get("wandb_run_id")

    def _fp8_scales(self) -> bool:
        """Whether FSDP2 gathers weights in FP8 (sft/ops/fp8.py); if so, their scales for the loaded weights."""
        if not fp8_gathers(self.model):
            return False
        refresh_fp8_scales(self.model)
        return True

    def _build_metrics(self, run_id: str | None) -> MetricsLogger:
        tc = self.cfg.trainer
        return MetricsLogger(
            tc.logger,
            tc.default_local_dir,
            tc.project_name,
            tc.experiment_name,
            to_dict(self.cfg),
            self.plan.total_steps,
            self.ctx.rank,
            resume=run_id is not None,
            run_id=run_id,
        )

    # ----- one forward -----
    def _forward(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the model on one micro-batch: its inputs moved to the device, plus what only the trainer knows."""
        kwargs = to_device(mb.inputs, self.ctx.device)
        if self.model.routing is not None:  # MoE: sample ids for the router aux loss, built on the host
            routing = routing_inputs(mb.real_mask, mb.cu_seq_lens, self.ctx.sp_rank, self.ctx.sp_size)
            kwargs.update(to_device(routing, self.ctx.device), aux_weight=self._aux_weight)
        if mb.cu_seq_lens is not None and self.ctx.sp_size > 1:
            kwargs["sp_group"] = self.ctx.sp_group
        if mb.cu_seq_lens is not None and self.model.recurrent:
            # The host copy of the boundaries: recurrent kernels size their chunk tables from it, not from the GPU.
            kwargs["cu_seq_lens_cpu"] = mb.cu_seq_lens
        return self.model(**kwargs)

    def _peak_flops(self) -> float | None:
        peak = peak_flops_per_gpu(self.ctx.device)
        why = flops_reason(self.hf_config)
        if peak is not None and why is not None:
            logger.info("train/mfu not reported: sft's FLOP count (sft/loop/flops.py) does not cover %s", why)
            return None
        return peak

    def _useful_flops(self, micro_batches: list[MicroBatch]) -> float:
        """This rank's share of the step's useful FLOPs (causal attention over the real sample lengths, padding
        not counted), from the host; an SP group's ranks hold the same samples, so each counts 1/sp of them."""
        lengths = [n for mb in micro_batches for n in mb.sample_lens]
        return useful_flops(self.hf_config, lengths) / self.ctx.sp_size

    # ----- one optimizer step -----
    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        device, world = self.ctx.device, self.ctx.world_group
        # Counted on the host (by the micro-batch builder); summed over the world on the device.
        # A preemption signal on any rank is seen by all with the step's one read-back.
        flops = self._useful_flops(micro_batches) if self.peak_flops else 0.0
        counts = tensor_to_device(StepReadback.host_counts(micro_batches, self.preemption.flag, flops), device)
        dist.all_reduce(counts, group=world)
        # FSDP averages gradients over the world; scaling by world/global_targets turns that
        # average into the sum of token losses divided by the global number of targets. The
        # scale stays on the device: reading it back would stop the host from running ahead.
        scale = self.ctx.world_size / counts[0]
        # MoE aux loss (sft/models/moe.py) is a sum over real tokens; in units of this loss it weighs coef * targets / tokens.
        self._aux_weight = self.model.routing.coef * counts[0] / counts[1] if self.model.routing else 0.0
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, argmax hits]
        with sync_debug(self.sync_debug):
            for i, mb in enumerate(micro_batches):
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                mb_loss, _, correct = self._forward(mb)
                (mb_loss * scale).backward()
                sums += torch.stack([mb_loss.detach().double(), correct.double()])
            dist.all_reduce(sums, group=world)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            lr = self.scheduler.get_last_lr()[0]
            # The fused AdamW (sft/loop/optim.py) is queued before the read-back, told on the device to skip itself
            # when the loss or the gradient norm is not finite: its host work (DTensor dispatch) then overlaps the
            # backward instead of leaving the device idle after the read-back.
            queued = self.optimizer.defaults.get("fused", False)
            if queued:
                finite = torch.isfinite(sums[0]) & torch.isfinite(grad_norm)
                self.optimizer.found_inf = (~finite).to(torch.float32)
                self.optimizer.step()
                if self.fp8_scales:  # queued too: the next forward's FP8 all-gathers use the updated weights' scales
                    refresh_fp8_scales(self.model)
        # The step's one read-back: the logged values, and the finiteness check of the update. The host
        # now waits for the device, so the prefetch thread builds the next step (sft/data/prefetch.py).
        self.build_window.open()
        r = StepReadback.read(sums, grad_norm, counts)
        assert r.targets > 0, "samples without targets are dropped by the dataset"
        self.preempt_requested = r.preempt > 0
        loss, step = r.loss, self.state.global_step + 1
        if not (math.isfinite(loss) and math.isfinite(r.grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {step}: non-finite loss {loss} or grad norm {r.grad_norm}; the optimizer step was skipped and "
                "the last checkpoint is untouched; lower optim.lr or check the data of this step"
            )
        if not queued:
            self.optimizer.step()
            if self.fp8_scales:
                refresh_fp8_scales(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        moe = self.model.routing.step_metrics(world, r.real_tokens) if self.model.routing else {}
        return {
            **moe,
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": r.grad_norm,
            "train/trained_tokens": r.targets,
            "train/total_tokens": r.real_tokens,
            "train/padding_frac": 1.0 - r.real_tokens / r.slots,
            "train/token_accuracy": r.correct / r.targets,
            "train/useful_flops": r.useful_flops,
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        ds, mb_size, device = self.val_ds, self.cfg.data.micro_batch_size_per_gpu, self.ctx.device
        mine = eval_indices(len(ds), self.ctx.dp_rank, self.ctx.dp_size)
        build = self._builder(ds)
        # Every rank runs the same number of forwards (FSDP's collectives must match).
        n_mb = math.ceil(math.ceil(len(ds) / self.ctx.dp_size) / mb_size)
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        self.model.eval()
        for k in range(n_mb):
            loss_sum, n, correct = self._forward(build(mine[k * mb_size : (k + 1) * mb_size]))
            totals += torch.stack([loss_sum.double(), n.double(), correct.double()])
        self.model.train()
        dist.all_reduce(totals, group=self.ctx.world_group)
        loss_sum, n, correct = totals.tolist()
        return {"val/loss": loss_sum / n, "val/token_accuracy": correct / n}

    # ----- loop -----
    def fit(self) -> None:
        plan, st, tc = self.plan, self.state, self.cfg.trainer
        budget = self.budget
        micro = (
            f"micro-batches packed up to {budget.tokens} tokens per GPU ({budget.reason})"
            if budget
            else f"{plan.micro_batches} micro-batch(es) of {self.cfg.data.micro_batch_size_per_gpu} per rank"
        )
        logger.info(
            "training %d steps (%d per epoch), %d samples, dp=%d sp=%d, %s",
            plan.total_steps,
            plan.steps_per_epoch,
            len(self.train_ds),
            plan.dp_size,
            plan.sp_size,
            micro,
        )
        # No extra sync: train_step reads its metrics back once per step, which is the clock's tick.
        timer = StepTimer(self.ctx.device, sync=False)
        # The next step is built while the device runs this one (sft/data/prefetch.py).
        with closing(self._steps()) as steps:
            for micro_batches in steps:
                timer.start()
                m = self.train_step(micro_batches)
                elapsed = timer.stop()
                st.global_step += 1
                st.step_in_epoch += 1
                st.tokens_seen += int(m["train/total_tokens"])
                flops = m.pop("train/useful_flops")
                total, trained = m["train/total_tokens"], m["train/trained_tokens"]
                m.update(
                    step_rates(total, trained, flops, elapsed, self.ctx.world_size, self.peak_flops, self.ctx.device)
                )
                m["train/epoch"] = st.epoch
                self.metrics.log(m, st.global_step)
                for callback in self.callbacks:
                    callback.on_step_end(st.global_step, m)
                last = st.global_step >= plan.total_steps
                if self.val_ds is not None and (last or (tc.test_freq > 0 and st.global_step % tc.test_freq == 0)):
                    self.metrics.log(self.validate(), st.global_step)
                saved = last or (tc.save_freq > 0 and st.global_step % tc.save_freq == 0)
                if saved:
                    self.save()
                if self.preempt_requested:
                    if not saved:
                        self.save()
                    self.metrics.close()
                    self.preemption.close()
                    raise Preempted(
                        f"preempted: checkpoint of step {st.global_step} saved in {self.cfg.trainer.default_local_dir}; "
                        "relaunch the same command to resume"
                    )
                if last:
                    break
        self.metrics.close()
        self.preemption.close()

    def _steps(self) -> Iterator[list[MicroBatch]]:
        """This rank's steps from the current position on, epoch after epoch, until the last step; each
        built on a background thread while the device runs the one before (sft/data/prefetch.py)."""
        plan, st = self.plan, self.state
        while st.global_step < plan.total_steps:
            if st.step_in_epoch >= plan.steps_per_epoch:
                st.epoch, st.step_in_epoch = st.epoch + 1, 0
            self.sampler.set_position(st.epoch, st.step_in_epoch)
            with closing(prefetched(self.loader, window=self.build_window)) as steps:
                yield from steps

    def save(self) -> None:
        extra = {
            "train_state": vars(self.state).copy(),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.ctx.world_size,
            "wandb_run_id": self.metrics.run_id,
        }
        self.ckpt.save(
            self.state.global_step,
            self.model,
            self.optimizer,
            extra,
            self.hf_config,
            self.tokenizer,
            self.generation_config,
        )


def train(cfg: SFTConfig, ctx: DistContext) -> None:
    FSDPSFTTrainer(cfg, ctx).fit()
