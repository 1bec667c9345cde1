"""``tritonformers train``: the flags of :class:`~tritonformers.training.options.TrainOptions`.

:func:`add_parser` builds the subcommand (no torch import, so ``--help`` stays fast); the command calls
:func:`tritonformers.training.train` with the flags as keyword arguments and exits 2 on bad input (the
message on stderr, before any training), 0 when the run completes.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import device, non_negative_int, positive_float, positive_int
from .options import DTYPES, TrainOptions

DESCRIPTION = (
    "Train a model on your text: fine-tune a checkpoint directory, or start from random weights with a config.json. "
    "Causal LMs (BLOOM, DiffLlama) pack the tokens into --seq-len windows; masked LMs (I-BERT, float or "
    "quantisation-aware) mask them as RoBERTa; Reformer trains on --seq-len tokens (its axial-position length), "
    "on raw UTF-8 bytes when no tokenizer is given (enwik8 style); translation (FSMT) reads source/target pairs "
    "(a TSV file, JSON-lines with source/target fields, or --data plus a parallel --target-data) batched by "
    "length. The text is tokenised once and cached next to the data. Writes "
    "OUT/metrics.jsonl (step, loss, lr, tokens_per_s; step, eval_loss, eval_ppl), OUT/checkpoint-<step>/ every "
    "--save-every steps (resumable with --resume), and the final model to OUT as an HF directory. Runs DDP under "
    "`torchrun --nproc_per_node N -m tritonformers train ...` (FSDP2 with --fsdp); --batch-size is per process.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = TrainOptions.__dataclass_fields__
    p = subparsers.add_parser("train", help="train or fine-tune a model on text files", description=DESCRIPTION)
    p.add_argument("--model", required=True, metavar="DIR_OR_CONFIG",
                   help="checkpoint directory to fine-tune, or a config.json to start from random weights")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a text file, a folder of text files, a JSON-lines file (--text-field), or a 1-D .npy of ids; "
                        "translation: a .tsv or JSON-lines file of pairs, or the source side of --target-data")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (final model, metrics, checkpoints)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the --model directory)")
    _int(p, "--max-steps", d, "optimizer steps")
    _int(p, "--batch-size", d, "sequences per process and micro-step")
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help=f"tokens per sequence (default: {1024} or what the model serves, if less)")
    _int(p, "--grad-accum", d, "micro-steps per optimizer step")
    p.add_argument("--lr", type=positive_float, default=d["lr"].default, metavar="LR", help="peak learning rate (default %(default)s)")
    _int(p, "--warmup-steps", d, "linear warmup steps before the cosine decay")
    _int(p, "--eval-every", d, "evaluate every N steps (0: at the last step only)")
    _int(p, "--save-every", d, "write OUT/checkpoint-<step> every N steps (0: none)")
    _int(p, "--seed", d, "seed of the data order, masking, initialisation and dropout")
    p.add_argument("--dtype", choices=DTYPES, default=d["dtype"].default,
                   help="autocast dtype (weights stay float32; float16 adds a gradient scaler; default %(default)s)")
    p.add_argument("--resume", metavar="DIR", help="continue from an OUT/checkpoint-<step> directory")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (causal LMs)")
    p.add_argument("--quant-mode", choices=["on", "off"],
                   help="I-BERT: quantisation-aware training (on) or float training (off); default: config.json's")
    _int(p, "--eval-sequences", d, "held-out sequences (at most a tenth of the corpus)")
    p.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"].default, metavar="R",
                   help="final LR as a fraction of --lr (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, metavar="W",
                   help="AdamW weight decay of the weight matrices (default %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"].default, metavar="N",
                   help="clip the gradient norm (default %(default)s; 0 disables)")
    p.add_argument("--text-field", default=d["text_field"].default, metavar="NAME",
                   help="the text field of JSON-lines records (default %(default)s)")
    p.add_argument("--target-data", metavar="PATH",
                   help="translation: the target side of --data, a parallel text file (line i translates line i)")
    p.add_argument("--source-field", default=d["source_field"].default, metavar="NAME",
                   help="translation: the source field of JSON-lines records (default %(default)s)")
    p.add_argument("--target-field", default=d["target_field"].default, metavar="NAME",
                   help="translation: the target field of JSON-lines records (default %(default)s)")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _int(p, flag: str, fields, what: str) -> None:
    default = fields[flag[2:].replace("-", "_")].default
    kind = int if flag == "--seed" else positive_int if default > 0 else non_negative_int
    p.add_argument(flag, type=kind, default=default, metavar="N", help=f"{what} (default {default})")


def options_from_args(args: argparse.Namespace) -> dict:
    names = set(TrainOptions.names())
    options = {k: v for k, v in vars(args).items() if k in names}
    options["quant_mode"] = None if args.quant_mode is None else args.quant_mode == "on"
    options["max_grad_norm"] = args.max_grad_norm or None
    options["progress"] = not args.no_progress
    return options


def run(args: argparse.Namespace) -> int:
    from . import train
    result = train(**options_from_args(args))
    if result.rank == 0 and result.eval_loss is not None:
        print(f"step {result.step}: loss {result.loss:.4f}, eval loss {result.eval_loss:.4f} "
              f"(perplexity {result.eval_ppl:.2f}); model written to {result.out}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "options_from_args", "run"]
