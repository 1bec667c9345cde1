"""The ``tritonformers`` command line: ``tritonformers bench | generate`` (more join as their models land).

Adding a command: write ``_add_<name>(subparsers)``, which builds its parser with
``subparsers.add_parser(...)`` and sets ``func`` to a ``_cmd_<name>(args) -> int`` (the exit status), and
list it in :data:`SUBCOMMANDS`. Every command then gets ``--debug`` and the error handling of
:func:`run_command`:

* mistakes in the command line or its inputs (a missing file, a bad value) are *user errors*: one line
  ``error: <message>`` on stderr and exit status 2. A command raises :class:`UserError` for its own checks;
  the library's ValueError and OSError (FileNotFoundError, ...) count too, since they name their cause;
* anything else is a bug: one line as well (exit status 1), asking for ``--debug``;
* ``--debug`` (before or after the command name) lets the exception through, with its traceback.

Option values are checked while parsing, by the ``type=`` helpers below (:func:`positive_int`,
:func:`probability`, :func:`checkpoint_dir`, :func:`device`, ...), so a bad value fails before anything
is loaded, with argparse's message naming the option (also one line: see :class:`_Parser`). Heavy imports
(torch, the models, the benchmark cases) happen inside the command, so ``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import __version__


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as ``error: <message>``, exit status 2."""


# What counts as a user error besides UserError: the library's validation errors name the argument, file,
# key or model type at fault (OSError covers FileNotFoundError, NotADirectoryError, unreadable weights).
USER_ERRORS = (UserError, ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error format: one line ``error: ...`` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return text or type(error).__name__


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)`` with the command line's error handling (see the module docstring); its exit status."""
    if getattr(args, "debug", False):
        return func(args)
    try:
        return func(args)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback on request
        print(f"error: internal error, {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback "
              "and please report it)", file=sys.stderr)
        return 1


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before the command name
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full Python traceback instead of one line")


# ----------------------------------------------------------------------------------------------------------
# Option types (``type=`` of add_argument): a bad value is argparse's one-line error naming the option
# ----------------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def probability(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _parse(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def checkpoint_dir(text: str) -> str:
    """A local directory holding config.json (nothing is ever downloaded)."""
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a checkpoint directory holding config.json")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r} (a local checkpoint directory is needed; "
                                         "nothing is downloaded)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"no config.json in {text!r} (a local checkpoint directory is needed)")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory" if os.path.isfile(text)
                                         else f"no such directory: {text!r}")
    return text


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ... (imports torch)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here (torch "
                                             f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    return text


def checkpoint_model_type(path: str, supported: dict, command: str) -> str:
    """The ``model_type`` of the checkpoint at ``path``, which must be a key of ``supported``."""
    from .models.loading import read_config

    model_type = read_config(path).get("model_type")
    if model_type not in supported:
        raise UserError(f"{command} supports model types {sorted(supported)}; {os.path.join(path, 'config.json')} "
                        f"says {model_type!r}")
    return model_type


# ----------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------

def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmarks import registry, runner

    cases = registry.select(args.filter)
    if not cases or args.list:  # a run reports import failures itself, in its output and its JSON
        for module, err in registry.load_cases().items():
            print(f"warning: benchmark module {module} failed to import: {err}", file=sys.stderr)
    if not cases:
        print(f"no benchmark case matches {args.filter}; `tritonformers bench --list` shows them", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.cpu
    dtype = runner.parse_dtype(args.dtype) if args.dtype else None
    if args.list:
        _print_cases(cases, runner.Settings(cuda=cuda, dtype=dtype))
        return 0
    result = runner.run(cases, out_dir=args.out, dtype=dtype, quick=args.quick, cuda=cuda)
    bad = [r for r in result.data["results"]
           if r["impl"] == registry.OURS and (r.get("error") or r.get("matches_baseline") is False)]
    for r in bad:
        what = r["error"] or f"does not match {r['checked_against']} (rel err {r['max_rel_err']})"
        print(f"FAILED: {r['case']}{'/' + r['variant'] if r.get('variant') else ''} tritonformers: {what}",
              file=sys.stderr)
    if result.data.get("interrupted"):
        return 130
    return 1 if bad else 0


def _print_cases(cases, settings) -> None:
    """One line per case with the shape and dtype a run here uses (saying which set); the GPU's below on CPU."""
    from .benchmarks import runner

    print(f"shapes: {runner.shape_set(settings)}")
    width = max(len(c.id) for c in cases)
    for case in cases:
        print(f"{case.id:<{width}}  {runner.shape_text(case, settings)} [{case.bound}]  "
              f"impls: {', '.join(impl.name for impl in case.impls)}")
        if case.description:
            print(f"{'':<{width}}  {case.description}")
        if not settings.cuda:
            gpu = runner.Settings(cuda=True, dtype=settings.dtype)
            print(f"{'':<{width}}  on CUDA: {runner.shape_text(case, gpu)}")


def _add_bench(subparsers) -> None:
    from .benchmarks.runner import DTYPE_NAMES  # light: no triton, no kernels

    p = subparsers.add_parser(
        "bench", help="time the kernels against their baselines",
        description="Time each registered case (ours and its baselines, forward and forward+backward), check "
                    "ours against the first baseline, and write <out>/<device>-<YYYYMMDD-HHMM>.json, .md and "
                    ".png. Without CUDA it runs tiny shapes whose timings mean nothing. Exit status 1 when one "
                    "of our rows failed or did not match its baseline.")
    p.add_argument("--filter", nargs="+", action="extend", metavar="PATTERN",
                   help="run only cases whose id (name or name/variant) matches one of these regular "
                        "expressions or substrings")
    p.add_argument("--list", action="store_true",
                   help="list the (filtered) cases with the shapes a run here uses (with --cpu: the CPU ones) and exit")
    p.add_argument("--out", metavar="DIR",
                   help="directory for the result files (default: bench/results inside a tritonformers checkout, "
                        "else $XDG_DATA_HOME/tritonformers/bench, by default ~/.local/share/tritonformers/bench)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), metavar="DTYPE",
                   help="override the float dtype of every float case (default: each case's, bfloat16 on CUDA; "
                        "float32 without CUDA); one of " + ", ".join(sorted(DTYPE_NAMES)))
    p.add_argument("--cpu", action="store_true",
                   help="run the tiny CPU shapes on the CPU even when CUDA is present (a smoke run)")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing (do_bench warmup 25 ms / rep 100 ms; 3 CPU repeats)")
    p.set_defaults(func=_cmd_bench)


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------

# Families `generate` can run: model_type in config.json -> (model module, class, tokenizer module, class).
GENERATORS = {
    "bloom": ("tritonformers.models.bloom", "BloomForCausalLM", "tritonformers.tokenizers.bloom", "BloomTokenizer"),
    "diffllama": ("tritonformers.models.diffllama", "DiffLlamaForCausalLM", "tritonformers.tokenizers.llama",
                  "LlamaTokenizer"),
    "reformer": ("tritonformers.models.reformer", "ReformerModelWithLMHead", "tritonformers.tokenizers.reformer",
                 "ReformerTokenizer"),
}


def _cmd_generate(args: argparse.Namespace) -> int:
    import importlib

    import torch

    sampling = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None]
    if sampling and not args.do_sample:  # greedy and beam search ignore them: say so rather than drop them
        raise UserError(f"{', '.join(sampling)} only apply when sampling: add --do-sample")
    model_type = checkpoint_model_type(args.model, GENERATORS, "generate")
    model_module, model_class, tok_module, tok_class = GENERATORS[model_type]
    # the tokenizer first: it is cheap, and a missing tokenizer file should not wait for the weights
    tokenizer = getattr(importlib.import_module(tok_module), tok_class).from_pretrained(args.tokenizer or args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = getattr(importlib.import_module(model_module), model_class).from_pretrained(
        args.model, dtype=args.dtype, device=device)
    # one prompt needs no padding (Reformer's tokenizer has no pad token, and its cache no padding mask)
    batch = tokenizer(args.prompt, padding=len(args.prompt) > 1, padding_side="left", return_tensors="pt")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample)
    options.update({k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                      ("top_p", args.top_p)) if v is not None})
    out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **options)
    out = out.cpu()
    if args.format == "jsonl":
        _print_jsonl(args.prompt, batch, out, tokenizer, model.generation_config.eos_token_id)
    else:
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            print(text)
    return 0


def _print_jsonl(prompts, batch, out, tokenizer, eos) -> None:
    """One JSON object per prompt: the prompt's ids (padding removed), the new ids up to and including the
    first eos (what follows it is padding), and their texts, so that any character, newlines included, is
    unambiguous."""
    import json

    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    P = batch["input_ids"].shape[1]
    for prompt, row, mask in zip(prompts, out.tolist(), batch["attention_mask"].tolist()):
        new_ids = row[P:]
        end = next((i + 1 for i, t in enumerate(new_ids) if t in eos), len(new_ids))
        new_ids = new_ids[:end]
        prompt_ids = [t for t, m in zip(row[:P], mask) if m]
        record = {"prompt": prompt, "prompt_ids": prompt_ids, "new_ids": new_ids,
                  "new_text": tokenizer.decode(new_ids, skip_special_tokens=True),
                  "text": tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)}
        print(json.dumps(record, ensure_ascii=False))


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="continue prompts with a local checkpoint",
        description="Load a local checkpoint directory (config.json, weights, tokenizer.json) and print each "
                    "prompt with its continuation: greedy by default, beam search with --num-beams, sampling "
                    "with --do-sample. Prompts are left-padded into one batch. The text output prints one "
                    "line per prompt (a continuation holding a newline spans several: use --format jsonl).")
    p.add_argument("--model", required=True, type=checkpoint_dir, metavar="DIR", help="checkpoint directory")
    p.add_argument("--tokenizer", type=existing_dir, metavar="DIR",
                   help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                   help="a prompt; repeat the option for a batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="tokens to generate (default 32)")
    p.add_argument("--num-beams", type=positive_int, default=1, metavar="N",
                   help="beam search width (default 1: greedy)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    p.add_argument("--temperature", type=positive_float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=non_negative_int, help="sample from the k most likely tokens (default 50; 0: all)")
    p.add_argument("--top-p", type=probability, help="nucleus sampling mass in [0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, help="seed torch's generator, for reproducible sampling")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text",
                   help="text: each prompt with its continuation, one per line (default); jsonl: one JSON object "
                        "per prompt with prompt_ids, new_ids (up to and including eos), new_text and text")
    p.set_defaults(func=_cmd_generate)


def _add_translate(subparsers) -> None:
    from .translate import add_parser  # light: torch is imported when the command runs

    add_parser(subparsers)


def _add_train(subparsers) -> None:
    from .training.cli import add_parser  # the flags live with the training package; argparse only, no torch

    add_parser(subparsers)


SUBCOMMANDS = [_add_bench, _add_generate, _add_translate, _add_train]  # translate: tritonformers/translate.py


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tritonformers", description="Hand-written Triton kernels for Transformer models.")
    parser.add_argument("--version", action="version", version=f"tritonformers {__version__}")
    _add_common_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")  # parsers of the class _Parser
    for add in SUBCOMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():  # every command also takes the common options after its name
        _add_common_options(sub)
    parser.command_names = list(subparsers.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tritonformers`` console script and ``python -m tritonformers``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        print(f"error: a command is needed, one of: {', '.join(parser.command_names)} (see `tritonformers --help`, "
              "`tritonformers COMMAND --help`)", file=sys.stderr)
        return 2
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
