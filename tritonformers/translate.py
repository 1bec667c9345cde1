"""``tritonformers translate``: translate a text file line by line with a local FSMT checkpoint.

    tritonformers translate --model DIR [--num-beams 5] [--batch-size N] [--max-new-tokens N] < in.txt > out.txt

Lines are batched by length (the longest first, so padding is small and a batch that does not fit fails
early), translated with the checkpoint's generation settings (beam search with its length penalty, say)
unless overridden, and written in input order, each as soon as every line before it is done. A blank line
gives an empty line. Standard output holds translations only: the progress bar (long inputs, or
``--progress``) and the closing rate report (sentences/s, generated tokens/s) go to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterable, TextIO

PROGRESS_MIN_LINES = 64  # inputs at least this long get a progress bar without --progress


def add_parser(subparsers) -> None:
    """Register the ``translate`` subcommand (called by tritonformers.cli)."""
    p = subparsers.add_parser(
        "translate", help="translate lines of text with a local FSMT checkpoint",
        description="Translate each line of the input (standard input or --input) with an FSMT checkpoint "
                    "directory (config.json, weights, vocab-src.json, vocab-tgt.json, merges.txt, "
                    "tokenizer_config.json) and write one line per input line, in order, to standard output "
                    "or --output. Blank lines stay blank. Progress and speed go to standard error.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--input", metavar="FILE", help="read lines from FILE (default: standard input)")
    p.add_argument("--output", metavar="FILE", help="write translations to FILE (default: standard output)")
    p.add_argument("--num-beams", type=int, metavar="N", help="beam width (default: the checkpoint's, 5 for WMT19)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="sentences per batch (default 32)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate at most per sentence (default: the checkpoint's max_length)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", help="always show the progress bar")
    progress.add_argument("--quiet", action="store_true", help="no progress bar and no closing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    error = _check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with _open_in(args.input) as source:
        lines = [line.rstrip("\r\n") for line in source]
    try:
        model, tokenizer, device = _load(args)
    except (FileNotFoundError, ValueError, ImportError) as e:  # a missing file or package, a bad config
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
               if v is not None}
    show = not args.quiet and (args.progress or len(lines) >= PROGRESS_MIN_LINES)
    start = time.perf_counter()
    with _open_out(args.output) as sink:
        tokens = translate_lines(lines, model, tokenizer, sink, batch_size=args.batch_size, device=device,
                                 progress=sys.stderr if show else None, **options)
    elapsed = max(time.perf_counter() - start, 1e-9)
    if not args.quiet:
        done = sum(1 for line in lines if line.strip())
        print(f"translated {done} sentences in {elapsed:.2f} s: {done / elapsed:.2f} sentences/s, "
              f"{tokens / elapsed:.1f} tokens/s", file=sys.stderr)
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    for name in ("num_beams", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    config = os.path.join(args.model, "config.json")
    if not os.path.isfile(config):
        return f"no config.json in {args.model!r} (a local checkpoint directory is needed)"
    with open(config, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "fsmt":
        return f"translate needs an FSMT checkpoint (model_type 'fsmt'); {args.model!r} is {model_type!r}"
    if args.input is not None and not os.path.isfile(args.input):
        return f"no such input file: {args.input!r}"
    return None


def _load(args: argparse.Namespace):
    import torch

    from .models.fsmt import FSMTForConditionalGeneration
    from .tokenizers.fsmt import FSMTTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = FSMTTokenizer.from_pretrained(args.tokenizer or args.model)
    model = FSMTForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype, device=device)
    return model, tokenizer, device


def translate_lines(lines: list[str], model, tokenizer, sink: TextIO, *, batch_size: int = 32, device=None,
                    progress: TextIO | None = None, **generate_kwargs) -> int:
    """Translate ``lines`` and write one line per input to ``sink`` in input order, flushing each finished
    prefix. Blank lines give empty lines without reaching the model. Returns the number of generated tokens
    (the returned rows' tokens after the decoder start, up to and including their </s>)."""
    import torch

    todo = [i for i, line in enumerate(lines) if line.strip()]
    encoded = dict(zip(todo, tokenizer([lines[i] for i in todo])["input_ids"])) if todo else {}  # Moses once
    order = sorted(todo, key=lambda i: (-len(encoded[i]), i))
    results: dict[int, str] = {i: "" for i, line in enumerate(lines) if not line.strip()}
    written, generated = 0, 0
    bar = _Progress(len(todo), progress)
    for batch in _chunks(order, batch_size):
        ids, mask = _right_padded([encoded[i] for i in batch], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), **generate_kwargs)
        rows = out.cpu()  # one row per sentence: translate asks for one sequence each
        generated += int((rows[:, 1:] != model.config.pad_token_id).sum())
        for i, text in zip(batch, tokenizer.batch_decode(rows, skip_special_tokens=True)):
            results[i] = text
        written = _flush(results, lines, written, sink)
        bar.update(len(batch))
    _flush(results, lines, written, sink)
    bar.close()
    return generated


def _right_padded(rows: list[list[int]], pad_id: int):
    """ids [B, L] and mask [B, L] (1 = a real token) of token lists padded on the right, as the tokenizer pads."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
    return ids, mask


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _flush(results: dict[int, str], lines: list[str], written: int, sink: TextIO) -> int:
    """Write the finished lines that follow everything already written; returns the new count."""
    while written < len(lines) and written in results:
        sink.write(results.pop(written) + "\n")
        written += 1
    sink.flush()
    return written


class _Progress:
    """A one-line progress bar on ``stream`` (nothing when None)."""

    def __init__(self, total: int, stream: TextIO | None):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.stream is None:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"sentences ({rate:.1f}/s)")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.total:
            self.stream.write("\n")
            self.stream.flush()


class _Std:
    """Context manager over a standard stream that leaves it open."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def __enter__(self) -> TextIO:
        return self.stream

    def __exit__(self, *exc) -> None:
        self.stream.flush()


def _open_in(path: str | None):
    return _Std(sys.stdin) if path is None else open(path, encoding="utf-8")


def _open_out(path: str | None):
    return _Std(sys.stdout) if path is None else open(path, "w", encoding="utf-8")
