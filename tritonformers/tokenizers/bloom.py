"""BLOOM's tokenizer: its `tokenizer.json` used verbatim.

transformers 5 has no BLOOM tokenizer class: `BloomTokenizerFast` (the name in the checkpoints'
tokenizer_config.json) loads as the generic `TokenizersBackend` (`tokenizer_class_from_name` in
transformers/models/auto/tokenization_auto.py), which runs tokenizer.json as it is: byte-level BPE behind
a regex Split, no normalizer, ByteLevel decoder. Special tokens `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3
come from tokenizer_config.json; no BOS or EOS is added (the file's post-processor adds none); padding is
on the side tokenizer_config.json names (the bigscience repositories say "left"), right when it names
none, as in transformers. A batch for `generate` must be padded on the left (`padding_side="left"` in the
call, or in `from_pretrained`): generate warns about right-padded prompts.
"""

from __future__ import annotations

from .base import BaseTokenizer


class BloomTokenizer(BaseTokenizer):
    """BLOOM's byte-level BPE tokenizer, from a directory holding tokenizer.json (+ tokenizer_config.json).

    >>> tok = BloomTokenizer.from_pretrained("bloom-560m")          # doctest: +SKIP
    >>> batch = tok(["Hello", "Hello world"], padding=True, padding_side="left", return_tensors="pt")  # doctest: +SKIP
    >>> ids = model.generate(**batch, max_new_tokens=20)            # doctest: +SKIP
    """

    # The name the checkpoints write; AutoTokenizer maps it to TokenizersBackend.
    tokenizer_class = "BloomTokenizerFast"


__all__ = ["BloomTokenizer"]
