"""SentencePiece tokenizers and the raw-text reader: lossless round trips, recorded ids, bad input counted."""

import collections
import gzip
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import sentencepiece as spm

from maxlm.data import corpus, tokenizer
from maxlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")  # ~100 KB of Python every install has


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tok.model")
  skipped = collections.Counter()
  return tokenizer.train(corpus.documents(corpus.expand([STDLIB_JSON]), skipped), vocab_size=600, output=out)


@pytest.mark.parametrize(
  "text",
  [
    "def f(x):\n\tif x  >  3:\n        return None\n\n",
    "Ünïcödé, 中文, emoji 😀, and a NUL-free control \x07 char",
    "   leading and trailing spaces   ",
    "digits 1234567890 split",
  ],
)
def test_round_trip_is_lossless(trained, text):
  ids = trained.encode(text)
  assert all(0 <= i < trained.vocab_size for i in ids)
  assert trained.decode(ids) == text


def test_ids_are_recorded(trained):
  info = trained.info()
  assert (info["vocab_size"], info["pad_id"], info["unk_id"], info["bos_id"], info["eos_id"]) == (600, 0, 1, 2, 3)
  assert len(info["sha256"]) == 64
  assert tokenizer.Tokenizer(info["path"]).info() == info


def test_existing_sentencepiece_models_load_as_they_are(tmp_path):
  # Llama-style special ids (unk 0, bos 1, eos 2, no pad), trained directly with SentencePiece.
  prefix = str(tmp_path / "llama_like")
  lines = (
    line
    for doc in corpus.documents(corpus.expand([STDLIB_JSON]), collections.Counter())
    for line in doc.splitlines()
    if line.strip()
  )
  spm.SentencePieceTrainer.train(
    sentence_iterator=lines, model_prefix=prefix, vocab_size=400, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2
  )
  info = tokenizer.Tokenizer(prefix + ".model").info()
  assert (info["unk_id"], info["bos_id"], info["eos_id"], info["pad_id"], info["vocab_size"]) == (0, 1, 2, -1, 400)


def test_not_a_model_is_a_clear_error(tmp_path):
  (tmp_path / "x.model").write_text("not a model")
  with pytest.raises(UserError, match="not a readable SentencePiece model"):
    tokenizer.Tokenizer(str(tmp_path / "x.model"))


def test_reader_counts_bad_input(tmp_path):
  (tmp_path / "good.txt").write_text("a good document\n")
  (tmp_path / "empty.md").write_text("  \n")
  (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02")
  (tmp_path / "latin1.py").write_bytes("caf\xe9".encode("latin-1"))
  with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
    f.write('{"text": "jsonl doc"}\n{broken\n{"body": "x"}\n{"text": 3}\n\n')
  (tmp_path / "ignored.csv").write_text("a,b\n")
  skipped = collections.Counter()
  docs = list(corpus.documents(corpus.expand([str(tmp_path)]), skipped))
  assert sorted(docs) == ["a good document\n", "jsonl doc"]
  assert skipped == {
    "binary file": 1,
    "empty document": 1,
    "invalid UTF-8": 1,
    "jsonl line is not JSON": 1,
    "jsonl line without a string 'text' field": 2,
  }


def test_reader_input_errors(tmp_path):
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(UserError, match="unsupported file type"):
    corpus.expand([str(tmp_path / "data.csv")])
  with pytest.raises(UserError, match="matches no"):
    corpus.expand([str(tmp_path / "*.txt")])


def test_cli(tmp_path):
  out = tmp_path / "tok.model"
  ok = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "tokenizer",
      "train",
      "--input",
      STDLIB_JSON,
      "--vocab-size",
      "500",
      "--output",
      str(out),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["vocab_size"] == 500 and out.exists()
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "tokenizer",
      "train",
      "--input",
      STDLIB_JSON,
      "--vocab-size",
      "100000",
      "--output",
      str(tmp_path / "big.model"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "Vocabulary size too high" in bad.stderr and not (tmp_path / "big.model").exists()
