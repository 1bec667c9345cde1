"""A small, varied corpus shared by the tokenizer tests.

It is the training text for the tiny tokenizers the tests build on the fly and the text they encode, so
it covers what tokenizers get wrong: accents and combining marks, CJK, emoji (4-byte UTF-8), digits,
runs of punctuation, several spaces, leading/trailing spaces, newlines and tabs, special-token strings
written in the text, and the empty string.
"""

CORPUS = [
    "Hello world",
    "Hello world!",
    " Hello world",
    "hello   world  ",
    "The quick brown fox jumps over the lazy dog.",
    "It's a beautiful day; isn't it? Yes -- it is!!!",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Øresund.",
    "Cafe\u0301 with a combining accent.",
    "Zürich über Straße — Grüße aus München.",
    "Привет, как дела? Всё хорошо.",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया। यह एक परीक्षण है।",
    "你好，世界。这是一个测试。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다.",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧 family.",
    "Numbers 0 1 12 123 1234 3.14159 1,000,000 and 2024-06-01.",
    "Punctuation runs: ... !!! ??? ,,, ;;; --- ((())) [[]] {{}} <<>>",
    "Tabs\tand\ttabs\t\tdouble",
    "Line one\nLine two\n\nLine four\r\nWindows line",
    "   leading spaces and trailing spaces   ",
    "multiple     spaces      between    words",
    "Special tokens written in text: <s> and </s> and <pad> and <unk>.",
    "the fox<s>jumps</s>over",
    "<s>",
    "</s> </s>",
    "Mixed: abc123XYZ_foo-bar.baz@example.com https://example.org/path?q=1&r=2",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "a",
    " ",
    "\n",
    "",
]

# Pairs (first, second) for the pair templates and pair truncation strategies.
PAIRS = [
    ("Hello world", "How are you?"),
    ("A short one.", "A much longer second sequence that goes on and on for quite a while."),
    ("A much longer first sequence that goes on and on for quite a while, really.", "Short."),
    ("Café — naïve", "你好，世界"),
    ("", "Only the second"),
    ("Tabs\tand\nnewlines", "😀 emoji"),
]


def training_text(repeat: int = 3) -> list[str]:
    """The corpus repeated a few times, a training set for tiny BPE / sentencepiece models."""
    return [line for _ in range(repeat) for line in CORPUS if line]


def plain(value):
    """Tensors and numpy arrays as nested lists, everything else unchanged."""
    return value.tolist() if hasattr(value, "tolist") else value


def assert_same_encoding(ours, ref) -> None:
    """Our tokenizer call's output equals transformers': same keys, values, and tensor dtype/shape."""
    assert set(ours.keys()) == set(ref.keys()), (sorted(ours.keys()), sorted(ref.keys()))
    for key in ref.keys():
        mine, theirs = ours[key], ref[key]
        if hasattr(theirs, "dtype"):
            assert type(mine) is type(theirs), key
            assert mine.dtype == theirs.dtype and tuple(mine.shape) == tuple(theirs.shape), key
        assert plain(mine) == plain(theirs), key


def assert_same_call(ours, ref, *args, **kwargs) -> None:
    """Call both tokenizers the same way: equal outputs, or both raise."""
    try:
        expected = ref(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - what transformers (or its Rust backend) raises, we raise too
        try:
            ours(*args, **kwargs)
        except Exception as mine:  # noqa: BLE001
            assert type(mine) is type(error), (mine, error)
            return
        raise AssertionError(f"transformers raised {error!r}, we did not: args={args!r} kwargs={kwargs!r}") from None
    assert_same_encoding(ours(*args, **kwargs), expected)


def assert_same_behaviour(ours, ref) -> None:
    """The common battery: single texts, padded batches, truncation, pairs, tensors, decoding."""
    first, second = (list(side) for side in zip(*PAIRS))
    for text in CORPUS:
        for add_special_tokens in (True, False):
            assert_same_call(ours, ref, text, add_special_tokens=add_special_tokens)
        assert ours.tokenize(text) == ref.tokenize(text), text
    for padding in (True, "max_length"):
        for side in (None, "left", "right"):
            max_length = 48 if padding == "max_length" else None
            assert_same_call(ours, ref, CORPUS, padding=padding, padding_side=side, max_length=max_length,
                             return_tensors="pt")
            assert_same_call(ours, ref, first, second, padding=padding, padding_side=side, max_length=max_length)
    for truncation in (True, "only_first", "only_second"):
        for max_length in (3, 8):
            assert_same_call(ours, ref, CORPUS, truncation=truncation, max_length=max_length, padding=True)
            for a, b in PAIRS:
                assert_same_call(ours, ref, a, b, truncation=truncation, max_length=max_length,
                                 return_token_type_ids=True)
    assert_same_call(ours, ref, first, second, return_token_type_ids=True, return_special_tokens_mask=True,
                     return_offsets_mapping=True)
    batch = ref(CORPUS, padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        for ids in batch:
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
