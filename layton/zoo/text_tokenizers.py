"""Offline tokenizers for the tiny model zoo, learned deterministically from the zoo corpus.

The `tokenizers` trainers break ties between equally frequent pairs/pieces by hash-map order,
which changes from process to process, and the zoo corpus is full of exact ties. The tiny
tokenizers therefore learn their vocabularies here, in plain Python with explicit tie-breaking,
from words split by the real tokenizer's own normalizer and pre-tokenizer; the result is an
ordinary transformers tokenizer (BPE or Unigram) that loads offline.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

from layton.zoo.corpus import tokenizer_corpus

# Characters every tiny tokenizer can spell even when the corpus never shows them
# (upper case, digits, punctuation), so arbitrary LAION prompts never hit <unk>.
_ALPHABET = [chr(c) for c in range(33, 127)]

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # CLIP's context window; FluxPipeline reads tokenizer.model_max_length.


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table in byte order (the base symbols of byte-level BPE)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def pretokenized_words(backend, lines: list[str]) -> Counter:
    """Word frequencies as the tokenizer `backend` (normalizer + pre-tokenizer) splits `lines`."""
    words: Counter = Counter()
    for line in lines:
        text = backend.normalizer.normalize_str(line) if backend.normalizer is not None else line
        words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return words


def bpe_vocab(base: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    """Release vocabulary order: base symbols, merged tokens in merge order, special tokens last."""
    vocab = {s: i for i, s in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def learn_bpe(words: Counter, *, end_of_word_suffix: str = "", max_merges: int = 4000) -> list[tuple[str, str]]:
    # ~1-3 s in pure Python for the zoo corpus; callers cache the result per process.
    """BPE merges (Sennrich et al.): repeatedly merge the most frequent adjacent symbol pair,
    ties broken by the pair itself, until every word is one symbol or `max_merges` is reached."""
    seqs = {}
    for word, count in sorted(words.items()):
        symbols = list(word)
        symbols[-1] += end_of_word_suffix
        seqs[tuple(symbols)] = seqs.get(tuple(symbols), 0) + count
    merges = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for seq, count in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for seq, count in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        seqs = merged
    return merges


def train_clip_tokenizer():
    """A CLIPTokenizer with a byte-level BPE ('</w>' word-end suffix) learned from the corpus.

    Vocabulary layout follows the real CLIP release: the 256 byte symbols, the same 256 with
    '</w>', then merged tokens in merge order, then <|startoftext|> and <|endoftext|> last.
    """
    from transformers import CLIPTokenizer

    merges = list(_clip_merges())
    symbols = byte_symbols()
    vocab = bpe_vocab(symbols + [s + "</w>" for s in symbols], merges, [_CLIP_BOS, _CLIP_EOS])
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,  # FLUX pads CLIP prompts with <|endoftext|>, as the release does
        unk_token=_CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    from transformers import CLIPTokenizer

    # CLIPTokenizer's own normalizer (lower-case) and pre-tokenizer split the training text
    # exactly as encoding will.
    base = CLIPTokenizer(bos_token=_CLIP_BOS, eos_token=_CLIP_EOS, pad_token=_CLIP_EOS, unk_token=_CLIP_EOS)
    words = pretokenized_words(base.backend_tokenizer, tokenizer_corpus())
    return tuple(learn_bpe(words, end_of_word_suffix="</w>"))


def train_t5_tokenizer():
    """A T5Tokenizer with a SentencePiece-style Unigram model estimated from the corpus.

    Pieces are the corpus words ('▁' word marker, log relative frequency as score) and single
    characters (scored below any word), so Viterbi segmentation prefers whole words and spells
    anything else. Layout as in T5 v1.1: <pad>=0, </s>=1, <unk>=2, pieces by descending score,
    then the 100 <extra_id_N> sentinels; encoding appends </s>.
    """
    from transformers import T5Tokenizer

    base = T5Tokenizer()  # its Metaspace pre-tokenizer splits training text as encoding will
    words = pretokenized_words(base.backend_tokenizer, tokenizer_corpus())
    total = sum(words.values())
    scores = {w: math.log(c / total) for w, c in words.items()}
    char_score = min(scores.values()) - 5.0
    for ch in ["▁", *_ALPHABET, *("▁" + c for c in _ALPHABET)]:
        scores.setdefault(ch, char_score)
    pieces = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100)


def save_clip_tokenizer_release(tokenizer, tok_dir: Path, *, with_tokenizer_json: bool) -> None:
    """Store a CLIP tokenizer as the releases do: `save_pretrained` plus vocab.json + merges.txt.

    FLUX.1-dev ships no tokenizer.json (loading then builds it from vocab + merges, the path the
    real checkpoint takes); the laion CLIP snapshots that MPS uses ship both.
    """
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tok_dir))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = "\n".join(" ".join(m) for m in model["merges"])
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")
    if not with_tokenizer_json:
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
