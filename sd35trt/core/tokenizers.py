"""Tokenizers built in code for presets (no hub here): byte-level CLIP BPE with the shipped merges, a T5
unigram over the prompt set's words, and the token limits the loop truncates at."""

from __future__ import annotations

import string

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 256



def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for byte in range(256):
        if byte not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# The tokenizers of presets are built in code (no hub), with whole-word pieces for the words of the shipped
# prompt set, so a prompt costs about as many tokens as with SD3.5's real tokenizers (one per common word), not
# one per character: truncation at 77 CLIP / 256 T5 tokens then happens where it would for real users.
TOKENIZER_WORDS = 1500
TOKENIZER_RECIPE = f"CLIP: byte-level + calibration/clip_merges.txt; T5: {TOKENIZER_WORDS} prompt-set words; v2"


def tokenizer_recipe() -> str:
    """What decides the presets' tokenizers (part of every preset's fingerprint)."""
    from sd35trt.core.artifacts import sha256_file
    from sd35trt.core.prompts import CALIBRATION_DIR, DEFAULT_PROMPTS

    return f"{TOKENIZER_RECIPE}; merges {sha256_file(CALIBRATION_DIR / 'clip_merges.txt')[:12]}; " \
           f"prompts {sha256_file(DEFAULT_PROMPTS)[:12]}"


def _prompt_words(limit: int = TOKENIZER_WORDS) -> list[str]:
    """The most frequent words of calibration/prompts.txt (ties broken alphabetically: deterministic)."""
    import collections
    import re

    from sd35trt.core.prompts import DEFAULT_PROMPTS

    counts = collections.Counter(re.findall(r"[a-z]+", DEFAULT_PROMPTS.read_text(encoding="utf-8").lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:limit]


def _clip_merges() -> list[tuple[str, str]]:
    """BPE merges learned on the shipped prompt set (``calibration/make_clip_merges.py`` writes them with
    tokenizers' own BpeTrainer and CLIP's pre-tokenization): its words become single tokens, as they mostly are
    in SD3.5's real CLIP vocabulary."""
    from sd35trt.core.prompts import CALIBRATION_DIR

    lines = (CALIBRATION_DIR / "clip_merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def build_clip_tokenizer(vocab_size: int | None = None):
    """A real ``CLIPTokenizer``: a byte-level vocabulary plus BPE merges learned on the prompt set.

    With ``vocab_size`` (the real models' 49408) the vocabulary is padded with unused pieces so token ids
    have the real range.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    for char in _byte_alphabet():
        vocab[char + "</w>"] = len(vocab)
    merges = _clip_merges()
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if vocab_size is not None:
        while len(vocab) < vocab_size - 2:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


def build_t5_tokenizer(vocab_size: int | None = None):
    """A real ``T5TokenizerFast`` (unigram) over printable characters and the prompt set's words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in string.printable[:94]] + [("▁" + c, -1.5) for c in string.ascii_letters]
    pieces += [("▁" + w, -1.0) for w in _prompt_words()]
    if vocab_size is not None:
        pieces += [(f"<unused{i}>", -100.0) for i in range(len(pieces), vocab_size)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)
