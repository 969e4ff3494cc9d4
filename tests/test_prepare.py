"""maxlm data prepare: lossless, deterministic, split by content, atomic, and safe with existing outputs."""

import collections
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from maxlm import corpus, prepare, tokenizer
from maxlm.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tokenizer.train(corpus.documents(corpus.expand([STDLIB_JSON]), collections.Counter()), vocab_size=600,
                         output=out)


@pytest.fixture
def texts(tmp_path):
  docs = [f"document {i}: " + "word " * (i % 7 + 1) + "\n\tindented line\n" for i in range(60)]
  src = tmp_path / "src"
  src.mkdir()
  for i, d in enumerate(docs):
    (src / f"{i:02d}.txt").write_text(d)
  return str(src), docs


def decoded_documents(tok, directory):
  out = []
  for split in prepare.SPLITS:
    tokens, index, manifest = prepare.load_split(directory, split)
    assert manifest["eos_appended"]
    for a, b in zip(index[:-1], index[1:]):
      doc = tokens[a:b].tolist()
      assert doc[-1] == tok.sp.eos_id()
      out.append((split, tok.decode(doc[:-1])))
  return out


def test_no_document_is_lost_or_changed(tok, texts, tmp_path):
  src, docs = texts
  manifest = prepare.prepare([src], tok.path, str(tmp_path / "out"), val_fraction=0.3)
  got = decoded_documents(tok, str(tmp_path / "out"))
  assert sorted(t for _, t in got) == sorted(docs)
  assert 5 < manifest["splits"]["val"]["documents"] < 35  # ~30% of 60
  assert sum(s["documents"] for s in manifest["splits"].values()) == 60
  assert all(split == ("val" if prepare.in_val(t, 0.3) else "train") for split, t in got)


def test_prepare_is_deterministic(tok, texts, tmp_path):
  src, _ = texts
  for name in ("a", "b"):
    prepare.prepare([src], tok.path, str(tmp_path / name), val_fraction=0.3)
  for split in ("", "train", "val"):
    for f in os.listdir(tmp_path / "a" / split):
      if os.path.isfile(tmp_path / "a" / split / f):
        assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes(), f


def test_split_depends_on_the_document_only(tok, texts, tmp_path):
  src, docs = texts
  prepare.prepare([src], tok.path, str(tmp_path / "all"), val_fraction=0.3)
  subset = sorted(os.listdir(src))[::3]
  prepare.prepare([os.path.join(src, f) for f in subset], tok.path, str(tmp_path / "some"), val_fraction=0.3)
  split_of = {t: s for s, t in decoded_documents(tok, str(tmp_path / "all"))}
  for split, text in decoded_documents(tok, str(tmp_path / "some")):
    assert split_of[text] == split


def test_existing_outputs(tok, texts, tmp_path):
  src, _ = texts
  out = str(tmp_path / "out")
  prepare.prepare([src], tok.path, out)
  before = os.stat(os.path.join(out, "train", "tokens.bin")).st_mtime_ns
  prepare.prepare([src], tok.path, out)  # Same inputs and settings: nothing to do.
  assert os.stat(os.path.join(out, "train", "tokens.bin")).st_mtime_ns == before
  with pytest.raises(ConfigError, match="holds a different dataset"):
    prepare.prepare([src], tok.path, out, val_fraction=0.5)
  os.makedirs(tmp_path / "other")
  with pytest.raises(ConfigError, match="is not a prepared dataset"):
    prepare.prepare([src], tok.path, str(tmp_path / "other"))


def test_an_interrupted_prepare_is_never_taken_for_a_dataset(tok, texts, tmp_path):
  src, docs = texts
  out = str(tmp_path / "out")
  os.makedirs(out + ".partial/train")  # What a killed prepare leaves behind.
  (tmp_path / "out.partial" / "train" / "tokens.bin").write_bytes(b"\x01\x02")
  with pytest.raises(ConfigError, match="a prepare was interrupted: rerun it"):
    prepare.load_split(out, "train")
  prepare.prepare([src], tok.path, out)
  assert not os.path.exists(out + ".partial")
  assert sorted(t for _, t in decoded_documents(tok, out)) == sorted(docs)


def test_nothing_usable_is_an_error_and_leaves_nothing(tok, tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "bin.txt").write_bytes(b"\x00\x00")
  with pytest.raises(ConfigError, match="no usable training documents"):
    prepare.prepare([str(tmp_path / "in")], tok.path, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_cli(tok, texts, tmp_path):
  src, _ = texts
  proc = subprocess.run([sys.executable, "-m", "maxlm", "data", "prepare", "--input", src, "--tokenizer", tok.path,
                         "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "train" in proc.stderr and os.path.exists(tmp_path / "out" / "manifest.json")
  bad = subprocess.run([sys.executable, "-m", "maxlm", "data", "prepare", "--input", src, "--tokenizer",
                        str(tmp_path / "missing.model"), "--output", str(tmp_path / "o2")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "not a readable SentencePiece model" in bad.stderr
