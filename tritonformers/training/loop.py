"""The training loop behind ``tritonformers train`` and ``tritonformers.training.train(**options)``.

One optimizer step (steps count from 1) takes ``grad_accum`` micro-batches of ``batch_size`` sequences on each
of the ``W`` processes. The loss of the step is the token-weighted mean over the whole global batch:

    loss = sum over micro-batches and ranks of (mean loss of the micro-batch x its loss terms) / (all loss terms)

Each micro-batch back-propagates ``mean x terms x W / all terms``, so after DDP's (or FSDP's) averaging over
the W ranks the gradient is that of the global mean: one process with a W times larger batch computes the
same step. Around it: autocast in bf16/fp16 (fp16 with a gradient scaler; the weights stay float32), gradient
clipping, AdamW (fused on CUDA; weight decay on matrices only) with linear warmup then cosine decay to
``min_lr_ratio x lr``, held-out loss and perplexity at every multiple of ``eval_every`` and at the last step,
checkpoints every ``save_every`` steps, the final model in ``out``, metrics in ``out/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..models.loading import checkpoint_files, read_config
from . import checkpoint as ckpt
from .data import (Corpus, PairCorpus, eval_batches, load_tokenizer, make_task, pair_stream, token_stream,
                   tokenizer_fingerprint, train_batch)
from .distributed import Distributed, gradient_sync, is_fsdp, unwrapped, wrap
from .families import family_for
from .options import TrainOptions

METRICS_FILE = "metrics.jsonl"
DEFAULT_SEQ_LEN = 1024


@dataclasses.dataclass
class TrainResult:
    """What a run returns (on every rank): the last step, its training loss, the last evaluation, the output."""

    step: int
    loss: float | None
    eval_loss: float | None
    eval_ppl: float | None
    out: str
    rank: int = 0


def train(**options) -> TrainResult:
    """Train a model as ``tritonformers train`` does; the keyword arguments are the flags' names.

    Required: ``model`` (a checkpoint directory to fine-tune, or a config.json file for random weights),
    ``data`` (a text file, a folder of text files, a JSON-lines file, a 1-D ``.npy`` of token ids, or a
    sequence of ids), ``out`` (the output directory). See :class:`TrainOptions` for the others and
    the module docstring for the semantics. Run it under ``torchrun`` for DDP (``fsdp=True``: FSDP2).
    Bad input raises ValueError / TypeError / FileNotFoundError before the first step.
    """
    opts = TrainOptions(**options)
    ctx = Distributed.from_env(opts.device)
    try:
        return _Run(opts, ctx).run()
    finally:
        ctx.close()


def _model_source(path: str) -> tuple[dict, str | None]:
    """(config dict, checkpoint directory or None for random weights) of ``--model``."""
    if os.path.isfile(path):
        if os.path.basename(path) != "config.json":
            raise ValueError(f"model {path!r} is a file but not a config.json; pass a checkpoint directory, or a "
                             "file named config.json to start from random weights")
        return read_config(os.path.dirname(path) or "."), None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} does not exist (a checkpoint directory or a config.json)")
    config = read_config(path)
    checkpoint_files(path)  # a directory without weights is an error now, not after tokenising
    return config, path


def lr_factor(index: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for step ``index + 1``: linear warmup over ``warmup`` steps, then cosine
    decay from 1 to ``min_ratio`` at step ``total``."""
    if index < warmup:
        return (index + 1) / warmup
    progress = min(1.0, (index - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainStep:
    """The loop's optimizer step, for any model whose ``forward(input_ids, labels, ...)`` returns ``.loss``: AdamW
    (fused on CUDA; weight decay on matrices only) with the warmup + cosine schedule, autocast to ``dtype``
    (float16 with a gradient scaler), token-weighted loss over micro-batches and ranks (module docstring),
    gradient clipping. The benchmarks time it around our models and transformers' alike.

    ``step(batches, terms)`` runs one step over this rank's micro-batches (dicts of CPU tensors) whose loss terms
    are ``terms``; returns (global mean loss, gradient norm before clipping or None).
    """

    def __init__(self, model: torch.nn.Module, *, lr: float, dtype: torch.dtype, device: torch.device,
                 weight_decay: float = 0.1, warmup_steps: int = 0, max_steps: int = 1000, min_lr_ratio: float = 0.1,
                 max_grad_norm: float | None = 1.0, ctx: Distributed | None = None):
        self.model, self.dtype, self.device, self.max_grad_norm = model, dtype, device, max_grad_norm
        self.ctx = ctx or Distributed(0, 1, device, False)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_factor(i, warmup_steps, max_steps, min_lr_ratio))
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def __call__(self, batches: list[dict], terms: list[int]) -> tuple[float, float | None]:
        world = self.ctx.world
        total = max(1.0, float(self.ctx.sum([sum(terms)])[0]))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, (batch, n) in enumerate(zip(batches, terms)):
            with gradient_sync(self.model, m == len(batches) - 1):
                with self.autocast():
                    loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss.float() * n
                self.scaler.scale(loss * (world / total)).backward()
            loss_sum += loss.detach().double().cpu()
        grad_norm = None
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(self.ctx.sum([loss_sum])[0]) / total, grad_norm


class _Metrics:
    """``out/metrics.jsonl`` (rank 0 only). A resumed run keeps the records up to its starting step."""

    def __init__(self, out: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled, self.losses = out / METRICS_FILE, enabled, []
        if not enabled:
            return
        kept = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        for line in kept:
            record = json.loads(line)
            if "loss" in record:
                self.losses.append((record["step"], record["loss"]))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if "loss" in record:
            self.losses.append((record["step"], record["loss"]))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, out: Path) -> None:
        """``out/loss.png``, when matplotlib is installed (the bench extra)."""
        if not self.enabled or not self.losses:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        steps, losses = zip(*self.losses)
        ax.plot(steps, losses, label="train loss")
        with open(self.path, encoding="utf-8") as f:
            evals = [json.loads(line) for line in f if '"eval_loss"' in line]
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, file=sys.stderr, desc="train", unit="step", dynamic_ncols=True)


class _Run:
    """One run: everything is checked and built in ``__init__`` (errors before the first step), then :meth:`run`."""

    def __init__(self, opts: TrainOptions, ctx: Distributed):
        self.opts, self.ctx = opts, ctx
        config_dict, weights = _model_source(opts.model)
        self.family = family_for(config_dict.get("model_type"), source=f"model {opts.model!r}")
        model_cls = self.family.model_cls()
        self.config = model_cls.config_class.from_dict(config_dict)
        self.resume = ckpt.check_resumable(opts.resume) if opts.resume else None
        self._check_family_options()
        self.seq_len = self._seq_len()
        tokenizer_dir = opts.tokenizer or weights
        self.tokenizer = load_tokenizer(self.family, tokenizer_dir, self.config.vocab_size)
        self.task = make_task(self.family.task, seq_len=self.seq_len, tokenizer=self.tokenizer,
                              vocab_size=self.config.vocab_size, probability=opts.mlm_probability)
        self.corpus = self._corpus(tokenizer_dir)
        self.model = self._build_model(model_cls, weights)
        self.trainer = TrainStep(self.model, lr=opts.lr, dtype=getattr(torch, opts.dtype), device=ctx.device,
                                 weight_decay=opts.weight_decay, warmup_steps=opts.warmup_steps,
                                 max_steps=opts.max_steps, min_lr_ratio=opts.min_lr_ratio,
                                 max_grad_norm=opts.max_grad_norm, ctx=ctx)
        self.step, self.position = 0, 0
        if self.resume is not None:
            state = ckpt.load_training_state(self.resume)
            ckpt.restore(state, model=self.model, optimizer=self.trainer.optimizer, scheduler=self.trainer.scheduler,
                         scaler=self.trainer.scaler, ctx=ctx)
            self.step, self.position = state["step"], state["position"]
            self._check_pair_order(state)
        self.out = Path(opts.out)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = _Metrics(self.out, ctx.is_main, self.step if self.resume else None)

    # -- setup --------------------------------------------------------------------------------------------
    def _check_family_options(self) -> None:
        opts, family = self.opts, self.family
        if opts.gradient_checkpointing and not family.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing: the {family.model_type} family does not support it")
        if opts.fsdp and not family.fsdp:
            raise ValueError(f"fsdp: the {family.model_type} family cannot be sharded with FSDP2 (see its entry in "
                             "tritonformers.training.families); run DDP (torchrun without --fsdp)")
        if opts.target_data is not None and family.task != "seq2seq":
            raise ValueError(f"target_data is for translation models; a {family.model_type} model trains on "
                             "data alone")

    def _check_pair_order(self, state: dict) -> None:
        """Pairs are grouped by length in blocks of batch x processes: another block size is another order."""
        if not isinstance(self.corpus, PairCorpus) or "batch_size" not in state:
            return
        saved = state["batch_size"] * state["world_size"]
        if saved != self.corpus.block:
            warnings.warn(f"resume: the checkpoint grouped translation pairs in blocks of {saved} (batch x "
                          f"processes), this run in blocks of {self.corpus.block}: the position continues but the "
                          "pair order from here differs from the uninterrupted run's", stacklevel=3)

    def _seq_len(self) -> int:
        limit = self.family.max_positions(self.config)
        n = (self.opts.seq_len or self.family.default_seq_len(self.config)
             or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN))
        if limit is not None and n > limit:
            raise ValueError(f"seq_len={n} is beyond what this {self.family.model_type} model serves ({limit} "
                             "positions)")
        if self.family.check_seq_len is not None:
            self.family.check_seq_len(self.config, n)
        return n

    def _corpus(self, tokenizer_dir) -> Corpus | PairCorpus:
        opts, ctx = self.opts, self.ctx
        source = f"data {opts.data!r}" if isinstance(opts.data, (str, os.PathLike)) else "data"
        if self.family.task == "seq2seq":
            return self._pair_corpus(tokenizer_dir, source)
        stream = token_stream(opts.data, self.tokenizer, tokenizer_fingerprint(self.tokenizer, tokenizer_dir),
                              opts.text_field, is_writer=ctx.is_main, barrier=ctx.barrier)
        if len(stream) and int(stream.max()) >= self.config.vocab_size:
            raise ValueError(f"data: token id {int(stream.max())} is outside the model's vocabulary "
                             f"(vocab_size={self.config.vocab_size}); is this the model's tokenizer?")
        return Corpus(stream, self.task.window, opts.eval_sequences, opts.seed, source)

    def _pair_corpus(self, tokenizer_dir, source: str) -> PairCorpus:
        opts, ctx, config = self.opts, self.ctx, self.config
        ids, offsets = pair_stream(opts.data, opts.target_data, self.tokenizer,
                                   tokenizer_fingerprint(self.tokenizer, tokenizer_dir), opts.source_field,
                                   opts.target_field, is_writer=ctx.is_main, barrier=ctx.barrier)
        is_target = np.repeat(np.arange(len(offsets) - 1) % 2 == 1, np.diff(offsets))
        for side, vocab, mine in (("source", config.src_vocab_size, ~is_target),
                                  ("target", config.tgt_vocab_size, is_target)):
            top = int(np.max(ids, where=mine, initial=0)) if mine.any() else -1
            if top >= vocab:
                raise ValueError(f"data: {side} token id {top} is outside the model's {side} vocabulary "
                                 f"({side[:3]}_vocab_size={vocab}); is this the model's tokenizer?")
        return PairCorpus(ids, offsets, self.seq_len, opts.eval_sequences, opts.seed,
                          block=opts.batch_size * ctx.world, source=source)

    def _build_model(self, model_cls, weights):
        opts, device = self.opts, self.ctx.device
        torch.manual_seed(opts.seed)  # random initialisation is reproducible (and equal on every rank)
        source = self.resume or weights
        if source is not None:
            model = model_cls.from_pretrained(source, dtype=torch.float32, device=device)
        else:
            self.config.dtype = torch.float32
            with torch.device(device):
                model = model_cls(self.config)
        if self.family.prepare is not None:
            self.family.prepare(model, opts)
        if opts.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        return wrap(model, self.ctx, opts.fsdp, unused_parameters=self.family.unused_parameters,
                    layer_methods=self.family.layer_methods)

    # -- the loop -----------------------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict]:
        b, w = self.opts.batch_size, self.ctx.world
        batches = []
        for m in range(self.opts.grad_accum):
            start = self.position + m * b * w + self.ctx.rank * b
            batches.append(train_batch(self.corpus, self.task, range(start, start + b), self.opts.seed))
        return batches

    def _train_step(self) -> tuple[float, float | None, int]:
        """One optimizer step on the next global batch; returns (global mean loss, gradient norm, tokens read:
        this rank's times the processes, exact for fixed-length tasks)."""
        batches = self._micro_batches()
        loss, grad_norm = self.trainer(batches, [self.task.targets(batch["labels"]) for batch in batches])
        self.position += self.opts.grad_accum * self.opts.batch_size * self.ctx.world
        return loss, grad_norm, sum(self.task.tokens(batch) for batch in batches) * self.ctx.world

    def _evaluate(self) -> float:
        """Held-out loss, token-weighted over all ranks. Every rank runs the same number of forwards (padding
        with weight-0 batches), as FSDP's collectives require."""
        opts, ctx = self.opts, self.ctx
        batches = [(b, 1.0) for b in eval_batches(self.corpus, self.task, ctx.rank, ctx.world, opts.batch_size,
                                                  opts.seed)]
        per_rank = math.ceil(math.ceil(self.corpus.n_eval / ctx.world) / opts.batch_size)
        filler = next(eval_batches(self.corpus, self.task, 0, 1, opts.batch_size, opts.seed))
        batches += [(filler, 0.0)] * (per_rank - len(batches))
        model = self.model if is_fsdp(self.model) else unwrapped(self.model)
        model.eval()
        loss_sum, terms = 0.0, 0.0
        with torch.no_grad(), self.trainer.autocast():
            for batch, weight in batches:
                n = self.task.targets(batch["labels"]) * weight
                loss = model(**{k: v.to(ctx.device) for k, v in batch.items()}).loss
                if n:  # a batch without loss terms (a filler, or no token masked) has a NaN mean
                    loss_sum += float(loss) * n
                    terms += n
        model.train()
        loss_sum, terms = ctx.sum([loss_sum, terms]).tolist()
        return loss_sum / max(terms, 1.0)

    def _save_checkpoint(self) -> None:
        ckpt.save_checkpoint(self.out / f"checkpoint-{self.step}", model=self.model, optimizer=self.trainer.optimizer,
                             scheduler=self.trainer.scheduler, scaler=self.trainer.scaler, tokenizer=self.tokenizer,
                             step=self.step, position=self.position, ctx=self.ctx,
                             extra={"seq_len": self.seq_len, "batch_size": self.opts.batch_size,
                                    "grad_accum": self.opts.grad_accum, "seed": self.opts.seed})

    def run(self) -> TrainResult:
        opts, ctx = self.opts, self.ctx
        bar = _progress(opts.max_steps, self.step, opts.progress and ctx.is_main)
        loss = eval_loss = eval_ppl = None
        try:
            while self.step < opts.max_steps:
                start = time.perf_counter()
                lr = self.trainer.scheduler.get_last_lr()[0]
                loss, grad_norm, tokens = self._train_step()
                self.step += 1
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": rate}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self.metrics.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
                last = self.step == opts.max_steps
                if last or (opts.eval_every and self.step % opts.eval_every == 0):
                    eval_loss = self._evaluate()
                    eval_ppl = math.exp(min(eval_loss, 700.0))
                    self.metrics.write({"step": self.step, "eval_loss": eval_loss, "eval_ppl": eval_ppl})
                if opts.save_every and self.step % opts.save_every == 0:
                    self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        ckpt.save_model(self.model, self.out, ctx)
        if ctx.is_main:
            self.tokenizer.save_pretrained(self.out)
        self.metrics.plot(self.out)
        ctx.barrier()
        return TrainResult(self.step, loss, eval_loss, eval_ppl, str(self.out), ctx.rank)


__all__ = ["train", "TrainResult", "TrainStep", "lr_factor", "METRICS_FILE"]
