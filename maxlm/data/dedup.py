"""Duplicate detection: exact (hash of the normalized text) and near (MinHash signatures + LSH banding).

Normalization: Unicode NFKC, lowercase, whitespace runs collapsed; both kinds of dedup see only its words.

MinHash (Broder 1997): a document's shingles are its runs of `shingle_words` consecutive words. Words are
hashed with CRC-32 (the same in every process, unlike Python's salted `hash()`) and a shingle's 32-bit hash
mixes its words' hashes. Permutation i is the multiply-add-shift hash h_i(x) = ((a_i x + b_i) mod 2^64) >> 32
(Dietzfelbinger 1996; 2-independent for 32-bit x) with 64-bit a_i, b_i from a fixed seed: uint64 arithmetic
wraps mod 2^64 for free, so NumPy computes all permutations over all shingles at once with no division.
The signature keeps each permutation's minimum; the fraction of equal positions in two signatures estimates
the Jaccard similarity of their shingle sets.

LSH (Leskovec et al., Mining of Massive Datasets, ch. 3): the signature is cut into b bands of r rows; two
documents become candidates when a band matches exactly, with probability 1 - (1 - s^r)^b at Jaccard s.
A candidate is a near duplicate when its estimated Jaccard similarity is >= the threshold, so a false
positive of the banding costs one signature comparison while a false negative keeps a duplicate.
`choose_bands` therefore picks b x r <= num_perm minimizing 0.1 x the area of false positives below the
threshold plus 0.9 x the area of false negatives above it (datasketch's rule, with weights for verified
candidates). 128 permutations and threshold 0.8 give 14 bands x 9 rows: a pair at Jaccard 0.8 becomes a
candidate with probability 0.87, at 0.85 with 0.975, at 0.5 with 0.03.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
import zlib

import numpy as np

NUM_PERM = 128
SHINGLE_WORDS = 5
_rng = np.random.default_rng(19970611)
_A = _rng.integers(0, 2**64, size=NUM_PERM, dtype=np.uint64, endpoint=False)[:, None]
_B = _rng.integers(0, 2**64, size=NUM_PERM, dtype=np.uint64, endpoint=False)[:, None]
_MIX = _rng.integers(1, 2**63, size=64, dtype=np.uint64) * 2 + 1  # odd multipliers, one per shingle position
_CHUNK = 4096  # shingles per (num_perm x chunk) uint64 block: 4 MB at 128 permutations


def words(text: str) -> list[str]:
  return unicodedata.normalize("NFKC", text).lower().split()


def exact_key(normal_words: list[str]) -> bytes:
  return hashlib.sha256(" ".join(normal_words).encode("utf-8")).digest()


def signature(normal_words: list[str], shingle_words: int = SHINGLE_WORDS) -> np.ndarray:
  """The uint32 MinHash signature (NUM_PERM values) of a document's word shingles."""
  if not 1 <= shingle_words <= len(_MIX):
    raise ValueError(f"shingle_words={shingle_words}: use 1..{len(_MIX)}")
  hashes = np.fromiter(map(zlib.crc32, map(str.encode, normal_words)), np.uint64, len(normal_words))
  k = max(min(shingle_words, len(hashes)), 1)  # A document shorter than a shingle is one shingle.
  count = max(len(hashes) - k + 1, 1)
  mixed = np.zeros(count, np.uint64)
  for j in range(min(k, len(hashes))):
    mixed += hashes[j : j + count] * _MIX[j]  # wraps mod 2^64
  shingles = (mixed >> np.uint64(32)) ^ (mixed & np.uint64(0xFFFFFFFF))
  out = np.full(NUM_PERM, 2**32 - 1, np.uint64)
  for start in range(0, count, _CHUNK):
    x = shingles[None, start : start + _CHUNK]
    h = _A * x
    h += _B
    h >>= np.uint64(32)
    out = np.minimum(out, h.min(axis=1))
  return out.astype(np.uint32)


def candidate_probability(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray:
  return 1 - (1 - np.asarray(s, np.float64) ** rows) ** bands


@functools.lru_cache
def choose_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
  """(bands, rows) with bands x rows <= num_perm minimizing weighted false-positive + false-negative area."""
  s = np.linspace(0, 1, 1001)
  below, above = s <= threshold, s >= threshold
  best, best_error = (1, num_perm), np.inf
  for bands in range(1, num_perm + 1):
    for rows in range(1, num_perm // bands + 1):
      p = candidate_probability(s, bands, rows)
      error = 0.1 * np.trapezoid(p[below], s[below]) + 0.9 * np.trapezoid(1 - p[above], s[above])
      if error < best_error:
        best, best_error = (bands, rows), error
  return best


class NearIndex:
  """Signatures of the documents kept so far, bucketed by band, to find a new document's near duplicate."""

  def __init__(self, threshold: float):
    self.threshold = threshold
    self.bands, self.rows = choose_bands(threshold)
    self.buckets: list[dict[int, int]] = [{} for _ in range(self.bands)]
    self.signatures = np.zeros((1024, NUM_PERM), np.uint32)
    self.size = 0

  def _band_keys(self, sig: np.ndarray) -> list[int]:
    rows = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
    return ((rows * _MIX[: self.rows]).sum(axis=1)).tolist()  # 64-bit keys: 4x smaller than the bytes

  def find(self, sig: np.ndarray) -> tuple[int, float] | None:
    """(index of the earliest-added matching document, estimated Jaccard similarity), or None."""
    candidates = sorted({b[key] for b, key in zip(self.buckets, self._band_keys(sig)) if key in b})
    for i in candidates:
      similarity = float(np.mean(self.signatures[i] == sig))
      if similarity >= self.threshold:
        return i, similarity
    return None

  def add(self, sig: np.ndarray) -> int:
    if self.size == len(self.signatures):
      self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
    self.signatures[self.size] = sig
    for bucket, key in zip(self.buckets, self._band_keys(sig)):
      bucket.setdefault(key, self.size)  # A bucket remembers its first document; later ones match via other bands.
    self.size += 1
    return self.size - 1
