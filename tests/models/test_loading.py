"""Checkpoint loading and saving (tritonformers.models.loading) against real files written by transformers.

The checkpoints are tiny BLOOMs saved by transformers itself (tied and untied head, base model, sharded
safetensors, fp16, a pytorch_model.bin written with torch.save since transformers 5 only writes
safetensors). They are loaded into small torch modules defined here that carry BLOOM's HF parameter names,
so the tests exercise the real file formats and key conventions without depending on the family code.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, BloomConfig, BloomForCausalLM, BloomModel  # noqa: E402

from tritonformers.models.loading import (  # noqa: E402
    ConfigBase, PreTrainedMixin, checkpoint_dtype, checkpoint_files, load_into, load_state_dict, parse_size,
    read_config, save_state_dict, write_config,
)

TINY = dict(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)


# ----------------------------------------------------------------------------------------------------------
# Tiny modules with BLOOM's HF names (what the family code will look like, minus the maths)
# ----------------------------------------------------------------------------------------------------------

class TinyBloomConfig(ConfigBase):
    model_type = "bloom"
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}
    defaults = dict(vocab_size=250880, hidden_size=64, n_layer=2, n_head=8, layer_norm_epsilon=1e-5,
                    initializer_range=0.02, use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                    apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0,
                    pretraining_tp=1, slow_but_exact=False, tie_word_embeddings=True)


class _Attention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)


class _MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(h, 4 * h)
        self.dense_4h_to_h = nn.Linear(4 * h, h)


class _Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.self_attention = _Attention(h)
        self.post_attention_layernorm = nn.LayerNorm(h)
        self.mlp = _MLP(h)


class TinyBloomModel(PreTrainedMixin, nn.Module):
    config_class = TinyBloomConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.word_embeddings_layernorm = nn.LayerNorm(h)
        self.h = nn.ModuleList(_Block(h) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(h)
        # computed here, never saved (like ALiBi slopes); must survive from_pretrained
        self.register_buffer("slopes", torch.arange(1, config.n_head + 1, dtype=torch.float32), persistent=False)
        self.tie_weights()


class TinyBloomForCausalLM(PreTrainedMixin, nn.Module):
    config_class = TinyBloomConfig
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = TinyBloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()


class TinyBloomForClassification(PreTrainedMixin, nn.Module):
    config_class = TinyBloomConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = TinyBloomModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)


class QuantConfig(ConfigBase):
    model_type = "tinyquant"
    defaults = dict(hidden_size=8, tie_word_embeddings=False)


class TinyQuant(PreTrainedMixin, nn.Module):
    """Float parameters beside integer and float persistent buffers (I-BERT's layout)."""

    config_class = QuantConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.dense = nn.Linear(h, h)
        self.register_buffer("weight_integer", torch.zeros(h, h, dtype=torch.int8))
        self.register_buffer("x_max", torch.full((1,), 1e-5))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints written by transformers
# ----------------------------------------------------------------------------------------------------------

def _hf_save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    torch.manual_seed(1234)
    root = tmp_path_factory.mktemp("checkpoints")
    lm = BloomForCausalLM(BloomConfig(**TINY)).eval()
    base = BloomModel(BloomConfig(**TINY)).eval()
    untied = BloomForCausalLM(BloomConfig(**TINY, tie_word_embeddings=False)).eval()
    ns = SimpleNamespace(root=root, lm=lm, base=base, untied=untied)
    ns.lm_dir = _hf_save(lm, root / "lm")
    ns.base_dir = _hf_save(base, root / "base")
    ns.untied_dir = _hf_save(untied, root / "untied")
    ns.sharded_dir = _hf_save(lm, root / "sharded", max_shard_size="20KB")
    ns.fp16_dir = _hf_save(copy.deepcopy(lm).half(), root / "fp16")
    ns.bin_dir = root / "bin"
    lm.config.save_pretrained(ns.bin_dir)
    torch.save(lm.state_dict(), ns.bin_dir / "pytorch_model.bin")  # both tied names, shared storage
    return ns


def _assert_same(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), k


# ----------------------------------------------------------------------------------------------------------
# config.json and ConfigBase
# ----------------------------------------------------------------------------------------------------------

def test_read_config_errors(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FileNotFoundError, match="never downloads") as e:
        read_config("bigscience/bloom-560m")
    assert "bigscience/bloom-560m" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        read_config(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        read_config(tmp_path / "file.txt")
    with pytest.raises(TypeError, match="path"):
        read_config(42)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TinyBloomForCausalLM.from_pretrained("bigscience/bloom-560m")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_state_dict(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        read_config(tmp_path)


def test_write_read_config_round_trip(tmp_path):
    d = {"a": 1, "inf": float("inf"), "ninf": float("-inf"), "nested": {"x": [1.5, float("nan")]},
         "dtype": torch.bfloat16}
    file = write_config(d, tmp_path / "new" / "dir")  # os.PathLike, created
    raw = json.loads(file.read_text())
    assert raw["inf"] == {"__float__": "Infinity"} and raw["dtype"] == "bfloat16"
    back = read_config(str(tmp_path / "new" / "dir"))
    assert back["inf"] == float("inf") and back["ninf"] == float("-inf")
    assert back["nested"]["x"][0] == 1.5 and back["nested"]["x"][1] != back["nested"]["x"][1]  # NaN
    with pytest.raises(NotADirectoryError):
        write_config(d, file)


def test_config_defaults_aliases_and_extras():
    c = TinyBloomConfig(n_embed=32, num_hidden_layers=3, my_field={"k": [1, 2]}, torch_dtype="float16")
    assert (c.hidden_size, c.n_layer, c.num_hidden_layers, c.n_head, c.num_attention_heads) == (32, 3, 3, 8, 8)
    assert c.dtype is torch.float16 and c.torch_dtype is torch.float16
    assert c.my_field == {"k": [1, 2]} and c.vocab_size == 250880
    assert c.num_labels == 2 and c.id2label == {0: "LABEL_0", 1: "LABEL_1"} and c.use_return_dict is True
    c.num_attention_heads = 4
    assert c.n_head == 4 and "num_attention_heads" not in c.to_dict()
    c.num_labels = 3
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    d = c.to_dict()
    assert d["model_type"] == "bloom" and d["dtype"] == "float16" and d["my_field"] == {"k": [1, 2]}
    assert TinyBloomConfig.from_dict(d) == c and TinyBloomConfig.from_dict(d, n_layer=5) != c
    assert repr(c).startswith("TinyBloomConfig {") and '"my_field"' in repr(c)
    # an alias beside its stored name wins, as in transformers (extra kwargs are applied last)
    assert TinyBloomConfig(n_layer=2, num_hidden_layers=7).n_layer == 7
    assert TinyBloomConfig(dtype="float32", torch_dtype="float16").dtype is torch.float32
    assert TinyBloomConfig(id2label={"0": "neg", "1": "mid", "2": "pos"}).num_labels == 3
    with pytest.raises(AttributeError):
        c.not_a_field
    with pytest.raises(ValueError, match="problem_type"):
        TinyBloomConfig(problem_type="single_label_classification", num_labels=1)
    with pytest.warns(UserWarning, match="model_type"):
        TinyBloomConfig(model_type="fsmt")
    # the generic base keeps whatever model_type the file has
    assert ConfigBase.from_dict({"model_type": "xyz", "a": 1}).to_dict()["model_type"] == "xyz"


def _hf_values(config) -> dict:
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


@pytest.mark.parametrize("extra", [
    {},
    {"id2label": {0: "neg", 1: "mid", 2: "pos"}, "dtype": "float16", "pad_token_id": 3, "my_extra": [1, 2]},
    {"tie_word_embeddings": False, "problem_type": "regression", "output_hidden_states": True,
     "dtype": "bfloat16"},
])
def test_config_round_trip_through_transformers(tmp_path, extra):
    hf = BloomConfig(**TINY, **extra)
    hf.save_pretrained(tmp_path / "hf")
    ours = TinyBloomConfig.from_pretrained(tmp_path / "hf")
    assert ours.n_layer == 2 and ours.num_labels == hf.num_labels and ours.dtype == hf.dtype
    ours.save_pretrained(tmp_path / "ours")
    assert _hf_values(AutoConfig.from_pretrained(tmp_path / "ours")) == _hf_values(hf)
    assert TinyBloomConfig.from_pretrained(tmp_path / "ours") == ours


def test_legacy_config_json(tmp_path):
    """A transformers 4.x style config.json: torch_dtype, n_embed, num_labels, and no dtype key."""
    legacy = {"model_type": "bloom", "n_embed": 16, "n_layer": 2, "num_attention_heads": 2, "vocab_size": 50,
              "torch_dtype": "float16", "num_labels": 4, "architectures": ["BloomForCausalLM"],
              "transformers_version": "4.21.0", "some_old_field": 7}
    write_config(legacy, tmp_path / "legacy")
    ours = TinyBloomConfig.from_pretrained(tmp_path / "legacy")
    assert (ours.hidden_size, ours.n_head, ours.dtype, ours.num_labels) == (16, 2, torch.float16, 4)
    ours.save_pretrained(tmp_path / "ours")
    written = read_config(tmp_path / "ours")
    assert written["dtype"] == "float16" and "torch_dtype" not in written and written["some_old_field"] == 7
    assert _hf_values(AutoConfig.from_pretrained(tmp_path / "ours")) == _hf_values(
        AutoConfig.from_pretrained(tmp_path / "legacy"))


# ----------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------

def test_load_state_dict_formats(ck):
    expected = {k: v for k, v in ck.lm.state_dict().items() if k != "lm_head.weight"}
    _assert_same(load_state_dict(ck.lm_dir), expected)
    files = checkpoint_files(ck.sharded_dir)
    assert len(files) > 1 and all(f.name.startswith("model-0000") for f in files)
    _assert_same(load_state_dict(str(ck.sharded_dir)), expected)
    _assert_same(load_state_dict(ck.bin_dir), ck.lm.state_dict())
    _assert_same(load_state_dict(ck.base_dir), ck.base.state_dict())
    # one file may be given directly
    _assert_same(load_state_dict(ck.lm_dir / "model.safetensors"), expected)


def test_sharded_bin_and_precedence(ck, tmp_path):
    sd = ck.lm.state_dict()
    keys = sorted(sd)
    d = tmp_path / "binshards"
    d.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[:5], keys[5:]]):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same(load_state_dict(d), sd)
    # safetensors first: a model.safetensors beside the .bin wins
    save_file({"only": torch.ones(2)}, str(d / "model.safetensors"))
    assert list(load_state_dict(d)) == ["only"]
    # a shard the index names but that is gone
    (d / "model.safetensors").unlink()
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        load_state_dict(d)


def test_load_state_dict_dtype_keeps_integers(tmp_path):
    save_file({"w": torch.randn(3, 4), "q": torch.randint(-128, 127, (3, 4), dtype=torch.int8),
               "idx": torch.arange(4), "h": torch.randn(2).bfloat16()}, str(tmp_path / "model.safetensors"))
    sd = load_state_dict(tmp_path, dtype=torch.float16, device="cpu")
    assert (sd["w"].dtype, sd["q"].dtype, sd["idx"].dtype, sd["h"].dtype) == (
        torch.float16, torch.int8, torch.int64, torch.float16)
    assert load_state_dict(tmp_path, dtype="float32")["h"].dtype == torch.float32
    assert load_state_dict(tmp_path)["h"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_state_dict(tmp_path, dtype="float17")


@pytest.mark.cuda
def test_load_state_dict_device(ck):
    sd = load_state_dict(ck.lm_dir, device="cuda", dtype=torch.bfloat16)
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in sd.values())
    model = TinyBloomForCausalLM.from_pretrained(ck.lm_dir, device="cuda")
    assert model.device.type == "cuda" and model.transformer.slopes.is_cuda


def test_checkpoint_dtype_matches_transformers(ck, tmp_path):
    # config without a dtype field: the first floating tensor decides
    nodtype = tmp_path / "nodtype"
    bf16 = copy.deepcopy(ck.lm).to(torch.bfloat16)
    bf16.save_pretrained(nodtype)
    cfg = read_config(nodtype)
    cfg.pop("dtype")
    write_config(cfg, nodtype)
    legacy = tmp_path / "legacy"  # transformers 4's torch_dtype key
    ck.lm.save_pretrained(legacy)
    cfg = read_config(legacy)
    cfg["torch_dtype"] = cfg.pop("dtype")
    write_config(cfg, legacy)
    for d, want in [(ck.lm_dir, torch.float32), (ck.fp16_dir, torch.float16), (nodtype, torch.bfloat16),
                    (legacy, torch.float32), (ck.bin_dir, torch.float32)]:
        assert checkpoint_dtype(d) == want, d
        assert BloomForCausalLM.from_pretrained(d).dtype == want, d
    assert checkpoint_dtype({"a": torch.zeros(2, dtype=torch.int8), "b": torch.zeros(2, dtype=torch.float16)}) \
        == torch.float16
    assert checkpoint_dtype({"a": torch.zeros(2, dtype=torch.int8)}) == torch.float32
    assert checkpoint_dtype(TinyBloomConfig(torch_dtype="bfloat16")) == torch.bfloat16
    assert checkpoint_dtype({"torch_dtype": "float16"}) == torch.float16
    assert checkpoint_dtype(TinyBloomConfig()) is None


def test_parse_size():
    assert parse_size("20KB") == 20_000 and parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5mb") == 1_500_000 and parse_size(123) == 123 and parse_size("100") == 100
    for bad in ["5 parsecs", "GB", "-1KB"]:
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_size(0)
    with pytest.raises(TypeError):
        parse_size(1.5)


def test_save_state_dict_dedupes_and_shards(tmp_path):
    emb = torch.randn(10, 4)
    big = torch.randn(6, 4)
    sd = {"transformer.word_embeddings.weight": emb, "lm_head.weight": emb, "a": big[:3], "b": big[3:],
          "t": torch.randn(4, 3).t(), "i": torch.arange(5, dtype=torch.int32)}
    file = save_state_dict(sd, tmp_path / "one", tied_keys=["lm_head.weight"])
    assert file.name == "model.safetensors"
    with safe_open(str(file), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(set(sd) - {"lm_head.weight"})
    back = load_state_dict(tmp_path / "one")
    for k in back:
        assert torch.equal(back[k], sd[k]), k
    # without tied_keys the first name is kept
    save_state_dict(sd, tmp_path / "first")
    assert "lm_head.weight" not in load_state_dict(tmp_path / "first")
    # sharding, then a re-save without sharding removes the stale shards and index
    index = save_state_dict(sd, tmp_path / "one", max_shard_size=100, tied_keys=["lm_head.weight"])
    meta = json.loads(index.read_text())
    shards = sorted(p.name for p in (tmp_path / "one").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(meta["weight_map"].values())) == shards
    assert meta["metadata"]["total_size"] == sum(sd[k].numel() * sd[k].element_size() for k in meta["weight_map"])
    assert not (tmp_path / "one" / "model.safetensors").exists()
    _assert_same(load_state_dict(tmp_path / "one"), {k: sd[k] for k in meta["weight_map"]})
    save_state_dict(sd, tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="meta"):
        save_state_dict({"m": torch.empty(2, device="meta")}, tmp_path / "meta")
    with pytest.raises(TypeError, match="not a tensor"):
        save_state_dict({"m": 3}, tmp_path / "meta")


# ----------------------------------------------------------------------------------------------------------
# load_into: key mapping, tied weights, errors
# ----------------------------------------------------------------------------------------------------------

def _tiny_lm(**kw):
    return TinyBloomForCausalLM(TinyBloomConfig(**TINY, **kw))


def _tied(model):
    return model.all_tied_weights_keys


def test_load_into_task_and_base_checkpoints(ck):
    want = ck.lm.state_dict()
    for src in [ck.lm_dir, ck.sharded_dir, ck.bin_dir]:
        model = _tiny_lm()
        report = load_into(model, load_state_dict(src), prefix="transformer", tied=_tied(model))
        assert report.missing == [] and report.unexpected == []
        _assert_same(model.state_dict(), want)
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
    # task model <- base checkpoint: prefix added, lm_head from the embeddings
    model = _tiny_lm()
    report = load_into(model, load_state_dict(ck.base_dir), prefix="transformer", tied=_tied(model))
    assert report.tied == ["lm_head.weight"] and report.missing == [] and report.unexpected == []
    assert torch.equal(model.lm_head.weight, ck.base.word_embeddings.weight)
    _assert_same(model.transformer.state_dict(), ck.base.state_dict())
    # base model <- task checkpoint with an untied head: prefix dropped, head keys ignored
    base = TinyBloomModel(TinyBloomConfig(**TINY))
    report = load_into(base, load_state_dict(ck.untied_dir), prefix="transformer")
    assert report.ignored == ["lm_head.weight"] and report.unexpected == [] and report.missing == []
    _assert_same(base.state_dict(), ck.untied.transformer.state_dict())
    # base <- base
    base = TinyBloomModel(TinyBloomConfig(**TINY))
    load_into(base, load_state_dict(ck.base_dir), prefix="transformer")
    _assert_same(base.state_dict(), ck.base.state_dict())


def test_load_into_untied_and_symmetric_tie(ck):
    model = _tiny_lm(tie_word_embeddings=False)
    assert _tied(model) == {}
    load_into(model, load_state_dict(ck.untied_dir), prefix="transformer", tied=_tied(model))
    _assert_same(model.state_dict(), ck.untied.state_dict())
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight
    # the head present, the embedding absent: filled the other way round (transformers ties symmetrically)
    sd = load_state_dict(ck.bin_dir)
    emb = sd.pop("transformer.word_embeddings.weight")
    model = _tiny_lm()
    report = load_into(model, sd, prefix="transformer", tied=_tied(model))
    assert report.tied == ["transformer.word_embeddings.weight"]
    assert torch.equal(model.transformer.word_embeddings.weight, emb)


def test_load_into_missing_and_unexpected_messages(ck):
    model = _tiny_lm(tie_word_embeddings=False)
    before = copy.deepcopy(model.state_dict())
    sd = load_state_dict(ck.base_dir)
    sd["transformer.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_into(model, sd, prefix="transformer", tied=_tied(model))
    msg = str(e.value)
    assert "TinyBloomForCausalLM" in msg and "1 missing key" in msg and "'lm_head.weight'" in msg
    assert "1 unexpected key" in msg and "'transformer.extra.weight'" in msg
    _assert_same(model.state_dict(), before)  # nothing loaded when it raises
    report = load_into(model, sd, prefix="transformer", tied=_tied(model), strict=False)
    assert report.missing == ["lm_head.weight"] and report.unexpected == ["transformer.extra.weight"]
    assert torch.equal(model.transformer.ln_f.weight, ck.base.ln_f.weight)
    # ignore patterns
    report = load_into(model, sd, prefix="transformer", ignore_unexpected=[r"\.extra\."],
                       ignore_missing=[r"^lm_head\."])
    assert report.unexpected == [] and report.missing == [] and report.ignored == ["transformer.extra.weight"]
    # many missing keys: the first ten, then a count
    n = len(model.state_dict())
    with pytest.raises(ValueError, match=rf"(?s){n} missing key.*and {n - 10} more"):
        load_into(model, {}, prefix="transformer")


def test_load_into_shape_mismatch(ck):
    model = TinyBloomForCausalLM(TinyBloomConfig(**{**TINY, "vocab_size": 51}))
    with pytest.raises(ValueError) as e:
        load_into(model, load_state_dict(ck.base_dir), prefix="transformer", tied=_tied(model), strict=False)
    msg = str(e.value)
    assert "'word_embeddings.weight'" in msg and "(50, 16)" in msg and "(51, 16)" in msg
    assert "transformer.word_embeddings.weight" in msg


def test_load_into_non_persistent_buffers(ck):
    model = _tiny_lm()
    assert "transformer.slopes" not in model.state_dict()
    sd = load_state_dict(ck.lm_dir)
    sd["transformer.slopes"] = torch.full((2,), 7.0)  # a stale copy of a computed buffer
    sd["transformer.h.0.position_ids"] = torch.arange(4)  # not a buffer of ours: still unexpected
    with pytest.raises(ValueError, match="position_ids") as e:
        load_into(model, sd, prefix="transformer", tied=_tied(model))
    assert "slopes" not in str(e.value)
    del sd["transformer.h.0.position_ids"]
    report = load_into(model, sd, prefix="transformer", tied=_tied(model))
    assert report.ignored == ["transformer.slopes"] and model.transformer.slopes.tolist() == [1.0, 2.0]


# ----------------------------------------------------------------------------------------------------------
# PreTrainedMixin: from_pretrained / save_pretrained
# ----------------------------------------------------------------------------------------------------------

def test_from_pretrained_all_formats(ck):
    for src in [ck.lm_dir, ck.sharded_dir, ck.bin_dir, ck.base_dir]:
        model = TinyBloomForCausalLM.from_pretrained(src)
        assert not model.training and model.dtype == torch.float32
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
        assert model.transformer.slopes.tolist() == [1.0, 2.0]
        assert all(not t.is_meta for t in model.state_dict().values())
        hf = ck.base if src == ck.base_dir else ck.lm.transformer
        _assert_same(model.transformer.state_dict(), hf.state_dict())
    base = TinyBloomModel.from_pretrained(ck.untied_dir)
    _assert_same(base.state_dict(), ck.untied.transformer.state_dict())
    assert base.base_model is base and TinyBloomForCausalLM.from_pretrained(ck.lm_dir).base_model.ln_f is not None


def test_from_pretrained_dtype(ck):
    half = TinyBloomForCausalLM.from_pretrained(ck.fp16_dir)  # None = the checkpoint's dtype
    assert half.dtype == torch.float16 and half.config.dtype == torch.float16
    assert half.transformer.slopes.dtype == torch.float32  # built in fp32 by the module itself
    hf_half = BloomForCausalLM.from_pretrained(ck.fp16_dir)
    _assert_same(half.transformer.state_dict(), hf_half.transformer.state_dict())
    up = TinyBloomForCausalLM.from_pretrained(ck.fp16_dir, dtype=torch.float32)
    assert up.dtype == torch.float32 and torch.equal(up.lm_head.weight, half.lm_head.weight.float())
    down = TinyBloomForCausalLM.from_pretrained(ck.lm_dir, dtype="float16")
    assert torch.equal(down.lm_head.weight, ck.lm.lm_head.weight.half())
    assert TinyBloomForCausalLM.from_pretrained(ck.lm_dir, dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="floating"):
        TinyBloomForCausalLM.from_pretrained(ck.lm_dir, dtype=torch.int8)


def test_from_pretrained_keeps_integer_buffers(tmp_path):
    model = TinyQuant(QuantConfig())
    with torch.no_grad():
        model.weight_integer.copy_(torch.randint(-128, 127, (8, 8), dtype=torch.int8))
        model.x_max.fill_(3.5)
    model.save_pretrained(tmp_path)
    assert read_config(tmp_path)["architectures"] == ["TinyQuant"]
    loaded = TinyQuant.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.weight_integer.dtype == torch.int8 and torch.equal(loaded.weight_integer, model.weight_integer)
    assert loaded.dense.weight.dtype == torch.float16 and loaded.x_max.dtype == torch.float16
    assert torch.equal(loaded.dense.weight, model.dense.weight.half()) and loaded.x_max.item() == 3.5


def test_from_pretrained_strict_and_missing(ck):
    with pytest.raises(ValueError, match="'score.weight'"):
        TinyBloomForClassification.from_pretrained(ck.base_dir)
    model = TinyBloomForClassification.from_pretrained(ck.base_dir, strict=False)
    assert not model.score.weight.is_meta and torch.isfinite(model.score.weight).all()
    assert model.score.weight.abs().sum() > 0  # initialised by reset_parameters
    _assert_same(model.transformer.state_dict(), ck.base.state_dict())
    # an explicit config replaces config.json and is not modified
    cfg = TinyBloomConfig(**TINY, tie_word_embeddings=False)
    model = TinyBloomForCausalLM.from_pretrained(ck.untied_dir, config=cfg)
    assert cfg.dtype is None and model.config.dtype == torch.float32
    _assert_same(model.state_dict(), ck.untied.state_dict())


def test_from_pretrained_missing_tied_pair(ck, tmp_path, recwarn):
    """Neither side of a tied pair in the checkpoint (strict=False): one fresh, shared, initialised tensor."""
    sd = {k: v for k, v in load_state_dict(ck.base_dir).items() if k != "word_embeddings.weight"}
    ck.lm.config.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"2 missing key.*'lm_head.weight', 'transformer.word_embeddings.weight'"):
        TinyBloomForCausalLM.from_pretrained(tmp_path)
    model = TinyBloomForCausalLM.from_pretrained(tmp_path, strict=False)
    emb = model.transformer.word_embeddings.weight
    assert model.lm_head.weight is emb and not emb.is_meta and emb.std() > 0.1
    assert not [w for w in recwarn if "untied" in str(w.message)]
    assert torch.equal(model.transformer.ln_f.bias, ck.base.ln_f.bias)


def test_tied_checkpoint_with_different_values_stays_untied(ck, tmp_path):
    sd = {k: v.clone() for k, v in ck.untied.state_dict().items()}
    ck.lm.config.save_pretrained(tmp_path)  # tie_word_embeddings=True
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="untied"):
        model = TinyBloomForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight
    _assert_same(model.state_dict(), ck.untied.state_dict())


@pytest.mark.parametrize("name", ["lm", "untied"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_round_trip_with_transformers(ck, tmp_path, name, shard):
    src = getattr(ck, f"{name}_dir")
    ours = TinyBloomForCausalLM.from_pretrained(src)
    out = ours.save_pretrained(tmp_path / "ours", max_shard_size=shard)
    assert (out / ("model.safetensors" if shard is None else "model.safetensors.index.json")).is_file()
    keys = set(load_state_dict(out))
    assert ("lm_head.weight" in keys) == (name == "untied")  # the tied copy is left out, as HF does
    cfg = read_config(out)
    assert cfg["architectures"] == ["TinyBloomForCausalLM"] and cfg["dtype"] == "float32"
    hf = BloomForCausalLM.from_pretrained(out)
    _assert_same(hf.state_dict(), getattr(ck, name).state_dict())
    theirs = _hf_values(BloomForCausalLM.from_pretrained(src).config)
    assert _hf_values(hf.config) == {**theirs, "architectures": ["TinyBloomForCausalLM"]}
    again = TinyBloomForCausalLM.from_pretrained(out)
    _assert_same(again.state_dict(), ours.state_dict())


def test_save_pretrained_fp16_and_errors(ck, tmp_path):
    ours = TinyBloomForCausalLM.from_pretrained(ck.lm_dir, dtype=torch.float16)
    ours.save_pretrained(tmp_path / "h")
    assert read_config(tmp_path / "h")["dtype"] == "float16" and checkpoint_dtype(tmp_path / "h") == torch.float16
    assert ours.config.architectures == ["BloomForCausalLM"]  # saving does not change the live config
    hf = BloomForCausalLM.from_pretrained(tmp_path / "h")
    assert hf.dtype == torch.float16 and torch.equal(hf.lm_head.weight, ck.lm.lm_head.weight.half())
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        ours.save_pretrained(tmp_path / "f")
    assert Path(tmp_path / "f").read_text() == "x"


# ----------------------------------------------------------------------------------------------------------
# Errors that name their cause (issue 12)
# ----------------------------------------------------------------------------------------------------------

def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(ck, tmp_path, damage):
    """A corrupt or truncated safetensors file, one shard of many, or pytorch_model.bin: the error names the file."""
    import shutil

    cases = []
    for name, src, shard in (("single", ck.lm_dir, 0), ("last_shard", ck.sharded_dir, -1),
                             ("first_shard", ck.sharded_dir, 0), ("bin", ck.bin_dir, 0)):
        d = shutil.copytree(src, tmp_path / name)
        bad = sorted(f for f in d.iterdir() if f.suffix in (".safetensors", ".bin"))[shard]
        if damage == "truncated":
            _truncate(bad)
        else:
            bad.write_bytes(b"not a weights file" * 8)
        if name == "first_shard":  # no dtype in config.json: from_pretrained probes the first shard's header
            raw = read_config(d)
            del raw["dtype"]
            write_config(raw, d)
        cases.append((d, bad))
    for d, bad in cases:
        for load in (load_state_dict, TinyBloomForCausalLM.from_pretrained):
            with pytest.raises(OSError) as e:
                load(d)
            assert str(bad) in str(e.value) and "corrupt or truncated" in str(e.value), str(e.value)


def test_checkpoint_of_another_model_type_is_an_error(ck, tmp_path):
    with pytest.raises(ValueError) as e:
        TinyQuant.from_pretrained(ck.lm_dir)  # a BLOOM checkpoint into a "tinyquant" model
    msg = str(e.value)
    assert "'bloom'" in msg and "'tinyquant'" in msg and "config.json" in msg and "TinyQuant" in msg
    from tritonformers.models.diffllama import DiffLlamaForCausalLM

    with pytest.raises(ValueError, match=r"model_type 'bloom'.*DiffLlamaForCausalLM.*model_type 'diffllama'"):
        DiffLlamaForCausalLM.from_pretrained(ck.lm_dir)
    # the explicit override: a config given by the caller (transformers' warning, then it loads what fits)
    with pytest.warns(UserWarning, match="model_type"):
        cfg = QuantConfig.from_pretrained(ck.lm_dir)
    with pytest.raises(ValueError, match="missing key"):  # now the keys decide, as they would in HF
        TinyQuant.from_pretrained(ck.lm_dir, config=cfg)
    # no model_type in config.json: nothing to check (older or hand-written configs)
    raw = read_config(ck.lm_dir)
    del raw["model_type"]
    write_config(raw, tmp_path)
    (tmp_path / "model.safetensors").write_bytes((ck.lm_dir / "model.safetensors").read_bytes())
    assert TinyBloomForCausalLM.from_pretrained(tmp_path).lm_head.weight.shape == (50, 16)
