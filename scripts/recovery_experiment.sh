#!/usr/bin/env bash
# The recovery experiment of the README ("Recovering pruned SmolLM2 by fine-tuning"): SmolLM2 at
# 50% unstructured and at 2:4, pruned one-shot by the best criterion for each (SparseGPT under
# sequential calibration), then fine-tuned with the masks held, with and without distilling the
# dense model, and with RigL instead of a fixed mask (against the fixed mask at equal tokens).
# Every model is scored on data/eval.txt by its pipeline, and on a second held-out text from
# another source (scripts/fetch-heldout-text.sh) by `espalier eval`; a table of both, with the
# tokens trained and the wall time of each fine-tune, is printed at the end and written to
# out/recovery/summary.md.
#
# Usage: scripts/recovery_experiment.sh [GROUP...]
#   groups (default: all, in this order):
#   (times measured on 2 quiet cores, 2026-12-04)
#     2-4       one-shot SparseGPT 2:4, then its distilled fine-tune       (~24 min)
#     50        one-shot SparseGPT 50%, then its distilled fine-tune on verse and, at equal
#               tokens, on prose at learning rates 1e-4 and 3e-4, at 3e-4 with the
#               hidden-state term, and at 3e-4 with bf16 products on 256-
#               and on 1024-token sequences                              (~2 h 20 min)
#     2-4-ce    SparseGPT 2:4 fine-tuned on cross-entropy alone            (~14 min)
#     rigl      Wanda 50% one-shot, fine-tuned with a fixed mask, then with RigL at equal
#               tokens                                                   (~40 min)
#     2-4-long  the 2:4 distillation run for the whole 2-hour budget: 840 steps, 860,160
#               tokens                                                   (~1 h 46 min)
#     50-long   the 50% distillation for the whole budget, on prose (the State of the Union
#               addresses, fetch:state-of-the-union): 840 steps at 1e-4  (~1 h 40 min)
#     50-long-lr3e-4  the same at 3e-4, 960 steps (983,040 tokens; the faster
#               distillation pass fits them in the same budget)          (~1 h 40 min)
#     50-long-bf16  the same in bf16 products, 1650 steps (1,689,600 tokens; on a 2-core
#               Intel Xeon with AMX, 2026-12-06)                         (~1 h 50 min)
#     50-2h-bf16  the same with the faster bf16 step, 2100 steps (2,150,400 tokens; the
#               same Xeon, 2026-12-06)                                   (~1 h 49 min)
#     heldout   scores every export present on the held-out text           (~30 s per model)
#     summary   prints the table from the reports present
# Environment: ESPALIER (default target/release/espalier; `cargo build --release` first),
# ESPALIER_MODELS (default models/). Interrupted fine-tunes resume from their checkpoints.
set -euo pipefail

ESPALIER=${ESPALIER:-target/release/espalier}
MODELS=${ESPALIER_MODELS:-models}
OUT=out/recovery
die() { echo "recovery-experiment: error: $*" >&2; exit 1; }
[ -x "$ESPALIER" ] || die "$ESPALIER not found: run 'cargo build --release' or set ESPALIER"
mkdir -p "$OUT"

run() { echo "recovery-experiment: espalier run $*" >&2; "$ESPALIER" run "$@"; }

# Export folders (from the pipelines' [export] sections), in table order.
EXPORTS=(
    smollm2-sparsegpt-50-seq smollm2-sparsegpt-50-distill smollm2-sparsegpt-50-distill-prose
    smollm2-sparsegpt-50-distill-prose-lr3e-4 smollm2-sparsegpt-50-distill-prose-lr3e-4-bf16
    smollm2-sparsegpt-50-distill-prose-lr3e-4-bf16-seq1024
    smollm2-sparsegpt-50-distill-prose-hidden30
    smollm2-sparsegpt-50-distill-long
    smollm2-sparsegpt-50-distill-long-lr3e-4
    smollm2-sparsegpt-50-distill-long-lr3e-4-bf16
    smollm2-sparsegpt-50-distill-2h-bf16
    smollm2-wanda-50 smollm2-wanda-50-finetune smollm2-wanda-rigl-50
    smollm2-sparsegpt-2-4-seq smollm2-sparsegpt-2-4-distill smollm2-sparsegpt-2-4-distill-long
    smollm2-sparsegpt-2-4-finetune
)

heldout() {
    local text
    text=$(scripts/fetch-heldout-text.sh "$MODELS/texts/botchan.txt")
    local name model
    for name in dense "${EXPORTS[@]}"; do
        if [ "$name" = dense ]; then model=fetch:smollm2-135m-instruct; else model=out/$name; fi
        [ "$name" = dense ] || [ -f "$model/report.json" ] || continue
        [ -f "$OUT/heldout-$name.json" ] && continue
        echo "recovery-experiment: held-out perplexity of $model" >&2
        "$ESPALIER" eval "$model" --text "$text" --max-tokens 16384 --new-tokens 0 --json \
            > "$OUT/heldout-$name.json.part"
        mv "$OUT/heldout-$name.json.part" "$OUT/heldout-$name.json"
    done
}

summary() {
    python3 - "$OUT" "${EXPORTS[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None

def heldout(name):
    r = load(f"{out}/heldout-{name}.json")
    return r["perplexity"]["perplexity"] if r else None

fmt = lambda x: "—" if x is None else f"{x:.2f}"
ratio = lambda p, d: "—" if p is None or d is None else f"{p / d:.2f}×"
dense_eval = None
rows = []
for name in names:
    r = load(f"out/{name}/report.json")
    if r is None:
        continue
    ev = r["evaluation"]
    dense_eval = ev["dense"]["perplexity"]["perplexity"]
    ft = r.get("finetune")
    if ft is None:
        how = "one-shot"
    elif any(s.get("plugin") == "rigl" for s in r["stages"]):
        how = "fine-tuned, RigL"
    elif ft["spec"].get("distill", {}).get("hidden"):
        how = "fine-tuned, distilled, hidden states"
    elif ft["spec"].get("distill"):
        how = "fine-tuned, distilled"
    else:
        how = "fine-tuned, cross-entropy"
    if ft and ft["spec"].get("precision") == "bf16":
        how += ", bf16 products"
    # The training text by its file name: shakespeare-milton (verse) or state-of-the-union (prose).
    text = ft and os.path.splitext(os.path.basename(ft["spec"]["text"]))[0]
    rows.append((os.path.basename(r["pipeline_file"]), how, ev["pruned"]["perplexity"]["perplexity"],
                 heldout(name), text, ft and ft["tokens_trained"], ft and ft["seconds"]))
dense_held = heldout("dense")
lines = ["| pipeline | model | `data/eval.txt` | × dense | *Botchan* | × dense | training text | tokens trained | fine-tune time |",
         "|---|---|---|---|---|---|---|---|---|",
         f"| | dense | {fmt(dense_eval)} | | {fmt(dense_held)} | | | | |"]
for file, how, ppl, held, text, tokens, secs in rows:
    lines.append(f"| `{file}` | {how} | {fmt(ppl)} | {ratio(ppl, dense_eval)} | {fmt(held)} | "
                 f"{ratio(held, dense_held)} | " + (text or "") + " | "
                 + ("" if tokens is None else f"{tokens:,}") + " | "
                 + ("" if secs is None else f"{secs / 60:.1f} min") + " |")
text = "\n".join(lines) + "\n"
print(text)
with open(f"{out}/summary.md", "w") as f:
    f.write(text)
PY
}

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(2-4 50 2-4-ce rigl 2-4-long 50-long 50-long-lr3e-4 50-long-bf16 50-2h-bf16 heldout summary)
for g in "${groups[@]}"; do
    case $g in
        2-4) run pipelines/smollm2-sparsegpt-2-4-seq.toml pipelines/smollm2-sparsegpt-2-4-distill.toml ;;
        50) run pipelines/smollm2-sparsegpt-seq.toml pipelines/smollm2-sparsegpt-50-distill.toml \
                pipelines/smollm2-sparsegpt-50-distill-prose.toml \
                pipelines/smollm2-sparsegpt-50-distill-prose-lr3e-4.toml \
                pipelines/smollm2-sparsegpt-50-distill-prose-lr3e-4-bf16.toml \
                pipelines/smollm2-sparsegpt-50-distill-prose-lr3e-4-bf16-seq1024.toml \
                pipelines/smollm2-sparsegpt-50-distill-prose-hidden30.toml ;;
        2-4-ce) run pipelines/smollm2-sparsegpt-2-4-finetune.toml ;;
        2-4-long) run pipelines/smollm2-sparsegpt-2-4-distill-long.toml ;;
        50-long) run pipelines/smollm2-sparsegpt-50-distill-long.toml ;;
        50-long-lr3e-4) run pipelines/smollm2-sparsegpt-50-distill-long-lr3e-4.toml ;;
        50-long-bf16) run pipelines/smollm2-sparsegpt-50-distill-long-lr3e-4-bf16.toml ;;
        50-2h-bf16) run pipelines/smollm2-sparsegpt-50-distill-2h-bf16.toml ;;
        rigl) run pipelines/smollm2-wanda.toml pipelines/smollm2-wanda-finetune.toml \
                  pipelines/smollm2-wanda-rigl.toml ;;
        heldout) heldout ;;
        summary) summary ;;
        *) die "unknown group '$g' (2-4, 50, 2-4-ce, rigl, 2-4-long, 50-long, 50-long-lr3e-4, 50-long-bf16, 50-2h-bf16, heldout, summary)" ;;
    esac
done
