"""data.source=parquet / array_record: text records tokenized and packed as read (maxlm/data/records.py)."""

import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from maxlm import storage
from maxlm.data import pipeline, records, tokenizer
from maxlm.errors import UserError
from maxlm.training import loop

from conftest import make_config

WORDS = ["alpha", "beta", "gamma", "x = 1", "café", "日本語", "def f():"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(directory, documents, tokenizer): the documents as two Parquet files (row groups of 50 and 64) and as one
  ArrayRecord file of JSON records, plus a null, an empty and (ArrayRecord) a non-UTF-8 record."""
  tmp = tmp_path_factory.mktemp("records")
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(700)]
  docs[10], docs[20] = None, ""
  tok = tokenizer.train(iter(d for d in docs if d), vocab_size=300, output=str(tmp / "tok.model"))
  pq.write_table(pa.table({"id": list(range(400)), "text": docs[:400]}), tmp / "a.parquet", row_group_size=50)
  pq.write_table(pa.table({"id": list(range(300)), "text": docs[400:]}), tmp / "b.parquet", row_group_size=64)
  writer = array_record_module.ArrayRecordWriter(str(tmp / "all.array_record"), "group_size:1")
  for i, d in enumerate(docs):
    writer.write(b"\xff\xfe" if d is None else json.dumps({"text": d}).encode() if i % 2 else d.encode())
  writer.close()
  return tmp, docs, tok


def config(corpus, source, **overrides):
  tmp, _, _ = corpus
  path = f"{tmp}/*.parquet" if source == "parquet" else str(tmp / "all.array_record")
  return make_config(
    **{
      "data.source": source,
      "data.path": path,
      "data.tokenizer": str(tmp / "tok.model"),
      "model.vocab_size": 320,
      "data.seq_len": 16,
      "train.global_batch": 4,
      "data.eval_fraction": 0.1,
      **overrides,
    }
  )


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_each_stream_is_its_documents_in_order_packed(corpus):
  _, docs, tok = corpus
  cfg = config(corpus, "parquet")
  it, _ = pipeline.train_and_eval(cfg)
  batches = take(it, 30)
  sequence = it.docs
  for row in range(4):
    rows = batches
    stream = np.concatenate([rows[0]["inputs"][row][:1]] + [b["targets"][row] for b in rows])
    expected, j = [], 0
    while len(expected) < len(stream):
      text = docs[sequence.index(row + 4 * j)]
      expected += (tok.encode(text) if text else []) + [tok.sp.eos_id()]
      j += 1
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    for b in rows:  # a new segment starts after every EOS; its first target is masked, positions restart
      seg, pos, mask, inputs = b["segment_ids"][row], b["positions"][row], b["loss_mask"][row], b["inputs"][row]
      starts = np.flatnonzero(np.diff(seg)) + 1
      assert all(inputs[s - 1] == tok.sp.eos_id() and pos[s] == 0 and mask[s - 1] == 0 for s in starts)


def test_epochs_cover_every_document_once_and_splits_are_disjoint(corpus):
  _, docs, _ = corpus
  cfg = config(corpus, "parquet")
  train, evals = pipeline.train_and_eval(cfg)
  n_train = train.docs.n
  assert (n_train, evals().docs.n) == (630, 70)
  epoch0 = [train.docs.index(p) for p in range(n_train)]
  epoch1 = [train.docs.index(p) for p in range(n_train, 2 * n_train)]
  assert sorted(epoch0) == sorted(epoch1) == list(range(630)) and epoch0 != epoch1
  assert sorted(evals().docs.index(p) for p in range(70)) == list(range(630, 700))


def test_parquet_and_array_record_give_the_same_rows(corpus):
  a, _ = pipeline.train_and_eval(config(corpus, "parquet"))
  b, _ = pipeline.train_and_eval(config(corpus, "array_record"))
  for x, y in zip(take(a, 20), take(b, 20)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_process_shards_and_a_restored_position_give_the_same_rows(corpus):
  cfg = config(corpus, "array_record", **{"train.global_batch": 8})
  full, _ = pipeline.train_and_eval(cfg)
  shards = [pipeline.train_and_eval(cfg, s, 4)[0] for s in range(4)]
  for _ in range(12):
    whole, parts = next(full), [next(s) for s in shards]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  state = json.dumps(full.get_state()).encode()
  expected = take(full, 5)
  resumed, _ = pipeline.train_and_eval(cfg)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 5)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  with pytest.raises(UserError, match="resume array_record data with the same train.global_batch"):
    shards[1].set_state(state)


def test_eval_batches_are_the_same_every_time(corpus):
  _, evals = pipeline.train_and_eval(config(corpus, "parquet"))
  np.testing.assert_array_equal(next(evals())["inputs"], next(evals())["inputs"])


def test_training_from_parquet_in_a_bucket_resumes_exactly(corpus, gcs, tmp_path, monkeypatch):
  tmp, _, _ = corpus
  monkeypatch.setenv("MAXLM_CACHE", str(tmp_path / "cache"))
  for name in ("a.parquet", "b.parquet"):
    storage.write_atomically(f"gs://maxlm-test/parquet/{name}", (tmp / name).read_bytes())
  run = {
    "train.steps": 6,
    "train.log_every": 1,
    "train.eval_every": 3,
    "train.eval_batches": 2,
    "checkpoint.every_steps": 3,
    "metrics.tensorboard": False,
    "metrics.peak_tflops": 1.0,
  }
  local = loop.run(config(corpus, "parquet", **run), str(tmp_path / "a"), devices=jax.devices()[:1])
  cfg = config(corpus, "parquet", **run, **{"data.path": "gs://maxlm-test/parquet"})
  first = loop.run(cfg, str(tmp_path / "b"), devices=jax.devices()[:1], stop_at_step=3)
  rest = loop.run(cfg, str(tmp_path / "b"), devices=jax.devices()[:1])
  assert [(r["step"], r["loss"], r.get("eval_loss")) for r in first + rest] == [
    (r["step"], r["loss"], r.get("eval_loss")) for r in local
  ]
  found, bos = tokenizer.for_run(str(tmp_path / "b"))  # sampling and export find data.tokenizer
  assert found.info()["sha256"] == corpus[2].info()["sha256"] and not bos


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.text_field": "body"}, r"has no string column 'body' \(columns: id, text\): set data.text_field"),
    ({"data.path": "/nonexistent/*.parquet"}, r"matches no parquet file \(.parquet\); check the path"),
    ({"data.tokenizer": "/nonexistent.model"}, r"data.tokenizer='/nonexistent.model': no such file"),
    ({"data.tokenizer": ""}, r"tokenizes as it reads: pass --config.data.tokenizer=FILE.model"),
    ({"data.num_workers": 2}, r"reads in the training process; set it to 0"),
    ({"model.vocab_size": 256}, r"a 300-token vocabulary but model.vocab_size=256"),
  ],
)
def test_bad_inputs_are_one_line_errors(corpus, overrides, message):
  with pytest.raises(UserError, match=message):
    pipeline.train_and_eval(config(corpus, "parquet", **overrides))


def test_a_file_that_is_not_parquet_is_named(corpus, tmp_path):
  (tmp_path / "bad.parquet").write_bytes(b"not parquet")
  with pytest.raises(UserError, match=r"bad.parquet is not a readable Parquet file"):
    pipeline.train_and_eval(config(corpus, "parquet", **{"data.path": str(tmp_path / "bad.parquet")}))
  assert records.split_bounds(10, 0.1, 1) == (9, 10) and records.split_bounds(10, 0.0, 0) == (0, 10)
