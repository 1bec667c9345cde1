"""The command line: --version, --help, `bench --list`, and real `bench` runs that write DESIGN.md's result files.

The CPU runs use the tiny CPU shapes (``--cpu``, so they run the same way on a CUDA machine): one on
the PyTorch reference path (fast), one with our kernels through the Triton interpreter (when it is on,
as tests/conftest.py sets it without CUDA). The CUDA run (slow) checks the ceilings, memory and rates.
"""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys

import pytest
import torch

from tritonformers import __version__, runtime
from tritonformers.benchmarks import registry, report, runner
from tritonformers.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = ("device", "torch", "triton", "transformers", "date", "results", "ceilings", "note")
ROW_KEYS = ("case", "impl", "dtype") + report.METRIC_KEYS
NORM_IMPLS = {"layer_norm": {"tritonformers", "torch_fused", "torch_compile"},
              "rms_norm": {"tritonformers", "hf_eager", "torch_fused", "torch_compile"}}


def _is_number_or_null(v) -> bool:
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _check_schema(data: dict) -> None:
    for key in TOP_KEYS:
        assert key in data, f"top-level key {key!r} missing"
    assert data["torch"] == torch.__version__
    assert set(data["ceilings"]) >= {"copy_tbps", "bf16_tflops"}
    assert data["results"], "no result rows"
    for row in data["results"]:
        for key in ROW_KEYS:
            assert key in row, f"{row['case']} {row.get('impl')}: key {key!r} missing"
        for key in report.METRIC_KEYS:
            assert _is_number_or_null(row[key]), f"{row['case']} {row['impl']}: {key}={row[key]!r}"
        assert isinstance(row["case"], str) and isinstance(row["impl"], str) and isinstance(row["dtype"], str)
        case = next(c for c in registry.all_cases() if c.name == row["case"] and c.variant == row.get("variant"))
        shape = case.gpu_shape if data["mode"] == "cuda" else case.cpu_shape
        for key, value in shape.items():
            assert row[key] == value, f"shape field {key}"


def _run_bench(args: list[str], capsys) -> tuple[int, str, dict, str]:
    rc = main(["bench", *args])
    out = capsys.readouterr().out
    out_dir = args[args.index("--out") + 1]
    stems = {os.path.splitext(name)[0] for name in os.listdir(out_dir)}
    assert len(stems) == 1, f"expected one result stem in {out_dir}, got {stems}"
    stem = os.path.join(out_dir, stems.pop())
    with open(stem + ".json") as f:
        data = json.load(f)
    with open(stem + ".md") as f:
        table = f.read()
    slug = data["device_slug"]
    assert os.path.basename(stem).startswith(slug + "-") and len(os.path.basename(stem)) == len(slug) + 14
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(stem + ".png") > 1000
    except ImportError:
        assert "no plot written" in out
    return rc, out, data, table


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tritonformers {__version__}"


def test_help_via_python_m():
    proc = subprocess.run([sys.executable, "-m", "tritonformers", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage: tritonformers" in proc.stdout and "bench" in proc.stdout


def test_no_subcommand_says_a_command_is_needed(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a command is needed, one of: bench, generate") and err.count("\n") == 1


def test_bench_list_shows_every_case(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    ids = [case.id for case in registry.all_cases()]
    for case_id in ["norm_bandwidth/layer_norm", "norm_bandwidth/rms_norm", "fused_linear_ce", "gelu_bloom",
                    "swiglu", "rotary"]:
        assert case_id in ids
    for case_id in ids:
        assert case_id in out
    assert "T=16384 d=4096" in out and "hf_eager" in out


def test_bench_list_filter_is_a_regex_or_substring(capsys):
    assert main(["bench", "--list", "--filter", "^rotary$"]) == 0
    out = capsys.readouterr().out
    assert "rotary" in out and "norm_bandwidth" not in out
    assert main(["bench", "--list", "--filter", "gelu_bloom", "swi"]) == 0
    out = capsys.readouterr().out
    assert "gelu_bloom" in out and "swiglu" in out and "rotary" not in out
    assert main(["bench", "--list", "--filter", "("]) == 2  # not a regex, and no id contains "("


def test_bench_rejects_bad_dtype(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--dtype", "int3"])
    assert exc.value.code == 2


def test_bench_cpu_run_reference_path(tmp_path, capsys, monkeypatch):
    # ours runs the PyTorch reference path: fast. (Not by unsetting TRITON_INTERPRET: kernel modules
    # imported without it would be compiled-mode for the rest of the session.)
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "torch")
    rc, out, data, table = _run_bench(["--cpu", "--quick", "--filter", "norm_bandwidth", "--out", str(tmp_path)],
                                      capsys)
    assert rc == 0
    banner = runner.FORCED_CPU_BANNER if torch.cuda.is_available() else runner.CPU_BANNER
    assert banner in out and data["note"].startswith(banner)
    assert "| case | shape | dtype | impl |" in out  # the table is printed too
    _check_schema(data)
    assert data["mode"] == "cpu" and data["ceilings"] == {"copy_tbps": None, "bf16_tflops": None}
    rows = {(r["op"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(op, impl) for op, impls in NORM_IMPLS.items() for impl in impls}
    for (op, impl), row in rows.items():
        assert row["case"] == "norm_bandwidth" and row["dtype"] == "float32"
        assert row["error"] is None, row["error"]
        if impl == "torch_compile":
            assert row["skipped"] == "needs CUDA" and row["fwd_ms"] is None
            continue
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["tbps"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_mib"] is None and row["frac_of_ceiling"] is None  # no CUDA: no memory stats, no ceiling
        if impl == "tritonformers":
            assert row["backend"] == "torch"
            assert row["matches_baseline"] is True and row["checked_against"] in ("torch_fused", "hf_eager")
            assert set(row["speedup"]) == NORM_IMPLS[op] - {"tritonformers", "torch_compile"}
    for impl in ("tritonformers", "torch_fused", "hf_eager", "torch_compile"):
        assert f"| {impl} |" in table
    assert "rms_norm T=64 d=256" in table and banner in table


@pytest.mark.skipif(not runtime.interpreter_enabled() or torch.cuda.is_available(),
                    reason="our kernels on CPU need the Triton interpreter (TRITON_INTERPRET=1)")
def test_bench_cpu_run_triton_interpreter(tmp_path, capsys):
    rc, out, data, _ = _run_bench(["--quick", "--filter", "norm_bandwidth/rms_norm", "--out", str(tmp_path)], capsys)
    assert rc == 0
    _check_schema(data)
    assert "through the interpreter" in data["note"]
    ours = next(r for r in data["results"] if r["impl"] == "tritonformers")
    assert ours["backend"] == "triton" and ours["error"] is None
    assert ours["matches_baseline"] is True and ours["checked_against"] == "hf_eager"
    assert ours["max_rel_err"] < 1e-5


@pytest.mark.cuda
@pytest.mark.slow
def test_bench_cuda_run(tmp_path, capsys):
    rc, out, data, table = _run_bench(["--quick", "--filter", "norm_bandwidth/rms_norm", "--out", str(tmp_path)],
                                      capsys)
    _check_schema(data)
    assert data["mode"] == "cuda" and data["note"] is None
    assert data["ceilings"]["copy_tbps"] > 0.1 and data["ceilings"]["bf16_tflops"] > 1
    assert 1 < data["ceilings"]["fp32_tflops"] < data["ceilings"]["bf16_tflops"]  # IEEE, not TF32
    for row in data["results"]:
        assert row["error"] is None, f"{row['impl']}: {row['error']}"
        assert row["dtype"] == "bfloat16" and row["T"] == 16384
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["peak_mib"] > 0
        assert 0 < row["frac_of_ceiling"] < 2
    ours = next(r for r in data["results"] if r["impl"] == "tritonformers")
    assert ours["backend"] == "triton" and ours["matches_baseline"] is True
    assert rc == 0


# ----------------------------------------------------------------------------------------------------------
# User errors: one line `error: ...` on stderr, exit status 2, the traceback only with --debug
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bloom_checkpoint(tmp_path_factory):
    """A tiny random BLOOM saved by transformers, with a BLOOM-style tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    from tests.tokenizers.test_bloom_tokenizer import write_bloom_tokenizer

    path = tmp_path_factory.mktemp("bloom-cli")
    write_bloom_tokenizer(path, padding_side="left")
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=400, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.15,
                                      pad_token_id=3)
    transformers.BloomForCausalLM(config).save_pretrained(path)
    return path


def _generate_argv(path, *extra) -> list[str]:
    return ["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--device", "cpu", *extra]


def _assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("option, value, fragment", [
    ("--max-new-tokens", "0", "must be a positive integer, got 0"),
    ("--num-beams", "-1", "must be a positive integer, got -1"),
    ("--top-p", "1.5", "must be a number in [0, 1], got 1.5"),
    ("--temperature", "0", "must be a positive number, got 0"),
    ("--top-k", "x", "must be an integer, got 'x'"),
    ("--device", "gpu0", "is not a device"),
])
def test_generate_bad_option_values(bloom_checkpoint, capsys, option, value, fragment):
    with pytest.raises(SystemExit) as exc:
        main(_generate_argv(bloom_checkpoint, option, value))
    assert exc.value.code == 2
    _assert_one_line_error(capsys.readouterr().err, f"argument {option}: ", fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_cuda_without_cuda(bloom_checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_generate_argv(bloom_checkpoint, "--device", "cuda"))
    assert exc.value.code == 2
    _assert_one_line_error(capsys.readouterr().err, "argument --device: ", "CUDA is not available", "--device cpu")


def test_generate_model_path_errors(bloom_checkpoint, tmp_path, capsys):
    for path, fragment in ((bloom_checkpoint / "config.json", "is a file"), (tmp_path / "nope", "no such directory"),
                           (tmp_path, "no config.json")):
        with pytest.raises(SystemExit) as exc:
            main(_generate_argv(path))
        assert exc.value.code == 2
        _assert_one_line_error(capsys.readouterr().err, "argument --model: ", str(path), fragment)


def test_generate_checkpoint_errors_are_one_line(bloom_checkpoint, tmp_path, capsys):
    """Missing weights, no tokenizer file, an unsupported model type: `error: ...` naming the file, status 2."""
    import shutil

    no_weights = shutil.copytree(bloom_checkpoint, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = shutil.copytree(bloom_checkpoint, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    other = tmp_path / "ibert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "ibert"}))
    for path, fragments in ((no_weights, ("no weights in", str(no_weights), "model.safetensors")),
                            (no_tokenizer, ("needs tokenizer.json", str(no_tokenizer))),
                            (other, ("generate supports model types ['bloom', 'diffllama', 'reformer']", "'ibert'"))):
        assert main(_generate_argv(path)) == 2
        _assert_one_line_error(capsys.readouterr().err, *fragments)
    assert main(_generate_argv(bloom_checkpoint, "--top-p", "0.9", "--temperature", "0.7")) == 2
    _assert_one_line_error(capsys.readouterr().err, "--temperature, --top-p only apply when sampling: add --do-sample")
    # --debug, before or after the command name: the exception itself, with its traceback
    with pytest.raises(FileNotFoundError, match="no weights in"):
        main(_generate_argv(no_weights, "--debug"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        main(["--debug", *_generate_argv(no_tokenizer)])


def test_internal_errors_are_one_line_too(capsys, monkeypatch):
    from tritonformers import cli

    def broken(args):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(cli, "_cmd_bench", broken)
    assert main(["bench", "--list"]) == 1
    _assert_one_line_error(capsys.readouterr().err, "internal error, RuntimeError: something went wrong", "--debug")
    with pytest.raises(RuntimeError, match="went wrong"):
        main(["bench", "--list", "--debug"])


def test_user_error_through_the_console_entry_point(tmp_path):
    """`python -m tritonformers` as a user runs it: exactly one line on stderr, exit status 2."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    proc = subprocess.run([sys.executable, "-m", "tritonformers", "generate", "--model", str(tmp_path),
                           "--prompt", "x", "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    _assert_one_line_error(proc.stderr, "BloomTokenizer needs tokenizer.json")


# ----------------------------------------------------------------------------------------------------------
# generate --format jsonl
# ----------------------------------------------------------------------------------------------------------

def test_generate_jsonl_is_unambiguous(bloom_checkpoint, capsys):
    """A prompt holding a newline spans two lines of text output; jsonl gives one object per prompt whose ids
    are transformers' generate ids (padding removed, cut after the first eos)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(bloom_checkpoint)
    hf = transformers.BloomForCausalLM.from_pretrained(bloom_checkpoint).eval()
    prompts = ["Hello\nworld", "The quick brown fox"]
    argv = ["generate", "--model", str(bloom_checkpoint), "--max-new-tokens", "4", "--device", "cpu"]
    argv += [a for p in prompts for a in ("--prompt", p)]
    with runtime.use_backend("torch"):
        assert main(argv) == 0
        assert len(capsys.readouterr().out.splitlines()) == 3  # ambiguous: 2 prompts, 3 lines
        assert main(argv + ["--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(prompts)
    enc = tok(prompts, padding=True, return_tensors="pt")
    want = hf.generate(**enc, max_new_tokens=4, do_sample=False)
    P = enc["input_ids"].shape[1]
    for line, prompt, row, mask in zip(lines, prompts, want.tolist(), enc["attention_mask"].tolist()):
        record = json.loads(line)
        assert record["prompt"] == prompt
        assert record["prompt_ids"] == [t for t, m in zip(row[:P], mask) if m]
        new = row[P:]
        if hf.generation_config.eos_token_id in new:
            new = new[:new.index(hf.generation_config.eos_token_id) + 1]
        assert record["new_ids"] == new
        assert record["new_text"] == tok.decode(new, skip_special_tokens=True)
        assert record["text"] == tok.decode(record["prompt_ids"] + new, skip_special_tokens=True)
        assert record["text"].startswith(prompt)
