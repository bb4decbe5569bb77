"""CLIP's BPE tokenizer built offline from the vocabulary file open_clip ships.

No tokenizer can be downloaded here, and open_clip already carries CLIP's BPE merges
(`bpe_simple_vocab_16e6.txt.gz`); transformers' CLIPTokenizer reads the same vocabulary once it is
written as `vocab.json` + `merges.txt`, and then reproduces open_clip's ids exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from studio.errors import StudioError
from studio.home import atomic_write_bytes, cache_dir

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP's BPE vocabulary keeps the first 48,894 merges (49152 - 256 - 2 in open_clip's SimpleTokenizer).
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, in CLIP's vocabulary order (printable first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _open_clip_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise StudioError("open_clip is not installed; run `make install` (it ships CLIP's BPE vocabulary).")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise StudioError(f"open_clip has no {BPE_FILE} at {path}; reinstall open-clip-torch.")
    return path


def _bpe_merges_of(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-tokenized word (byte-encoded, last symbol + `</w>`)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used: set[tuple[str, str]] = set()
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), k, pair) for k, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, k, pair = min(pairs)
        if rank == len(ranks):
            break
        used.add(pair)
        symbols[k : k + 2] = ["".join(pair)]
    return used


def write_clip_tokenizer_files(folder: Path, words: tuple[str, ...] | None = None) -> Path:
    """Write CLIP's `vocab.json` and `merges.txt` into `folder` and return it.

    With `words`, a trimmed vocabulary: the 512 byte symbols plus only the merges those words use, so
    the words tokenize exactly as in CLIP and anything else falls back to shorter pieces. The shapes
    world uses it: a 64-wide text tower then needs a 40 K-parameter embedding, not a 3 M one."""
    folder = Path(folder)
    lines = gzip.open(_open_clip_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = _bytes_to_unicode()
    chars = list(byte_chars.values())
    if words is not None:
        ranks = {pair: i for i, pair in enumerate(merges)}
        byte_encoded = ["".join(byte_chars[b] for b in w.lower().encode()) for w in words if w]
        kept = set().union(*(_bpe_merges_of(w, ranks) for w in byte_encoded))
        merges = [m for m in merges if m in kept]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if words is None and len(vocab) != VOCAB_SIZE:
        raise StudioError(f"open_clip's {BPE_FILE} gave {len(vocab)} tokens, expected {VOCAB_SIZE}.")
    encoder = {token: i for i, token in enumerate(vocab)}
    atomic_write_bytes(folder / "vocab.json", json.dumps(encoder, ensure_ascii=False).encode())
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    atomic_write_bytes(folder / "merges.txt", text.encode())
    return folder


@lru_cache(maxsize=8)
def clip_tokenizer(max_length: int = 77, words: tuple[str, ...] | None = None):
    """CLIP's tokenizer (49,408 tokens, padded with `<|endoftext|>` as SD1.x does); with `words`, the
    trimmed vocabulary of `write_clip_tokenizer_files`."""
    from transformers import CLIPTokenizer

    name = "clip-tokenizer-v1"
    if words is not None:
        name = f"clip-tokenizer-trimmed-{hashlib.sha256(chr(0).join(words).encode()).hexdigest()[:12]}"
    folder = cache_dir(name)
    if not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, pad_token="<|endoftext|>",
                                         clean_up_tokenization_spaces=False)
