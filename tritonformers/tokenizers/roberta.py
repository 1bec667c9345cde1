"""RoBERTa's tokenizer (I-BERT's): byte-level BPE from vocab.json + merges.txt, or from tokenizer.json.

As transformers 5's `RobertaTokenizer` does (transformers/models/roberta/tokenization_roberta.py; I-BERT
checkpoints name it), only the vocabulary and merges are read
from the files; the pipeline is always rebuilt: BPE without unk token, ByteLevel pre-tokenizer
(`add_prefix_space` from the config, default False; GPT-2 regex), ByteLevel decoder, and the template
`<s> A </s>` / `<s> A </s></s> B </s>` (RobertaProcessing with `trim_offsets`, default True). Special
tokens default to `<s>` (bos, cls), `</s>` (eos, sep), `<unk>`, `<pad>`, `<mask>`; padding on the right.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .base import TOKENIZER_FILE, BaseTokenizer, existing_file, read_bpe_file, restore_padding_truncation


class RobertaTokenizer(BaseTokenizer):
    """RoBERTa's byte-level BPE tokenizer, from vocab.json + merges.txt or tokenizer.json."""

    tokenizer_class = "RobertaTokenizer"
    default_special_tokens = {
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
    }

    @classmethod
    def _build_backend(cls, directory: str, config: dict) -> Tokenizer:
        json_path = existing_file(directory, TOKENIZER_FILE)
        saved = None
        if json_path is not None:
            vocab, merges, saved = read_bpe_file(json_path)
        else:
            vocab_path, merges_path = (existing_file(directory, name) for name in ("vocab.json", "merges.txt"))
            if vocab_path is None or merges_path is None:
                raise FileNotFoundError(
                    f"RobertaTokenizer needs {TOKENIZER_FILE}, or vocab.json and merges.txt, in {directory}"
                )
            vocab, merges = BPE.read_file(vocab_path, merges_path)
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
        add_prefix_space = bool(config.get("add_prefix_space", False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        if saved is not None:  # padding / truncation saved in the file act as defaults
            restore_padding_truncation(backend, saved.padding, saved.truncation)
        return backend

    def _post_init(self) -> None:
        # Built last, from the final ids of the separator and classifier tokens (whatever the file had).
        self._backend.post_processor = processors.RobertaProcessing(
            (self.sep_token, self.sep_token_id), (self.cls_token, self.cls_token_id),
            trim_offsets=bool(self.init_kwargs.get("trim_offsets", True)),
            add_prefix_space=bool(self.init_kwargs.get("add_prefix_space", False)),
        )


__all__ = ["RobertaTokenizer"]
