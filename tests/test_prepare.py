"""maxlm data prepare: lossless, deterministic, split by content, atomic, and safe with existing outputs.

These tests are about the data path, so most turn the quality filters off (`filters="none"`): the synthetic
documents here are short and repetitive on purpose. Curation is tested in tests/test_curation.py.
"""

import collections
import os
import subprocess
import sys
import sysconfig

import grain
import numpy as np
import pytest

from maxlm.data import corpus, dataset, prepare, tokenizer
from maxlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tokenizer.train(
    corpus.documents(corpus.expand([STDLIB_JSON]), collections.Counter()), vocab_size=600, output=out
  )


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
  for split in dataset.SPLITS:
    tokens, index, manifest = dataset.load_split(directory, split)
    assert manifest["eos_appended"]
    for a, b in zip(index[:-1], index[1:]):
      doc = tokens[a:b].tolist()
      assert doc[-1] == tok.sp.eos_id()
      out.append((split, tok.decode(doc[:-1])))
  return out


def test_no_document_is_lost_or_changed(tok, texts, tmp_path):
  src, docs = texts
  manifest = prepare.prepare([src], tok.path, str(tmp_path / "out"), val_fraction=0.3, filters="none")
  got = decoded_documents(tok, str(tmp_path / "out"))
  assert sorted(t for _, t in got) == sorted(docs)
  assert 5 < manifest["splits"]["val"]["documents"] < 35  # ~30% of 60
  assert sum(s["documents"] for s in manifest["splits"].values()) == 60
  assert all(split == ("val" if prepare.in_val(t, 0.3) else "train") for split, t in got)


def test_prepare_is_deterministic(tok, texts, tmp_path):
  src, _ = texts
  for name in ("a", "b"):
    prepare.prepare([src], tok.path, str(tmp_path / name), val_fraction=0.3, filters="none")
  for split in ("", "train", "val"):
    for f in os.listdir(tmp_path / "a" / split):
      if os.path.isfile(tmp_path / "a" / split / f):
        assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes(), f


def test_split_depends_on_the_document_only(tok, texts, tmp_path):
  src, docs = texts
  prepare.prepare([src], tok.path, str(tmp_path / "all"), val_fraction=0.3, filters="none")
  subset = sorted(os.listdir(src))[::3]
  prepare.prepare(
    [os.path.join(src, f) for f in subset], tok.path, str(tmp_path / "some"), val_fraction=0.3, filters="none"
  )
  split_of = {t: s for s, t in decoded_documents(tok, str(tmp_path / "all"))}
  for split, text in decoded_documents(tok, str(tmp_path / "some")):
    assert split_of[text] == split


def test_existing_outputs(tok, texts, tmp_path):
  src, _ = texts
  out = str(tmp_path / "out")
  prepare.prepare([src], tok.path, out, filters="none")
  before = os.stat(os.path.join(out, "train", "tokens.bin")).st_mtime_ns
  prepare.prepare([src], tok.path, out, filters="none")  # Same inputs and settings: nothing to do.
  assert os.stat(os.path.join(out, "train", "tokens.bin")).st_mtime_ns == before
  with pytest.raises(UserError, match="holds a different dataset"):
    prepare.prepare([src], tok.path, out, val_fraction=0.5, filters="none")
  os.makedirs(tmp_path / "other")
  with pytest.raises(UserError, match="is not a prepared dataset"):
    prepare.prepare([src], tok.path, str(tmp_path / "other"), filters="none")


def test_an_interrupted_prepare_is_never_taken_for_a_dataset(tok, texts, tmp_path):
  src, docs = texts
  out = str(tmp_path / "out")
  os.makedirs(out + ".partial/train")  # What a killed prepare leaves behind.
  (tmp_path / "out.partial" / "train" / "tokens.bin").write_bytes(b"\x01\x02")
  with pytest.raises(UserError, match="a prepare was interrupted: rerun it"):
    dataset.load_split(out, "train")
  prepare.prepare([src], tok.path, out, filters="none")
  assert not os.path.exists(out + ".partial")
  assert sorted(t for _, t in decoded_documents(tok, out)) == sorted(docs)


def test_nothing_usable_is_an_error_and_leaves_nothing(tok, tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "bin.txt").write_bytes(b"\x00\x00")
  with pytest.raises(UserError, match="no usable training documents"):
    prepare.prepare([str(tmp_path / "in")], tok.path, str(tmp_path / "out"), filters="none")
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_cli(tok, texts, tmp_path):
  src, _ = texts
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "data",
      "prepare",
      "--input",
      src,
      "--tokenizer",
      tok.path,
      "--output",
      str(tmp_path / "out"),
      "--filters",
      "none",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "train" in proc.stderr and os.path.exists(tmp_path / "out" / "manifest.json")
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "data",
      "prepare",
      "--input",
      src,
      "--tokenizer",
      str(tmp_path / "missing.model"),
      "--output",
      str(tmp_path / "o2"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "not a readable SentencePiece model" in bad.stderr


@pytest.fixture
def prepared(tok, texts, tmp_path):
  src, _ = texts
  prepare.prepare([src], tok.path, str(tmp_path / "ds"), val_fraction=0.2, filters="none")
  return str(tmp_path / "ds")


def test_packed_rows_cover_every_token_once_with_correct_segments(prepared):
  from maxlm.data import pipeline

  src = pipeline.PackedSource(prepared, "train", seq_len=16, seed=5)
  tokens, offsets, _ = dataset.load_split(prepared, "train")
  order = np.random.default_rng([5, 104729, 0]).permutation(len(offsets) - 1)
  stream = np.concatenate([tokens[offsets[d] : offsets[d + 1]] for d in order])
  docs_at = np.repeat(np.arange(len(order)), np.diff(offsets)[order])  # stream position -> document rank
  starts = np.concatenate([[0], np.cumsum(np.diff(offsets)[order])])
  positions = [src.row_position(i) for i in range(src.rows_per_epoch)]
  assert sorted(positions) == list(range(src.rows_per_epoch))  # every row of the stream once
  assert positions != sorted(positions)  # ... in a shuffled order
  for i, r in enumerate(positions):
    row = src[i]
    span = slice(16 * r, 16 * r + 16)
    np.testing.assert_array_equal(row["inputs"], stream[span])
    np.testing.assert_array_equal(row["targets"], stream[16 * r + 1 : 16 * r + 17])
    ranks = docs_at[span]
    np.testing.assert_array_equal(row["segment_ids"], ranks - ranks[0] + 1)
    piece_start = np.maximum(starts[ranks], 16 * r)  # a piece starts at its document's start or the row's
    np.testing.assert_array_equal(row["positions"], np.arange(16 * r, 16 * r + 16) - piece_start)
    np.testing.assert_array_equal(row["loss_mask"], docs_at[16 * r + 1 : 16 * r + 17] == ranks)
  assert src.rows_per_epoch == (len(stream) - 1) // 16
  assert not np.array_equal(src[src.rows_per_epoch]["inputs"], src[0]["inputs"])  # epoch 2 is reshuffled


def test_a_long_document_is_spread_over_the_epoch(tok, tmp_path):
  """A document much longer than the rest must not fill consecutive batches: rows are read shuffled."""
  from maxlm.data import pipeline

  src_dir = tmp_path / "src"
  src_dir.mkdir()
  words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "omega"], 20_000)
  (src_dir / "long.txt").write_text(" ".join(words))
  for i in range(20):
    (src_dir / f"short{i}.txt").write_text(f"short document number {i} " * 40)
  prepare.prepare([str(src_dir)], tok.path, str(tmp_path / "ds"), val_fraction=0.0, dedup="none", filters="none")
  src = pipeline.PackedSource(str(tmp_path / "ds"), "train", seq_len=16, seed=0)
  tokens, offsets, _ = dataset.load_split(str(tmp_path / "ds"), "train")
  lengths = np.diff(offsets)
  assert lengths.max() > 0.75 * offsets[-1]  # one document is most of the data: ~1000 rows in a row
  order = np.random.default_rng([0, 104729, 0]).permutation(len(lengths))  # epoch 0's document order
  begin = int(np.sum(lengths[order][: int(np.argmax(order == np.argmax(lengths)))]))  # the long one's start
  in_long = [
    begin <= 16 * src.row_position(i) and 16 * src.row_position(i) + 17 <= begin + lengths.max()
    for i in range(src.rows_per_epoch)
  ]
  assert all(np.all(src[i]["segment_ids"] == 1) for i in np.flatnonzero(in_long)[:50])
  longest_run = max(len(run) for run in "".join("x" if x else " " for x in in_long).split(" "))
  # Read in stream order, its ~5500 rows would come one after another; shuffled, the longest run is what
  # chance gives for a share of 0.88 (about 50).
  assert sum(in_long) > 0.7 * src.rows_per_epoch and longest_run < sum(in_long) / 20


def test_packed_batches_same_for_any_process_count(prepared):
  from maxlm.data import pipeline

  src = grain.MapDataset.source(pipeline.PackedSource(prepared, "train", seq_len=16, seed=0))
  one = [next(it) for it in [iter(pipeline.batches(src, 4, 0, 1))] for _ in range(3)]
  parts = [iter(pipeline.batches(src, 4, p, 2)) for p in range(2)]
  for step in range(3):
    halves = [next(p) for p in parts]
    for k in one[step]:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), one[step][k])


def test_training_on_a_prepared_dataset(prepared, tok, tmp_path):
  import jax

  from maxlm.training import loop

  from conftest import make_config

  with pytest.raises(UserError, match="600-token vocabulary but model.vocab_size=256"):
    loop.run(
      make_config(
        **{"data.source": "prepared", "data.path": prepared, "data.seq_len": 16, "checkpoint.every_steps": 0}
      ),
      str(tmp_path / "bad"),
      devices=jax.devices()[:1],
    )
  with pytest.raises(UserError, match="is not a prepared dataset"):
    make_config(**{"data.source": "prepared", "data.path": str(tmp_path)})
  records = loop.run(
    make_config(
      **{
        "data.source": "prepared",
        "data.path": prepared,
        "data.seq_len": 16,
        "model.vocab_size": 640,
        "train.steps": 30,
        "train.eval_every": 30,
        "train.log_every": 10,
        "checkpoint.every_steps": 0,
        "metrics.tensorboard": False,
      }
    ),
    str(tmp_path / "run"),
    devices=jax.devices()[:1],
  )
  assert records[-1]["loss"] < records[0]["loss"] and np.isfinite(records[-1]["eval_loss"])


def test_epochs_continue_without_replaying_order(prepared):
  from maxlm.data import pipeline

  src = pipeline.PackedSource(prepared, "train", seq_len=16, seed=0)
  it = iter(pipeline.batches(grain.MapDataset.source(src), 1, 0, 1))
  rows = [next(it)["inputs"][0] for _ in range(2 * src.rows_per_epoch)]
  first, second = rows[: src.rows_per_epoch], rows[src.rows_per_epoch :]
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # epoch 2 comes in a new order
  assert np.concatenate(first).size == np.concatenate(second).size


def test_rows_read_from_many_threads_equal_rows_read_in_order(prepared):
  """Grain reads records from a thread pool; epoch switches (the cached document order) must be safe."""
  import concurrent.futures

  from maxlm.data import pipeline

  reference = pipeline.PackedSource(prepared, "train", seq_len=16, seed=0)
  n = reference.rows_per_epoch
  indices = np.random.default_rng(0).permutation(6 * n)  # jumps between 6 epochs at every read
  want = {i: reference[int(i)]["inputs"] for i in indices}
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)  # switch threads as often as possible: a torn cache update shows up at once
  try:
    for _ in range(5):
      src = pipeline.PackedSource(prepared, "train", seq_len=16, seed=0)
      with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = dict(zip(indices, pool.map(lambda i, src=src: src[int(i)]["inputs"], indices)))
      for i in indices:
        np.testing.assert_array_equal(got[i], want[i])
  finally:
    sys.setswitchinterval(interval)


def test_mixture_proportions_and_checks(tok, tmp_path):
  from maxlm.data import pipeline

  from conftest import make_config

  for name, word in (("a", "zzz"), ("b", "kkk")):
    (tmp_path / name).mkdir()
    for i in range(40):
      (tmp_path / name / f"{i}.txt").write_text(f"{word} " * (20 + i))
    prepare.prepare([str(tmp_path / name)], tok.path, str(tmp_path / f"ds_{name}"), val_fraction=0.1, filters="none")
  paths = f"{tmp_path}/ds_a,{tmp_path}/ds_b"
  cfg = make_config(
    **{
      "data.source": "prepared",
      "data.path": paths,
      "data.weights": "3,1",
      "data.seq_len": 16,
      "model.vocab_size": 600,
      "train.global_batch": 8,
    }
  )
  train, _ = pipeline.train_and_eval(cfg)
  only_a = set(tok.encode("zzz zzz")) - set(tok.encode("kkk kkk"))
  only_b = set(tok.encode("kkk kkk")) - set(tok.encode("zzz zzz"))
  rows = np.concatenate([next(train)["inputs"] for _ in range(100)])
  from_a = np.mean([bool(only_a & set(r.tolist())) for r in rows])
  from_b = np.mean([bool(only_b & set(r.tolist())) for r in rows])
  assert abs(from_a - 0.75) < 0.03 and abs(from_b - 0.25) < 0.03 and from_a + from_b == pytest.approx(1.0)
  for weights, message in (("1", "one positive weight per dataset"), ("1,x", "comma-separated numbers")):
    with pytest.raises(UserError, match=message):
      make_config(**{"data.source": "prepared", "data.path": paths, "data.weights": weights})


def test_exact_duplicates_are_removed_and_reported(tok, texts, tmp_path):
  src, docs = texts
  extra = tmp_path / "extra"
  extra.mkdir()
  (extra / "copy.txt").write_text(docs[3])  # the same text
  (extra / "variant.txt").write_text("  " + docs[5].upper().replace(" ", "   ") + "\n")  # case and spacing
  (extra / "new.txt").write_text("a genuinely new document\n")
  manifest = prepare.prepare([src, str(extra)], tok.path, str(tmp_path / "dedup"), val_fraction=0.3, filters="none")
  assert manifest["curation"]["exact_duplicates"] == 2
  assert manifest["sources"][str(extra / "copy.txt")]["exact_duplicates"] == 1
  assert sorted(t for _, t in decoded_documents(tok, str(tmp_path / "dedup"))) == sorted(
    docs + ["a genuinely new document\n"]
  )  # first occurrences kept
  report = (tmp_path / "dedup" / "curation_report.md").read_text()
  assert "| exact_duplicates | 2 |" in report and f"repeats a document of `{src}/03.txt`" in report
  kept = prepare.prepare(
    [src, str(extra)], tok.path, str(tmp_path / "nodedup"), val_fraction=0.3, dedup="none", filters="none"
  )
  assert kept["curation"]["exact_duplicates"] == 0
  assert sum(s["documents"] for s in kept["splits"].values()) == len(docs) + 3
