"""Learn the BPE merges of the presets' CLIP tokenizers from the shipped prompt set and write clip_merges.txt.

Presets have no hub to download SD3.5's tokenizers from; ``sd35trt.core.models.build_clip_tokenizer`` builds a real
``CLIPTokenizer`` from a byte-level alphabet plus these merges, so the prompt set's words are single tokens, as they
mostly are in the real CLIP vocabulary (a prompt then costs about as many tokens as for real users). tokenizers'
BpeTrainer breaks ties between equally frequent pairs in hash order, so the merges are learned once and kept in
the file: run this only to change them (it changes every preset's fingerprint).

    python calibration/make_clip_merges.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
# CLIP's own pre-tokenizer pattern (transformers' CLIPTokenizer): words, digits and punctuation runs.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def main() -> None:
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tokenizer.train_from_iterator((HERE / "prompts.txt").read_text(encoding="utf-8").splitlines(), trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (HERE / "clip_merges.txt").write_text("#version: 0.2 (BPE merges learned on calibration/prompts.txt)\n"
                                          + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} merges to {HERE / 'clip_merges.txt'}")


if __name__ == "__main__":
    main()
