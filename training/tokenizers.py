"""Tokenizers for the models Palette trains, in the formats the released models use.

* DalleBart reads text with a byte-level BPE in BART's convention (`<s>`=0,
  `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4), saved as BartTokenizerFast saves it.
* CLIP reads text with CLIP's BPE convention (lower-cased, `</w>` word ends,
  `<|startoftext|>` / `<|endoftext|>` as the last two ids, so EOS is the largest;
  padding with the EOS id), saved as CLIPTokenizerFast saves it.

Both are trained with the `tokenizers` library on the caption corpus, so the
shipped model folders load through exactly the code paths the released ones do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def train_bart_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                         model_max_length: int = 64) -> Path:
    """Byte-level BPE with BART's special tokens; writes vocab.json, merges.txt, tokenizer.json, configs."""
    from transformers import BartTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BART_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), trim_offsets=True,
                                                      add_prefix_space=False)
    fast = BartTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                             cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                             add_prefix_space=False, model_max_length=model_max_length)
    return _save(fast, tok, out_dir)


def train_clip_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                         model_max_length: int = 32) -> Path:
    """CLIP-style BPE (lower case, `</w>` suffix, BOS/EOS specials, EOS as padding).

    The specials take the last two ids, as in CLIP's own vocabulary (49406, 49407): CLIP's text
    tower reads a caption at argmax(input_ids), which is its EOS only when EOS is the largest id.
    Anywhere else it reads the caption's largest-id word, and everything after that word is lost."""
    from transformers import CLIPTokenizerFast

    trained = _clip_text_pipeline(models.BPE(unk_token=CLIP_EOS, end_of_word_suffix="</w>"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[CLIP_BOS, CLIP_EOS], show_progress=False,
                                  end_of_word_suffix="</w>")
    trained.train_from_iterator(texts, trainer)
    # A new Tokenizer around the renumbered model: the trained one keeps its specials at the ids the
    # trainer gave them (0 and 1), and registering them anew takes the model's ids.
    tok = _clip_text_pipeline(_canonical_bpe(trained.model, [CLIP_BOS, CLIP_EOS], unk_token=CLIP_EOS,
                                             end_of_word_suffix="</w>"))
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([CLIP_BOS, CLIP_EOS])
    if tok.token_to_id(CLIP_EOS) != tok.get_vocab_size() - 1:
        raise AssertionError("the CLIP tokenizer's EOS must be its largest id")
    bos, eos = tok.token_to_id(CLIP_BOS), tok.token_to_id(CLIP_EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{CLIP_BOS} $A {CLIP_EOS}",
                                                       special_tokens=[(CLIP_BOS, bos), (CLIP_EOS, eos)])
    fast = CLIPTokenizerFast(tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS,
                             pad_token=CLIP_EOS, model_max_length=model_max_length)
    return _save(fast, tok, out_dir)


def _clip_text_pipeline(model: models.BPE) -> Tokenizer:
    """A Tokenizer around `model` that reads text as CLIP's does: NFC, one space for any run of
    whitespace, lower case, split at whitespace."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(r"\s+", " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return tok


def _canonical_bpe(model: models.BPE, specials: list[str], **options) -> models.BPE:
    """The same BPE with its ids in a fixed order: the trainer numbers the word-final characters
    ("a</w>", ...) in hash-map order, which changes from run to run, and with it every id the
    model is trained on. The characters sorted, then merges in merge order, then the specials (so the
    last special has the largest id)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = model.save(tmp)
        vocab = json.loads(Path(vocab_path).read_text())
        merges = [tuple(line.split(" ")) for line in Path(merges_path).read_text().splitlines()
                  if line and not line.startswith("#version")]
    merged = list(dict.fromkeys(a + b for a, b in merges))
    not_chars = set(merged) | set(specials)
    chars = sorted((t for t in vocab if t not in not_chars), key=lambda t: (t.endswith("</w>"), t))
    order = chars + merged + specials
    return models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=merges, **options)


def _save(fast, tok: Tokenizer, out_dir: str | Path) -> Path:
    """tokenizer.json + configs (save_pretrained) and the vocab.json / merges.txt pair older loaders read."""
    out = Path(out_dir)
    fast.save_pretrained(str(out))
    tok.model.save(str(out))
    return out
