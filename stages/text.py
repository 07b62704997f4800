"""Text processor stage core: DALL·E Mini prompt normalisation and DalleBart tokenisation.

`TextNormalizer` reproduces dalle-mini 0.1.5's prompt cleaning step by step (same
regexes, same order, same random draws), so that a prompt reaches the encoder as
the released models saw their training captions. `DalleBartTextProcessor` turns a
batch of prompts into the fixed-length id arrays DalleBart consumes, together with
the unconditional (empty prompt) rows used by super conditioning.

Pipeline of `TextNormalizer.__call__` (each step a function below, in this order):
ftfy repair -> HTML unescape (twice) -> emoji names -> ASCII transliteration ->
lower case -> <person> tokens -> wiki refs -> HTML tags -> URLs -> thousands commas
-> protect `x.y`, `'s`-style contractions and `d/d` -> word hyphens and `%&/$*`
spacing -> hashtag splitting -> `_#\\` to spaces -> quotes -> punctuation to commas
-> unprotect -> repeated characters -> merge quotes -> merge commas -> collapse
whitespace -> strip outer commas -> prefix one space.
"""

from __future__ import annotations

import html
import json
import logging
import math
import random
import threading
import re
from collections.abc import Sequence
from pathlib import Path

import emoji
import ftfy
import numpy as np
from unidecode import unidecode

logger = logging.getLogger(__name__)

WORD_FREQUENCY_FILENAME = "enwiki-words-frequency.txt"

# Lone <person> tokens (CC12M captions) become one of these, weighted by how often
# each phrase occurs in English Wikipedia.
PERSON_PHRASES = ("a person", "someone", "somebody")
PERSON_WEIGHTS = (282265, 121194, 12219)

# Cost of a substring that is not in the dictionary: +inf (the reference writes 9e999).
UNKNOWN_WORD_COST = math.inf

# Placeholders that shield characters from the punctuation step. They are made of
# letters only so that no later step touches them, and the marker never repeats a
# character four times (which the repeated-character step would collapse).
_MARK = "xtokx"
_DOT = f"{_MARK}dot{_MARK}"
_APOSTROPHE = f"{_MARK}quote{_MARK}"
_SLASH = f"{_MARK}slash{_MARK}"


def load_word_costs(path: str | Path) -> dict[str, float]:
    """Word -> cost from a frequency-sorted word list (line i, 0-based, costs log(i + 1)).

    Only the first whitespace-separated token of a line counts (the released list
    has "word count" lines). Blank lines are skipped but still take up a rank; a
    word listed twice keeps the cost of its later line.
    """
    costs: dict[str, float] = {}
    for rank, line in enumerate(Path(path).read_text(encoding="utf8").splitlines()):
        fields = line.split()
        if fields:
            costs[fields[0]] = math.log(float(rank + 1))
    return costs


class HashtagSplitter:
    """Splits a run-together hashtag body ("sunsetoverthelake") into words.

    The split minimises the total word cost (a word's cost is the log of its rank
    in a frequency list, so common words are cheap), found by dynamic programming
    over end positions in the manner of the wordninja library. Without a word list,
    the body is only cut at characters other than letters, digits and apostrophes.
    """

    _PIECE_SEPARATOR = re.compile(r"[^a-zA-Z0-9']+")

    def __init__(self, word_costs: dict[str, float] | None):
        self._costs = word_costs or None
        self._longest = max(map(len, word_costs)) if word_costs else 0

    def __call__(self, body: str) -> str:
        pieces = self._PIECE_SEPARATOR.split(body)
        if self._costs is None:
            return " ".join(p for p in pieces if p)
        return " ".join(word for piece in pieces for word in self._split(piece))

    def _best_last_word(self, text: str, best: list[float], end: int) -> tuple[float, int]:
        """Cheapest (total cost, length) of a split of text[:end], over its last word's length.

        Ties go to the shorter last word, as in the reference's min() over
        (cost, length) pairs; the sums are formed in the same order so that ties
        are the same ties.
        """
        return min(
            (best[end - length] + self._costs.get(text[end - length : end].lower(), UNKNOWN_WORD_COST), length)
            for length in range(1, min(end, self._longest) + 1)
        )

    def _split(self, text: str) -> list[str]:
        # best[i]: cost of the cheapest split of text[:i]; last[i]: its last word's length.
        best: list[float] = [0]
        last: list[int] = [0]
        for end in range(1, len(text) + 1):
            cost, length = self._best_last_word(text, best, end)
            best.append(cost)
            last.append(length)

        # Walk back from the end. A word glues onto the word after it when that one
        # is "'s", or when a digit meets a digit (so numbers stay whole); a lone
        # apostrophe never glues.
        words_reversed: list[str] = []
        end = len(text)
        while end > 0:
            word = text[end - last[end] : end]
            following = words_reversed[-1] if words_reversed else None
            if (
                word != "'"
                and following is not None
                and (following == "'s" or (word[-1].isdigit() and following[0].isdigit()))
            ):
                words_reversed[-1] = word + following
            else:
                words_reversed.append(word)
            end -= last[end]
        return words_reversed[::-1]


# --- the normalisation steps, in pipeline order -------------------------------------------


def unescape_html(t: str) -> str:
    # Twice, for captions that were escaped twice ("&amp;amp;").
    return html.unescape(html.unescape(t))


_PERSON_GROUP = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")


def replace_person_tokens(t: str, rng) -> str:
    """`<person> and <person>` -> "people"; each remaining <person>, left to right, -> a random phrase."""
    t = _PERSON_GROUP.sub(" people ", t)
    while "<person>" in t:
        phrase = rng.choices(PERSON_PHRASES, weights=PERSON_WEIGHTS)[0]
        t = t.replace("<person>", f" {phrase} ", 1)
    return t


def remove_wiki_refs(t: str) -> str:
    # A "[12]" footnote mark at the very start or very end (WIT captions).
    t = re.sub(r"\A\s*\[\d+\]", "", t)
    return re.sub(r"\[\d+\]\s*\Z", "", t)


def remove_html_tags(t: str) -> str:
    return re.sub(r"<[^<]+?>", " ", t)


def remove_urls(t: str) -> str:
    return re.sub(r"http\S+", "", t)


def remove_thousands_commas(t: str) -> str:
    # Two passes: a match consumes the digit before the next group, so one pass
    # turns "1,000,000" into "1000,000".
    for _ in range(2):
        t = re.sub(r"(\d),(\d{3})", r"\1\2", t)
    return t


def protect_kept_punctuation(t: str) -> str:
    """Hide the dots, apostrophes and slashes that survive the punctuation step."""
    t = re.sub(r"(\w)\.(\w)", rf"\1{_DOT}\2", t)  # 3.14, e.g
    t = re.sub(r"'(?=(?:[stdm]|ll|re|ve)\b)", _APOSTROPHE, t)  # it's, don't, we've
    return re.sub(r"(\d)/(\d)", rf"\1{_SLASH}\2", t)  # 12/25, 3/4


def restore_kept_punctuation(t: str) -> str:
    t = t.replace(_DOT, ".")
    t = t.replace(_APOSTROPHE, "'")
    return t.replace(_SLASH, "/")


def space_special_chars(t: str) -> str:
    t = re.sub(r"(\w)-(\w)", r"\1 \2", t)  # state-of-the-art -> state of the art
    return re.sub(r"([%&/$*])", r" \1 ", t)


def expand_hashtags(t: str, splitter: HashtagSplitter) -> str:
    return re.sub(r"#(\w+)", lambda m: splitter(m.group(1)), t)


def blank_ignored_chars(t: str) -> str:
    return re.sub(r"[_#\\]", " ", t)


def simplify_quotes(t: str) -> str:
    return re.sub(r"""['"`]""", ' " ', t)


def punctuation_to_commas(t: str) -> str:
    return re.sub(r"[()\[\].,|:;?!=+~\-/{}]", ",", t)


def collapse_repeated_chars(t: str) -> str:
    # Four or more of the same non-digit become one; three stay (roman "viii").
    return re.sub(r"(\D)(\1{3,})", r"\1", t)


def merge_quotes(t: str) -> str:
    return re.sub(r'(\s*"+\s*)+', ' " ', t)


def merge_commas(t: str) -> str:
    return re.sub(r"(\s*,+\s*)+", ", ", t)


def collapse_whitespace(t: str) -> str:
    return re.sub(r"\s+", " ", t)


def strip_outer_commas(t: str) -> str:
    t = t.strip()
    if t.endswith(","):
        t = t[:-1]
    if t.startswith(","):
        t = t[1:]
    return t.strip()


class TextNormalizer:
    """DALL·E Mini's prompt normaliser: `TextNormalizer(words_file)(prompt) -> " normalised prompt"`.

    word_frequency_file: the hashtag splitter's word list, most frequent word first
        (the released models ship `enwiki-words-frequency.txt`). When None or
        missing, hashtags are only cut at non-alphanumeric characters, and a
        warning says so.
    rng: source of the <person> replacements; anything with `.choices` like
        `random.Random`. Defaults to the `random` module itself, so `random.seed`
        reproduces the reference's draws.
    """

    def __init__(self, word_frequency_file: str | Path | None = None, rng: random.Random | None = None):
        word_costs = None
        if word_frequency_file is None:
            logger.warning(
                "no word-frequency file given: hashtags will not be split into words "
                "(pass %s to match DALL·E Mini's normalisation)", WORD_FREQUENCY_FILENAME)
        elif not Path(word_frequency_file).is_file():
            logger.warning(
                "word-frequency file %s not found: hashtags will not be split into words",
                word_frequency_file)
        else:
            word_costs = load_word_costs(word_frequency_file)
            if not word_costs:
                logger.warning("word-frequency file %s holds no words: hashtags will not be split into words",
                               word_frequency_file)
        self.word_frequency_file = Path(word_frequency_file) if word_costs else None
        self._hashtags = HashtagSplitter(word_costs)
        self._rng = rng if rng is not None else random

    def __call__(self, text: str, rng: random.Random | None = None) -> str:
        """The normalised text; `rng` (default: the normaliser's) draws the <person> replacements."""
        t = ftfy.fix_text(text)
        t = unescape_html(t)
        t = emoji.demojize(t)  # before unidecode, which would drop emoji: "🐱" -> ":cat_face:"
        t = unidecode(t)
        t = t.lower()
        t = replace_person_tokens(t, rng if rng is not None else self._rng)
        t = remove_wiki_refs(t)
        t = remove_html_tags(t)
        t = remove_urls(t)
        t = remove_thousands_commas(t)
        t = protect_kept_punctuation(t)
        t = space_special_chars(t)
        t = expand_hashtags(t, self._hashtags)
        t = blank_ignored_chars(t)
        t = simplify_quotes(t)
        t = punctuation_to_commas(t)
        t = restore_kept_punctuation(t)
        t = collapse_repeated_chars(t)
        t = merge_quotes(t)
        t = merge_commas(t)
        t = collapse_whitespace(t)
        t = strip_outer_commas(t)
        return f" {t}"


class DalleBartTextProcessor:
    """Prompts -> DalleBart encoder inputs, as dalle-mini's DalleBartProcessor.

    `processor(prompts)` returns int32 arrays of shape [len(prompts), max_text_length]:
      input_ids, attention_mask: `<s>` + BPE(normalised prompt) + `</s>`, cut to
        max_text_length with `</s>` kept last, right-padded with `<pad>` (mask 0).
      input_ids_uncond, attention_mask_uncond: the same for the raw empty string
        (not normalised, so `<s></s>`), one row per prompt.
    """

    def __init__(self, tokenizer, max_text_length: int, normalize_text: bool = True,
                 normalizer: TextNormalizer | None = None):
        if max_text_length < 2:
            raise ValueError(f"max_text_length must be >= 2 (room for <s> and </s>), got {max_text_length}")
        self.tokenizer = tokenizer
        # A fast tokenizer's padding/truncation settings are per-object state that each call
        # rewrites; concurrent callers (server threads) must not interleave.
        self._lock = threading.Lock()
        self.max_text_length = int(max_text_length)
        self.normalize_text = bool(normalize_text)
        self.normalizer = (normalizer or TextNormalizer()) if self.normalize_text else None
        uncond = self._encode([""])
        self._input_ids_uncond = uncond["input_ids"][0]
        self._attention_mask_uncond = uncond["attention_mask"][0]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, word_frequency_file: str | Path | None = None,
                        rng: random.Random | None = None) -> "DalleBartTextProcessor":
        """Tokenizer files and config.json from a DalleBart folder.

        The word list defaults to `enwiki-words-frequency.txt` inside model_dir.
        """
        from transformers import BartTokenizerFast  # heavy import, only where a tokenizer is loaded

        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: a DalleBart folder holds config.json and the tokenizer")
        config = json.loads(config_path.read_text(encoding="utf8"))
        if "max_text_length" not in config:
            raise ValueError(f"{config_path} has no max_text_length")
        # tokenizer_config.json names "DalleBartTokenizer", a BartTokenizerFast subclass
        # AutoTokenizer does not know, so the class is named here.
        tokenizer = BartTokenizerFast.from_pretrained(str(model_dir))
        normalize_text = bool(config.get("normalize_text", False))
        normalizer = None
        if normalize_text:
            if word_frequency_file is None:
                word_frequency_file = model_dir / WORD_FREQUENCY_FILENAME
            normalizer = TextNormalizer(word_frequency_file, rng=rng)
        return cls(tokenizer, config["max_text_length"], normalize_text, normalizer)

    def normalize(self, prompt: str, rng: random.Random | None = None) -> str:
        """The text the tokenizer sees for this prompt (`rng` draws any <person> replacements)."""
        return self.normalizer(prompt, rng) if self.normalize_text else prompt

    def token_count(self, prompt: str) -> int:
        """Tokens of the prompt including `<s>` and `</s>`, before truncation to max_text_length."""
        return self.normalized_token_count(self.normalize(prompt))

    def normalized_token_count(self, text: str) -> int:
        """Tokens of an already normalised text including `<s>` and `</s>`, before truncation."""
        with self._lock:
            return len(self.tokenizer(text, verbose=False)["input_ids"])

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_length)
        return {name: np.asarray(enc[name], dtype=np.int32) for name in ("input_ids", "attention_mask")}

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must hold at least one prompt, got none")
        return self.encode_normalized([self.normalize(p) for p in prompts])

    def encode_normalized(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Already normalised texts -> the encoder inputs, with one unconditional row per text."""
        out = self._encode(list(texts))
        n = len(texts)
        out["input_ids_uncond"] = np.tile(self._input_ids_uncond, (n, 1))
        out["attention_mask_uncond"] = np.tile(self._attention_mask_uncond, (n, 1))
        return out


class DrawRecorder(random.Random):
    """A seeded `random.Random` that remembers whether anything drew from it."""

    drew = False

    def random(self) -> float:
        self.drew = True
        return super().random()
