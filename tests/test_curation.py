"""Curation in `maxlm data prepare`: near dedup, quality rules, Parquet input, worker processes, progress output."""

import ast
import collections
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import sysconfig
import termios

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maxlm.data import corpus, dataset, dedup, prepare, quality, tokenizer
from maxlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tokenizer.train(
    corpus.documents(corpus.expand([STDLIB_JSON]), collections.Counter()), vocab_size=600, output=out
  )


def words(count: int, length: int = 5, start: int = 1000) -> list[str]:
  """`count` distinct lowercase words of `length` letters (base-26 numerals from `start`)."""
  out = []
  for i in range(start, start + count):
    letters = []
    for _ in range(length):
      i, r = divmod(i, 26)
      letters.append(chr(97 + r))
    out.append("".join(letters))
  return out


def prose(count: int = 80, start: int = 1000) -> str:
  """A document that passes every prose rule: distinct words, two stop words, one sentence per line."""
  ws = words(count, start=start)
  return "\n".join(" ".join(["The", *ws[i : i + 10], "and", "so."]) for i in range(0, count, 10)) + "\n"


def decoded(tok, directory):
  out = []
  for split in dataset.SPLITS:
    tokens, index, _ = dataset.load_split(directory, split)
    out += [tok.decode(tokens[a : b - 1].tolist()) for a, b in zip(index[:-1], index[1:])]
  return sorted(out)


# --- Near dedup -------------------------------------------------------------------------------------------------


def shingles(text: str, k: int = 5) -> set:
  w = dedup.words(text)
  return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}


def test_minhash_estimates_jaccard_similarity():
  rng = np.random.default_rng(0)
  vocab = words(2000)
  base = list(rng.choice(vocab, 400))
  for changes in (2, 10, 40, 120):
    other = list(base)
    for i in rng.choice(len(base), changes, replace=False):
      other[i] = "changed" + str(i)
    a, b = " ".join(base), " ".join(other)
    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    estimate = np.mean(dedup.signature(dedup.words(a)) == dedup.signature(dedup.words(b)))
    assert abs(estimate - true) < 4 * np.sqrt(true * (1 - true) / dedup.NUM_PERM) + 0.01, (changes, true, estimate)


def test_bands_follow_the_threshold():
  for threshold in (0.7, 0.8, 0.9):
    bands, rows = dedup.choose_bands(threshold)
    assert bands * rows <= dedup.NUM_PERM
    assert dedup.candidate_probability(threshold, bands, rows) > 0.8  # recall: candidates are verified anyway
    assert dedup.candidate_probability(threshold + 0.05, bands, rows) > 0.95
    assert dedup.candidate_probability(threshold - 0.3, bands, rows) < 0.1  # few comparisons of unrelated pairs
  assert dedup.choose_bands(0.8) == (14, 9)  # as documented in maxlm/data/dedup.py and docs/data.md


def test_planted_near_duplicates_are_removed_and_the_first_is_kept(tok, tmp_path):
  rng = np.random.default_rng(1)
  vocab = words(3000)
  base = [str(w) for w in rng.choice(vocab, 300)]
  variant = list(base)
  for i in (40, 150, 260):  # three words changed: Jaccard ~0.9 at 5-word shingles
    variant[i] = "different"
  half = base[:150] + [str(w) for w in rng.choice(vocab, 150)]  # shares half: Jaccard ~0.33
  docs = {
    "a_base.txt": base,
    "b_variant.txt": variant,
    "c_half.txt": half,
    "d_unrelated.txt": [str(w) for w in rng.choice(vocab, 300)],
  }
  src = tmp_path / "src"
  src.mkdir()
  for name, ws in docs.items():
    (src / name).write_text(" ".join(ws) + "\n")
  manifest = prepare.prepare([str(src)], tok.path, str(tmp_path / "out"), dedup="near", filters="none")
  assert manifest["curation"]["near_duplicates"] == 1 and manifest["curation"]["exact_duplicates"] == 0
  assert manifest["sources"][str(src / "b_variant.txt")]["near_duplicates"] == 1
  assert manifest["curation"]["near_dedup"] == {
    "threshold": 0.8,
    "shingle_words": 5,
    "num_perm": 128,
    "bands": 14,
    "rows": 9,
  }
  kept = {" ".join(ws) + "\n" for name, ws in docs.items() if name != "b_variant.txt"}
  assert set(decoded(tok, str(tmp_path / "out"))) == kept
  report = (tmp_path / "out" / "curation_report.md").read_text()
  assert f"- kept `{src}/a_base.txt` #0\n  - dropped `{src}/b_variant.txt` #0, Jaccard ≈ 0.8" in report

  # Input order decides which one stays; a high threshold keeps both.
  prepare.prepare([str(src / "b_variant.txt"), str(src)], tok.path, str(tmp_path / "rev"), dedup="near", filters="none")
  assert " ".join(variant) + "\n" in decoded(tok, str(tmp_path / "rev"))
  assert " ".join(base) + "\n" not in decoded(tok, str(tmp_path / "rev"))
  strict = prepare.prepare(
    [str(src)], tok.path, str(tmp_path / "strict"), dedup="near", near_threshold=0.99, filters="none"
  )
  assert strict["curation"]["near_duplicates"] == 0
  exact = prepare.prepare([str(src)], tok.path, str(tmp_path / "exact"), filters="none")
  assert exact["curation"]["near_duplicates"] == 0 and "near_dedup" not in exact["curation"]


# --- Quality rules ----------------------------------------------------------------------------------------------


def repeated(lengths: list[int], times: int, total: int) -> str:
  """An n-gram of words with these lengths, `times` in a row, then distinct filler words: `total` word chars."""
  gram = [chr(ord("a") + j) * n for j, n in enumerate(lengths)]
  filler_chars = total - times * sum(lengths)
  filler = words(filler_chars // 5) + (["Z" * (filler_chars % 5)] if filler_chars % 5 else [])
  return " ".join(gram * times + filler)


def split_sizes(chars: int, n: int) -> list[int]:
  return [chars // n + (j < chars % n) for j in range(n)]


def _marked(mark, count):
  """100 one-word lines, the first `count` of them changed by `mark`."""
  ws = words(100)
  return "\n".join(mark(w) if i < count else w for i, w in enumerate(ws))


def _duplicated(count, sep):
  """100 pieces of which `count` repeat the first."""
  unique = words(100 - count)
  return sep.join(unique + [unique[0]] * count)


def _numbers(count):
  ws = words(100)
  return " ".join(str(10_000 + i) if i < count else w for i, w in enumerate(ws))


# rule set/rule name -> (document exactly at the threshold: kept, document just beyond it: dropped)
CASES = {
  "word_count_min": (" ".join(words(50)), " ".join(words(49))),
  "word_count_max": (" ".join(words(100_000)), " ".join(words(100_001))),
  "mean_word_length_min": (" ".join(words(50, 3)), " ".join(words(49, 3) + ["ab"])),
  "mean_word_length_max": (" ".join(words(50, 10)), " ".join(words(49, 10) + ["a" * 11])),
  "symbol_word_ratio_max": (
    _marked(lambda w: "#" + w, 10).replace("\n", " "),
    _marked(lambda w: "#" + w, 11).replace("\n", " "),
  ),
  "bullet_lines_max": (_marked(lambda w: "- " + w, 90), _marked(lambda w: "- " + w, 91)),
  "ellipsis_lines_max": (_marked(lambda w: w + "...", 30), _marked(lambda w: w + "...", 31)),
  "alpha_words_min": (_numbers(20), _numbers(21)),
  "stop_words_min": (" ".join(words(60) + ["The", "and"]), " ".join(words(60) + ["the", "the"])),
  "duplicate_lines_max": (_duplicated(30, "\n"), _duplicated(31, "\n")),
  "duplicate_line_chars_max": ("\n".join(["a" * 20, "b" * 60, "a" * 20]), "\n".join(["a" * 21, "b" * 58, "a" * 21])),
  "duplicate_paragraphs_max": (_duplicated(30, "\n\n"), _duplicated(31, "\n\n")),
  "duplicate_paragraph_chars_max": (
    "\n\n".join(["a" * 20, "b" * 60, "a" * 20]),
    "\n\n".join(["a" * 21, "b" * 58, "a" * 21]),
  ),
  # The top n-gram 5 times (share x 1000 word chars), or a repeated n-gram whose copy holds share x 1000 chars.
  **{
    f"top_{n}gram_chars_max": (
      repeated(split_sizes(round(share * 1000) // 5, n), 5, 1000),
      repeated(split_sizes(round(share * 1000) // 5, n), 5, 999),
    )
    for n, share in ((2, 0.2), (3, 0.18), (4, 0.16))
  },
  **{
    f"duplicate_{n}gram_chars_max": (
      repeated(split_sizes(round(share * 1000), n), 2, 1000),
      repeated(split_sizes(round(share * 1000), n), 2, 999),
    )
    for n, share in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.1))
  },
}
CODE_CASES = {
  "word_count_min": (" ".join(words(10)), " ".join(words(9))),
  "word_count_max": CASES["word_count_max"],
  "max_line_length_max": ("x" * 1000 + "\nshort", "x" * 1001 + "\nshort"),
  "mean_line_length_max": ("a" * 99 + "\n" + "b" * 100, "a" * 99 + "\n" + "b" * 101),
  "alphanumeric_chars_min": ("a" * 25 + "+" * 75, "a" * 24 + "+" * 76),
  "duplicate_paragraph_chars_max": ("\n\n".join(["a" * 40] * 3 + ["b" * 40]), "\n\n".join(["a" * 40] * 3 + ["b" * 39])),
  "duplicate_10gram_chars_max": (repeated([10] * 10, 4, 500), repeated([10] * 10, 4, 499)),
}


@pytest.mark.parametrize("rules, name", [("prose", n) for n in CASES] + [("code", n) for n in CODE_CASES])
def test_each_rule_at_and_beyond_its_threshold(rules, name):
  rule = next(r for r in quality.RULE_SETS[rules] if r.name == name)
  inside, over = (CASES if rules == "prose" else CODE_CASES)[name]
  at = quality.measure(inside)[rule.stat]
  assert at == rule.value and not rule.breaks(quality.measure(inside)), (at, rule)
  assert rule.breaks(quality.measure(over)), (quality.measure(over)[rule.stat], rule)


def test_every_rule_has_a_case():
  assert [r.name for r in quality.PROSE] == list(CASES)
  assert [r.name for r in quality.CODE] == list(CODE_CASES)


def test_clean_prose_and_ordinary_code_pass():
  assert quality.first_failure(quality.measure(prose()), quality.PROSE) is None
  modules = [os.path.join(STDLIB_JSON, f) for f in sorted(os.listdir(STDLIB_JSON)) if f.endswith(".py")]
  stats = [quality.measure(open(f).read()) for f in modules]
  assert all(quality.first_failure(s, quality.CODE) is None for s in stats)
  # Why code has its own rules: Gopher's prose rules drop ordinary modules (3 of the 5 in json/).
  assert sum(quality.first_failure(s, quality.PROSE) is not None for s in stats) >= 2


def test_filters_drop_count_and_report(tok, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "good.txt").write_text(prose())
  (src / "short.txt").write_text("Too short to be a useful document, and it says so.\n")
  (src / "listy.md").write_text("\n".join("- " + w for w in words(60)) + "\n")
  with open(os.path.join(STDLIB_JSON, "decoder.py")) as f:  # passes the code rules, fails Gopher's (5-grams)
    (src / "module.py").write_text(f.read())
  (src / "tiny.py").write_text("import os\n")
  manifest = prepare.prepare([str(src)], tok.path, str(tmp_path / "out"))
  filters = manifest["curation"]["filters"]
  assert filters["prose"]["word_count_min"] == 1 and filters["prose"]["bullet_lines_max"] == 1
  assert filters["code"]["word_count_min"] == 1 and manifest["curation"]["filtered"] == 3
  assert sum(sum(c.values()) for c in filters.values()) == 3
  assert manifest["curation"]["thresholds"]["prose"]["alpha_words_min"] == 0.8
  assert manifest["sources"][str(src / "tiny.py")] == {"filtered": 1}
  assert len(decoded(tok, str(tmp_path / "out"))) == 2  # good.txt and module.py
  report = (tmp_path / "out" / "curation_report.md").read_text()
  assert "| bullet_lines_max | bullet_lines > 0.9 | 1 |" in report
  assert f"## prose/word_count_min (first 1)\n\n- `{src}/short.txt` #0 word_count = 11: 'Too short" in report
  assert f"## code/word_count_min (first 1)\n\n- `{src}/tiny.py` #0 word_count = 2: 'import os'" in report
  listy = next(line for line in report.splitlines() if line.startswith(f"- `{src}/listy.md` #0 bullet_lines = 1:"))
  assert ast.literal_eval(listy.split(": ", 1)[1]) == " ".join("- " + w for w in words(60))[:200]  # truncated
  everything = prepare.prepare([str(src)], tok.path, str(tmp_path / "all"), filters="none")
  assert everything["curation"]["filtered"] == 0 and everything["curation"]["filters"] == {}
  assert len(decoded(tok, str(tmp_path / "all"))) == 5
  forced = prepare.prepare([str(src)], tok.path, str(tmp_path / "prose"), filters="prose")
  assert list(forced["curation"]["filters"]) == ["prose"] and forced["curation"]["filtered"] == 4
  with pytest.raises(UserError, match="--filters=strict: choose one of default, prose, code, none"):
    prepare.prepare([str(src)], tok.path, str(tmp_path / "bad"), filters="strict")


# --- Parquet ----------------------------------------------------------------------------------------------------


def test_parquet_input(tok, tmp_path):
  texts = [prose(40, start=1000 + 100 * i) for i in range(7)]
  table = pa.table({"id": list(range(7)), "text": texts[:6] + [None], "body": texts[::-1]})
  pq.write_table(table, tmp_path / "docs.parquet", row_group_size=2)  # 4 row groups, read a batch at a time
  pq.write_table(pa.table({"body": texts}), tmp_path / "other.parquet")
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
  manifest = prepare.prepare([str(tmp_path / "*.parquet")], tok.path, str(tmp_path / "out"))
  assert decoded(tok, str(tmp_path / "out")) == sorted(texts[:6])
  assert manifest["skipped"] == {"parquet file without a string 'text' column": 2, "parquet row with a null 'text'": 1}
  by_body = prepare.prepare([str(tmp_path / "other.parquet")], tok.path, str(tmp_path / "body"), text_field="body")
  assert decoded(tok, str(tmp_path / "body")) == sorted(texts) and by_body["skipped"] == {}
  skipped = collections.Counter()
  assert list(corpus.documents([str(tmp_path / "docs.parquet")], skipped, "body")) == texts[::-1]


# --- Workers and progress ---------------------------------------------------------------------------------------


def corpus_dir(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(24):
    text = prose(60, start=1000 + 500 * i)
    (src / f"{i:02d}.txt").write_text(text)
    if i % 4 == 0:  # a near duplicate of it later in the input: one word of 78 changed, Jaccard ~0.87
      (src / f"{i:02d}_copy.txt").write_text(text.replace(words(60, start=1000 + 500 * i)[33], "edited"))
  (src / "short.txt").write_text("too short\n")
  (src / "exact.txt").write_text(prose(60, start=1000))
  (src / "code.py").write_text(open(os.path.join(STDLIB_JSON, "decoder.py")).read())
  return src


def test_output_is_byte_identical_for_any_worker_count(tok, tmp_path, monkeypatch):
  src = corpus_dir(tmp_path)
  monkeypatch.setattr(prepare, "BATCH_DOCS", 3)  # many batches, so both workers take some and finish out of order
  outputs = {}
  for workers in (1, 2):
    out = tmp_path / f"w{workers}"
    manifest = prepare.prepare([str(src)], tok.path, str(out), dedup="near", val_fraction=0.2, workers=workers)
    outputs[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
  assert manifest["curation"]["near_duplicates"] == 6 and manifest["curation"]["exact_duplicates"] == 1
  assert manifest["curation"]["filtered"] == 1 and manifest["splits"]["val"]["documents"] > 0
  assert list(outputs[1]) == list(outputs[2]) and len(outputs[1]) == 6
  for name in outputs[1]:
    assert outputs[1][name] == outputs[2][name], name
  # The worker count is not a dataset setting: a rerun with another count finds the dataset done.
  assert (
    prepare.prepare([str(src)], tok.path, str(tmp_path / "w1"), dedup="near", val_fraction=0.2, workers=2)["splits"]
    == manifest["splits"]
  )


def _cli(src, tok, out):
  return [
    sys.executable,
    "-m",
    "maxlm",
    "data",
    "prepare",
    "--input",
    str(src),
    "--tokenizer",
    tok.path,
    "--output",
    str(out),
    "--workers",
    "2",
    "--dedup",
    "near",
  ]


def test_progress_on_a_pipe_and_on_a_terminal(tok, tmp_path):
  src = corpus_dir(tmp_path)
  piped = subprocess.run(_cli(src, tok, tmp_path / "piped"), cwd=REPO, capture_output=True, text=True, timeout=180)
  assert piped.returncode == 0, piped.stderr
  assert "\r" not in piped.stderr and "%|" not in piped.stderr  # no bar redraws in a log file
  assert "removed 1 exact duplicates, 6 near duplicates, 1 filtered" in piped.stderr
  main, child = pty.openpty()
  fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
  proc = subprocess.Popen(_cli(src, tok, tmp_path / "tty"), cwd=REPO, stdin=child, stdout=child, stderr=child)
  os.close(child)
  output = b""
  while True:
    try:
      chunk = os.read(main, 4096)
    except OSError:  # the child side closed
      break
    if not chunk:
      break
    output += chunk
  assert proc.wait(timeout=180) == 0, output.decode(errors="replace")
  os.close(main)
  assert b"prepare: 100%|" in output  # tqdm's bar, drawn on the terminal
  tty_manifest = json.loads((tmp_path / "tty" / "manifest.json").read_text())
  piped_manifest = json.loads((tmp_path / "piped" / "manifest.json").read_text())
  assert tty_manifest["splits"] == piped_manifest["splits"]
