#!/usr/bin/env bash
# Fetches the second held-out evaluation text of the recovery experiment (README, "Recovering
# pruned SmolLM2 by fine-tuning"): Natsume Sōseki's *Botchan* in Yasotaro Morri's 1918 English
# translation (revised by J. R. Kennedy, 1919), public domain, as the PyPI package
# `sentencepiece` 0.2.3 ships it in its source distribution (`test/botchan.txt`, Project
# Gutenberg etext #8868). It is another source, period and kind than everything else Espalier
# reads: a twentieth-century novel in translation, where `data/eval.txt` is an encyclopaedia
# article and the training text is Shakespeare and Milton. It is never trained on.
#
# Usage: scripts/fetch-heldout-text.sh DEST_FILE
# Prints DEST_FILE on stdout; progress goes to stderr.
#
# The Project Gutenberg header and license before "*** START OF ..." and everything from "End of
# Project Gutenberg's ..." on are left out (no Gutenberg trademark is used), as is the byte-order
# mark; nothing else is changed. Idempotent: an existing file with the expected SHA-256 is
# reused. The file is written under a temporary name and renamed into place, so an interrupted
# run leaves nothing half-written.
# Environment: PYTHON (default python3); PIP_INDEX_URL (a PEP 503 simple index, default PyPI's)
# and PIP_CERT are honoured as pip honours them.
set -euo pipefail

PACKAGE=sentencepiece
VERSION=0.2.3
# SHA-256 of the sdist's test/botchan.txt as downloaded, and of the text this script writes.
SOURCE_SHA256=464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7
SHA256=777cdd61e668a6617f481873ca8af4b332cef43bef005f9e9ee69c089b40890d
PYTHON=${PYTHON:-python3}

die() { echo "fetch-heldout-text: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: fetch-heldout-text.sh DEST_FILE"
out=$1
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$out" ] && sha_ok "$out"; then
    echo "fetch-heldout-text: $out already present" >&2
    echo "$out"
    exit 0
fi
[ -e "$out" ] && die "$out exists and is not the expected text (SHA-256 differs); move it away first"

command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON to a Python 3"
mkdir -p "$(dirname "$out")" || die "cannot create the folder of $out"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-heldout-text.XXXXXX")
trap 'rm -rf "$tmp"; rm -f "$out.part"' EXIT

# The sdist is read from the index's simple page (PEP 503) rather than by `pip download
# --no-binary`, which prepares the package's metadata and so compiles sentencepiece's C++
# (over 20 minutes on 2 cores) for a file of which one text member is wanted.
echo "fetch-heldout-text: downloading $PACKAGE==$VERSION's source from the package index (~12 MB)" >&2
"$PYTHON" - "$PACKAGE" "$VERSION" "$tmp" <<'PY' >&2 \
    || die "could not download $PACKAGE==$VERSION's source (is the package index reachable? PIP_INDEX_URL names a mirror)"
import hashlib, html.parser, os, ssl, sys, urllib.parse, urllib.request
package, version, tmp = sys.argv[1:]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
page_url = f"{index}/{package}/"
wanted = f"{package}-{version}.tar.gz"

class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []
    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]

with urllib.request.urlopen(page_url, timeout=120, context=context) as page:
    links = Links()
    links.feed(page.read().decode("utf-8"))
hrefs = [h for h in links.hrefs if urllib.parse.urlsplit(h).path.rsplit("/", 1)[-1] == wanted]
if not hrefs:
    sys.exit(f"{page_url} lists no {wanted}")
url = urllib.parse.urljoin(page_url, hrefs[0])
with urllib.request.urlopen(url, timeout=300, context=context) as sdist:
    data = sdist.read()
fragment = urllib.parse.urlsplit(url).fragment
if fragment.startswith("sha256=") and hashlib.sha256(data).hexdigest() != fragment[7:]:
    sys.exit(f"{wanted} from {url} does not match the index's SHA-256")
with open(os.path.join(tmp, wanted), "wb") as f:
    f.write(data)
PY

"$PYTHON" - "$tmp" "$out.part" "$SOURCE_SHA256" <<'PY' || die "could not extract the text from the package"
import glob, hashlib, sys, tarfile
tmp, part, source_sha = sys.argv[1:]
sdists = glob.glob(tmp + "/sentencepiece-0.2.3.tar.gz")
if len(sdists) != 1:
    sys.exit(f"expected sentencepiece-0.2.3.tar.gz in the download, found {sdists}")
with tarfile.open(sdists[0]) as tar:
    raw = tar.extractfile("sentencepiece-0.2.3/test/botchan.txt").read()
if hashlib.sha256(raw).hexdigest() != source_sha:
    sys.exit("test/botchan.txt in the sdist is not the file this script was written for")
lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith("*** START OF"))
end = next(i for i, l in enumerate(lines) if l.startswith("End of Project Gutenberg"))
body = [l.rstrip() for l in lines[start + 1:end]]
# The transcriber's credit line right after the marker is Gutenberg's, not the book's.
if body and body[0].startswith("Produced by"):
    body = body[1:]
while body and not body[-1]:
    body.pop()
with open(part, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n".join(body) + "\n")
PY

sha_ok "$out.part" || die "the extracted text's SHA-256 is $(sha256sum "$out.part" | cut -d' ' -f1), expected $SHA256"
mv "$out.part" "$out"
echo "fetch-heldout-text: wrote $out" >&2
echo "$out"
