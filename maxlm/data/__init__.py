"""Data: raw text to curated, tokenized datasets (`maxlm tokenizer`, `maxlm data prepare`), and the Grain
pipelines that feed training.

  corpus     raw text files as documents       tokenizer  SentencePiece
  dedup      exact and MinHash near dedup       quality    Gopher-style quality rules
  prepare    curate + tokenize + write          dataset    the on-disk prepared-dataset format
  pipeline   Grain sources and batches for training (reads `dataset` only: no curation, no SentencePiece)
"""
