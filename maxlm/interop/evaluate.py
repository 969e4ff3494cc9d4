"""`maxlm eval`: held-out loss, perplexity and bits per byte of a run on a prepared dataset's `val` split.

Rows are the training pipeline's eval rows (`pipeline.PackedSource`, same seed): documents shuffled, concatenated
and cut into rows of seq_len + 1 tokens (read in a shuffled order), each row's targets the next seq_len
tokens. A target counts when its input token is in the same document (the `loss_mask`), so the first token
of every document is never a target and every other token, EOS included, is a target exactly once in a
full pass. `batches=None` is one full pass (the tokens after the last whole row are left out); N batches
read the first N·batch_size rows, at most one pass, so no target is counted twice.

  loss           = total nats / counted targets                    (nats per token)
  perplexity     = exp(loss)
  bits_per_byte  = total nats / ln 2 / total bytes
  bytes          = sum over counted targets of the UTF-8 bytes the target token decodes to: a piece's text
                   ("▁" is a space), 1 for a byte-fallback token, 0 for control tokens (EOS, BOS, pad) and
                   unknown. Summed over a document's targets this is the document's text minus what its first
                   token decodes to (a document's first piece may carry SentencePiece's dummy-prefix space,
                   which is not text; it is never a target).

Bits per byte does not depend on the tokenizer: two models with different vocabularies are compared on the
same bytes, up to each document's first token. The rows are spread over all local devices (parameters
replicated); a last partial batch is padded with masked rows.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import ml_collections
import numpy as np
from flax import nnx

from maxlm.config import DCN_AXES, MESH_AXES
from maxlm.data import pipeline, tokenizer
from maxlm.errors import UserError
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import checkpoint
from maxlm.training import step as step_lib

log = logging.getLogger("maxlm")


def token_bytes(tok: tokenizer.Tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] int64: the UTF-8 bytes each token id decodes to (see the module docstring); ids beyond the
  tokenizer's vocabulary count 0."""
  sp = tok.sp
  out = np.zeros(vocab_size, np.int64)
  for i in range(min(sp.vocab_size(), vocab_size)):
    if sp.is_byte(i):
      out[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return out


def evaluate(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  dataset: str,
  *,
  step: int | None = None,
  batches: int | None = None,
  batch_size: int | None = None,
  seq_len: int | None = None,
  seed: int | None = None,
  devices=None,
) -> dict:
  """The metrics of the module docstring for `workdir`'s model (newest checkpoint, `step`, or imported
  parameters: step None) on `dataset`'s val split, as a JSON-ready dict."""
  devices = list(jax.devices() if devices is None else devices)
  if jax.process_count() > 1:
    raise UserError("maxlm eval runs in a single process")
  batch_size = cfg.train.global_batch if batch_size is None else batch_size
  seq_len = cfg.data.seq_len if seq_len is None else seq_len
  if batch_size < 1 or seq_len < 1 or (batches is not None and batches < 1):
    raise UserError("--batches, --batch_size and --seq_len must be positive")
  source = pipeline.PackedSource(dataset, "val", seq_len, cfg.data.seed if seed is None else seed)
  data_vocab = source.manifest["tokenizer"]["vocab_size"]
  if data_vocab > cfg.model.vocab_size:
    raise UserError(
      f"--data={dataset} was tokenized with a {data_vocab}-token vocabulary, more than the model's "
      f"{cfg.model.vocab_size}"
    )
  tok = tokenizer.from_manifest(dataset)
  if tok is None:
    raise UserError(
      f"--data={dataset}: the tokenizer its manifest names ({source.manifest['tokenizer']['path']}) "
      "is missing or changed; bits per byte needs it"
    )
  model_tok, _ = tokenizer.for_run(workdir)
  if model_tok is not None and tok.info()["sha256"] != model_tok.info()["sha256"]:
    raise UserError(
      f"--data={dataset} was tokenized with {tok.path}, not with the model's tokenizer "
      f"{model_tok.path}: prepare the data with the model's tokenizer"
    )
  nbytes_V = token_bytes(tok, cfg.model.vocab_size)

  rows = source.rows_per_epoch if batches is None else min(batches * batch_size, source.rows_per_epoch)
  dp = len(devices)
  padded = -(-batch_size // dp) * dp  # Rows per batch, a multiple of the devices; extra rows are masked.
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mesh.update({a: 1 for a in (*MESH_AXES, *(f"dcn_{a}" for a in DCN_AXES))}, data=dp)  # data parallel only
  _, step = checkpoint.params_location(workdir, step)
  m = checkpoint.restore_model(cfg, workdir, devices, step)
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  graphdef, params = nnx.split(m)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    chunk = cfg.train.loss_chunk if cfg.train.loss_chunk and seq_len % cfg.train.loss_chunk == 0 else 0
    sums = jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef, loss_chunk=chunk))
    nats, targets, total_bytes = 0.0, 0, 0
    for begin in range(0, rows, batch_size):
      batch = _batch(source, range(begin, min(begin + batch_size, rows)), padded, seq_len)
      total_bytes += int(np.sum(nbytes_V[batch["targets"]] * batch["loss_mask"]))
      device_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
      s, n = jax.device_get(sums(params, device_batch))  # Blocking: one program in flight.
      nats, targets = nats + float(s), targets + int(n)
  loss = nats / max(targets, 1)
  return {
    "step": step,
    "data": dataset,
    "split": "val",
    "rows": rows,
    "full_pass": rows == source.rows_per_epoch,
    "seq_len": seq_len,
    "targets": targets,
    "bytes": total_bytes,
    "nats": nats,
    "loss": loss,
    "perplexity": math.exp(loss),
    "bits_per_byte": nats / math.log(2) / max(total_bytes, 1),
  }


def _batch(source: pipeline.PackedSource, indices: range, rows: int, seq_len: int) -> dict[str, np.ndarray]:
  examples = [source[i] for i in indices]
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in step_lib.BATCH_KEYS}
  batch["segment_ids"][:] = 1  # Padding rows: one segment, every target masked.
  for r, example in enumerate(examples):
    for k in step_lib.BATCH_KEYS:
      batch[k][r] = example[k]
  return batch
