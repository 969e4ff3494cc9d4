"""SentencePiece tokenizers: train one on text, or load any `.model` file (Llama and Gemma ship these).

Trained tokenizers are lossless on any text, code included: no normalization, whitespace kept as is,
digits split, and bytes that are not pieces (newlines, rare characters) fall back to byte tokens.
Ids: pad 0, unk 1, bos 2, eos 3. `info()` records the ids, the vocabulary size and a hash of the model,
so datasets can name the tokenizer they were made with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from maxlm import config, storage
from maxlm.errors import UserError

MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB = 260  # 256 byte-fallback tokens, pad, unk, bos, eos
LINE_CHARS = 4000  # Longest piece of a line handed to SentencePiece (its limit is 16384 bytes; 4 bytes a character)


class Tokenizer:
  def __init__(self, path: str):
    try:
      self.model_bytes = storage.Path(path).read_bytes()
      self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
    except (OSError, RuntimeError) as e:
      raise UserError(f"{path}: not a readable SentencePiece model ({' '.join(str(e).split())})") from None
    self.path = path

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode(list(ids))

  def info(self) -> dict:
    return {
      "path": self.path,
      "sha256": hashlib.sha256(self.model_bytes).hexdigest(),
      "vocab_size": self.vocab_size,
      "bos_id": self.sp.bos_id(),
      "eos_id": self.sp.eos_id(),
      "pad_id": self.sp.pad_id(),
      "unk_id": self.sp.unk_id(),
    }


def from_manifest(dataset: str) -> Tokenizer | None:
  """The tokenizer a prepared dataset was made with, if its recorded file still exists with the recorded hash."""
  try:
    info = json.loads(storage.read_text(storage.join(dataset, "manifest.json")))["tokenizer"]
    if hashlib.sha256(storage.Path(info["path"]).read_bytes()).hexdigest() != info["sha256"]:
      return None
  except (OSError, KeyError, ValueError):
    return None
  return Tokenizer(info["path"])


def for_run(workdir: str) -> tuple[Tokenizer | None, bool]:
  """(the SentencePiece tokenizer of a run, whether prompts start with BOS), or (None, False).

  Looked up along the run and the runs it was initialised from: an imported `tokenizer.model` (BOS as its HF
  tokenizer_config.json says, default on as for Llama), else the tokenizer of the run's data (no BOS: neither
  `maxlm data prepare` nor the Parquet/ArrayRecord readers add one): `data.tokenizer`, or for prepared data the one
  found by the path and SHA-256 its manifest records.
  """
  for directory, saved in config.lineage(workdir):
    path = storage.join(directory, "tokenizer.model")
    if storage.isfile(path):
      side = storage.join(directory, "hf", "tokenizer_config.json")
      add_bos = True
      if storage.isfile(side):
        add_bos = bool(json.loads(storage.read_text(side)).get("add_bos_token", True))
      return Tokenizer(path), add_bos
    data = saved.get("data", {})
    if data.get("source") in ("array_record", "parquet") and data.get("tokenizer"):
      try:
        return Tokenizer(data["tokenizer"]), False  # The model the records were tokenized with as they were read.
      except UserError:
        pass  # Moved or deleted since: look further up the lineage.
    if data.get("source") == "prepared":
      for dataset in filter(None, data.get("path", "").split(",")):
        tok = from_manifest(dataset)
        if tok is not None:
          return tok, False
  return None, False


def train(
  texts: Iterator[str],
  *,
  vocab_size: int,
  output: str,
  model_type: str = "bpe",
  max_sentences: int = 2_000_000,
  threads: int = 2,
) -> Tokenizer:
  """Trains on the lines of `texts` and writes `output` (a .model file)."""
  if model_type not in MODEL_TYPES:
    raise UserError(f"--model_type={model_type}: choose one of {', '.join(MODEL_TYPES)}")
  if not output.endswith(".model"):
    raise UserError(f"--output={output}: name the tokenizer file *.model")
  if vocab_size < MIN_VOCAB:
    raise UserError(f"--vocab_size={vocab_size}: use at least {MIN_VOCAB} (256 byte tokens and 4 special ones)")
  parent = os.path.dirname(os.path.abspath(output))
  if not storage.is_remote(output) and not os.path.isdir(parent):
    raise UserError(f"--output={output}: the directory {parent} does not exist; create it or choose another path")
  if storage.isdir(output):
    raise UserError(f"--output={output} is a directory: name the tokenizer file *.model")
  counted = [0]

  def lines():
    for text in texts:
      for line in text.split("\n"):
        while line.strip():  # SentencePiece drops lines over 16 KB: long ones go in pieces, cut at a space.
          cut = len(line) if len(line) <= LINE_CHARS else (line.rfind(" ", 0, LINE_CHARS) + 1 or LINE_CHARS)
          counted[0] += 1
          yield line[:cut]
          line = line[cut:]

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=lines(),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      max_sentence_length=16384,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      num_threads=threads,
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      character_coverage=0.9995,
      minloglevel=2,
    )
  except RuntimeError as e:  # e.g. a vocabulary larger than the text can fill
    if counted[0] == 0:
      raise UserError("--input: no text to train on (every input was skipped or empty)") from None
    raise UserError(f"tokenizer training failed: {' '.join(str(e).split())}") from None
  storage.write_atomically(output, model.getvalue())  # Never a half-written model, even on a full disk.
  return Tokenizer(output)
