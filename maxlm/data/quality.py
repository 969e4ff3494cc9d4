"""Heuristic quality filters in the style of Gopher (Rae et al. 2021, appendix A.1.1), for prose and for code.

`measure(text)` computes every statistic once; `first_failure(stats, rules)` names the first rule of a rule
set that the document breaks (rules are checked in table order, so each dropped document counts under one
rule). All thresholds live in the two tables below; docs/data.md explains them.

PROSE is Gopher's published rule set. CODE keeps only the rules that hold for source code and swaps in the
usual code heuristics (Codex, Chen et al. 2021; StarCoder, Li et al. 2023): source code is mostly
non-alphabetic words (`=`, `(`, `x[0]`), has no stop words, uses `#` for comments and repeats short lines
(`else:`, `return None`), so Gopher's alpha-word, stop-word, symbol and duplicate-line rules would drop
ordinary code. What stays for code: length bounds, generated or minified files (very long lines, few
alphanumeric characters), and gross repetition (the same long n-grams over most of the file, e.g. tables).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

BULLETS = ("•", "-", "*", "·", "‣", "▪", "◦", "●", "–")
ELLIPSES = ("...", "…")
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
TOP_NGRAMS = (2, 3, 4)
DUPLICATE_NGRAMS = (5, 6, 7, 8, 9, 10)
_PARAGRAPH = re.compile(r"\n\s*\n")
_NOT_ALNUM = re.compile(r"[\W_]+")
_ALPHA = re.compile(r"[^\W\d_]")  # a letter: a word character that is neither a digit nor '_'

# Random odd multipliers: an n-gram's key is sum_j word_id[i+j] * M[j] (mod 2^64), so equal n-grams of word
# ids get equal keys and distinct ones collide with probability ~2^-64.
_M = np.random.default_rng(20211208).integers(1, 2**63, size=max(DUPLICATE_NGRAMS), dtype=np.uint64) * 2 + 1


class Rule(NamedTuple):
  stat: str
  bound: str  # "min": drop below `value`; "max": drop above it.
  value: float

  @property
  def name(self) -> str:
    return f"{self.stat}_{self.bound}"

  def breaks(self, stats: dict) -> bool:
    v = stats[self.stat]
    return v < self.value if self.bound == "min" else v > self.value


PROSE = (  # Gopher, appendix A.1.1, as published.
  Rule("word_count", "min", 50),
  Rule("word_count", "max", 100_000),
  Rule("mean_word_length", "min", 3),
  Rule("mean_word_length", "max", 10),
  Rule("symbol_word_ratio", "max", 0.1),  # '#' or ellipses per word
  Rule("bullet_lines", "max", 0.9),
  Rule("ellipsis_lines", "max", 0.3),
  Rule("alpha_words", "min", 0.8),
  Rule("stop_words", "min", 2),
  Rule("duplicate_lines", "max", 0.3),
  Rule("duplicate_line_chars", "max", 0.2),
  Rule("duplicate_paragraphs", "max", 0.3),
  Rule("duplicate_paragraph_chars", "max", 0.2),
  Rule("top_2gram_chars", "max", 0.2),
  Rule("top_3gram_chars", "max", 0.18),
  Rule("top_4gram_chars", "max", 0.16),
  Rule("duplicate_5gram_chars", "max", 0.15),
  Rule("duplicate_6gram_chars", "max", 0.14),
  Rule("duplicate_7gram_chars", "max", 0.13),
  Rule("duplicate_8gram_chars", "max", 0.12),
  Rule("duplicate_9gram_chars", "max", 0.11),
  Rule("duplicate_10gram_chars", "max", 0.1),
)

CODE = (
  Rule("word_count", "min", 10),
  Rule("word_count", "max", 100_000),
  Rule("max_line_length", "max", 1000),
  Rule("mean_line_length", "max", 100),  # minified or generated
  Rule("alphanumeric_chars", "min", 0.25),  # data blobs, encoded binaries
  Rule("duplicate_paragraph_chars", "max", 0.5),
  Rule("duplicate_10gram_chars", "max", 0.6),  # the same long runs over most of the file
)

RULE_SETS = {"prose": PROSE, "code": CODE}
CODE_SUFFIXES = (".py",)


def rule_set(path: str, filters: str) -> str | None:
  """The rule set for a document of `path` under `--filters`: None, "prose" or "code"."""
  if filters == "none":
    return None
  if filters == "default":
    return "code" if path.endswith(CODE_SUFFIXES) else "prose"
  return filters


def first_failure(stats: dict, rules: tuple[Rule, ...]) -> Rule | None:
  return next((r for r in rules if r.breaks(stats)), None)


def measure(text: str) -> dict:
  """Every statistic the rules use, for one document."""
  words = text.split()
  lengths = np.fromiter(map(len, words), np.int64, len(words))
  word_chars = max(int(lengths.sum()), 1)
  n = max(len(words), 1)
  lines = [line.strip() for line in text.split("\n")]
  nonempty = [line for line in lines if line] or [""]
  raw_lines = text.split("\n")
  stats = {
    "word_count": len(words),
    "mean_word_length": word_chars / n if words else 0.0,
    "symbol_word_ratio": max(text.count("#"), sum(text.count(e) for e in ELLIPSES)) / n,
    "bullet_lines": sum(line.startswith(BULLETS) for line in nonempty) / len(nonempty),
    "ellipsis_lines": sum(line.endswith(ELLIPSES) for line in nonempty) / len(nonempty),
    "alpha_words": sum(map(bool, map(_ALPHA.search, words))) / n,
    "stop_words": len(STOP_WORDS.intersection(w.lower() for w in words)),
    "max_line_length": max(map(len, raw_lines)),
    "mean_line_length": len(text) / len(raw_lines),
    "alphanumeric_chars": len(_NOT_ALNUM.sub("", text)) / max(len(text), 1),
  }
  stats["duplicate_lines"], stats["duplicate_line_chars"] = _duplicates(nonempty)
  paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()] or [""]
  stats["duplicate_paragraphs"], stats["duplicate_paragraph_chars"] = _duplicates(paragraphs)
  stats.update(_ngram_stats(words, lengths, word_chars))
  return stats


def _duplicates(pieces: list[str]) -> tuple[float, float]:
  """Fraction of pieces that repeat an earlier piece, and the fraction of characters in them."""
  seen, count, chars = set(), 0, 0
  for piece in pieces:
    if piece in seen:
      count, chars = count + 1, chars + len(piece)
    seen.add(piece)
  return count / len(pieces), chars / max(sum(map(len, pieces)), 1)


def _ngram_stats(words: list[str], lengths: np.ndarray, word_chars: int) -> dict:
  """Top n-gram character fractions (n = 2..4) and duplicate n-gram character fractions (n = 5..10)."""
  vocab: dict[str, int] = {}  # word -> position of its first occurrence: equal words, equal ids
  ids = np.fromiter(map(vocab.setdefault, words, range(len(words))), np.uint64, len(words))
  chars = np.concatenate([[0], np.cumsum(lengths)])
  stats, keys = {}, ids * _M[0]
  for n in range(2, max(DUPLICATE_NGRAMS) + 1):
    count = len(words) - n + 1
    keys = keys[:-1] + ids[n - 1 :] * _M[n - 1] if count > 0 else keys[:0]
    name = f"top_{n}gram_chars" if n in TOP_NGRAMS else f"duplicate_{n}gram_chars"
    if count <= 1:
      stats[name] = 0.0
      continue
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    if n in TOP_NGRAMS:
      ngram_chars = chars[first + n] - chars[first]
      top = np.flatnonzero(counts == counts.max())
      stats[name] = float((counts[top] * ngram_chars[top]).max()) / word_chars if counts.max() > 1 else 0.0
    else:  # Words inside any repeat (a later occurrence) of an n-gram.
      starts = np.flatnonzero(first[inverse] != np.arange(count))
      marks = np.zeros(len(words) + 1, np.int64)
      np.add.at(marks, starts, 1)
      np.add.at(marks, starts + n, -1)
      stats[name] = float(lengths[np.cumsum(marks[:-1]) > 0].sum()) / word_chars
  return stats
