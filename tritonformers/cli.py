"""The ``tritonformers`` command line: ``tritonformers bench | generate`` (more join as their models land).

Each subcommand is one ``_add_<name>(subparsers)`` function that builds its parser and sets ``func``;
:data:`SUBCOMMANDS` lists them, so a new one is a function and a line there. Heavy imports (torch,
the benchmark cases) happen inside the command, so ``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import registry, runner

    cases = registry.select(args.filter)
    if not cases or args.list:  # a run reports import failures itself, in its output and its JSON
        for module, err in registry.load_cases().items():
            print(f"warning: benchmark module {module} failed to import: {err}", file=sys.stderr)
    if not cases:
        print(f"no benchmark case matches {args.filter}; `tritonformers bench --list` shows them", file=sys.stderr)
        return 2
    if args.list:
        _print_cases(cases)
        return 0
    dtype = runner.parse_dtype(args.dtype) if args.dtype else None
    result = runner.run(cases, out_dir=args.out, dtype=dtype, quick=args.quick, cuda=False if args.cpu else None)
    bad = [r for r in result.data["results"]
           if r["impl"] == registry.OURS and (r.get("error") or r.get("matches_baseline") is False)]
    for r in bad:
        what = r["error"] or f"does not match {r['checked_against']} (rel err {r['max_rel_err']})"
        print(f"FAILED: {r['case']}{'/' + r['variant'] if r.get('variant') else ''} tritonformers: {what}",
              file=sys.stderr)
    if result.data.get("interrupted"):
        return 130
    return 1 if bad else 0


def _print_cases(cases) -> None:
    width = max(len(c.id) for c in cases)
    for case in cases:
        shape = " ".join(f"{k}={v}" for k, v in case.gpu_shape.items())
        dtype = str(case.dtype).replace("torch.", "")
        impls = ", ".join(impl.name for impl in case.impls)
        print(f"{case.id:<{width}}  {shape} {dtype} [{case.bound}]  impls: {impls}")
        if case.description:
            print(f"{'':<{width}}  {case.description}")


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
    p.add_argument("--list", action="store_true", help="list the (filtered) cases and exit")
    p.add_argument("--out", default="bench/results", metavar="DIR",
                   help="directory for the result files (default: bench/results under the current directory)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), metavar="DTYPE",
                   help="override the float dtype of every float case (default: each case's, bfloat16 on CUDA; "
                        "float32 without CUDA); one of " + ", ".join(sorted(DTYPE_NAMES)))
    p.add_argument("--cpu", action="store_true",
                   help="run the tiny CPU shapes on the CPU even when CUDA is present (a smoke run)")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing (do_bench warmup 25 ms / rep 100 ms; 3 CPU repeats)")
    p.set_defaults(func=_cmd_bench)


# Families `generate` can run: model_type in config.json -> (model module, class, tokenizer module, class).
GENERATORS = {
    "bloom": ("tritonformers.models.bloom", "BloomForCausalLM", "tritonformers.tokenizers.bloom", "BloomTokenizer"),
    "diffllama": ("tritonformers.models.diffllama", "DiffLlamaForCausalLM", "tritonformers.tokenizers.llama",
                  "LlamaTokenizer"),
}


def _cmd_generate(args: argparse.Namespace) -> int:
    import importlib
    import json
    import os

    import torch

    config_file = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_file):
        print(f"error: no config.json in {args.model!r} (a local checkpoint directory is needed)", file=sys.stderr)
        return 2
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in GENERATORS:
        print(f"error: generate supports model types {sorted(GENERATORS)}, the checkpoint is {model_type!r}",
              file=sys.stderr)
        return 2
    model_module, model_class, tok_module, tok_class = GENERATORS[model_type]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = getattr(importlib.import_module(model_module), model_class).from_pretrained(
        args.model, dtype=args.dtype, device=device)
    tokenizer = getattr(importlib.import_module(tok_module), tok_class).from_pretrained(args.tokenizer or args.model)
    batch = tokenizer(args.prompt, padding=True, padding_side="left", return_tensors="pt")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample)
    options.update({k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                      ("top_p", args.top_p)) if v is not None})
    out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **options)
    for text in tokenizer.batch_decode(out.cpu(), skip_special_tokens=True):
        print(text)
    return 0


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="continue prompts with a local checkpoint",
        description="Load a local checkpoint directory (config.json, weights, tokenizer.json) and print each "
                    "prompt with its continuation: greedy by default, beam search with --num-beams, sampling "
                    "with --do-sample. Prompts are left-padded into one batch.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                   help="a prompt; repeat the option for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--num-beams", type=int, default=1, metavar="N", help="beam search width (default 1: greedy)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="seed torch's generator, for reproducible sampling")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.set_defaults(func=_cmd_generate)


def _add_train(subparsers) -> None:
    from .training.cli import add_parser  # the flags live with the training package; argparse only, no torch

    add_parser(subparsers)


SUBCOMMANDS = [_add_bench, _add_generate, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonformers", description="Hand-written Triton kernels for Transformer models.")
    parser.add_argument("--version", action="version", version=f"tritonformers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tritonformers`` console script and ``python -m tritonformers``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
