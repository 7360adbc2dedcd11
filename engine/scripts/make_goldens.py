#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for the engine's forward-pass tests.

Builds two tiny byte-level BPE tokenizers (GPT-2 style, and SmolLM2 style: digits split one
by one before byte-level BPE, no prefix space) and three tiny random models:

  llama         LLaMA, tied embeddings, grouped-query attention (4 query / 2 KV heads),
                non-default rope_theta
  llama-pruned  LLaMA shaped as after head removal: 2 query heads / 1 KV head of explicit
                head_dim 12 while hidden is 32 (so q/k/v widths are not hidden-derived), untied
                LM head, biases on q/k/v/o (attention_bias). (transformers 5 refuses configs
                whose hidden size is not a multiple of the head count, e.g. 3 heads of 32.)
  gpt2          GPT-2 with learned positions, fused c_attn (Conv1D), gelu_new, n_inner 2x

saves each as a Hugging Face directory (config.json, model.safetensors, tokenizer.json)
under engine/tests/fixtures/, runs fixed token sequences through transformers and records:

  golden.json                   token ids, per-token NLL, losses, greedy continuations,
                                perplexities by the HF fixed-length loop, tokenizer ids
  <model>.logits.safetensors    full f32 logits of the random sequence (the text sequence is
                                checked through its per-token NLL, to keep fixtures small)

Usage (from the repository root, with torch, transformers, tokenizers, safetensors installed):

    python engine/scripts/make_goldens.py [--out engine/tests/fixtures]

Everything is seeded; the committed outputs are what the Rust tests compare against, so rerun
this only to change the fixtures (and commit the new files together with the script).
"""

import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SEED = 1234

# Training text for the tokenizers and the evaluation text of the perplexity goldens:
# written for this file (no third-party text), with digits, punctuation and a little Unicode.
CORPUS = [
    "The gardener pruned the old pear tree in March 1911, leaving 3 strong branches on the wall.",
    "An espalier is a tree trained to grow flat against a wall, its branches tied to wires.",
    "In 2024 the orchard had 128 trees; by 2026 there were 256, planted in rows of 16.",
    "Pruning removes what the tree does not need, so that the rest grows stronger.",
    "She counted 7 apples, 12 pears and 30 plums, then wrote the numbers in her notebook.",
    "Winter is the time to cut, summer the time to tie in the new shoots along the wires.",
    "A branch that grows toward the wall is removed; one that grows along it is kept.",
    "The wall warms the fruit in the evening, and the pears ripen two weeks earlier.",
    "Café owners in the village bought the pears at 4.50 a basket, naïvely cheap.",
    "Every year the gardener measured the trunk: 10 cm, 11 cm, 13 cm, then 14 cm.",
    "Good tools matter: a sharp knife, a clean saw, and patience above all.",
    "The model of a tree is simple: roots, trunk, branches, spurs, leaves and fruit.",
]

EVAL_TEXT = " ".join(CORPUS[::-1]) + "\n\n" + " ".join(CORPUS)

TOKENIZER_TESTS = [
    "Hello world",
    " leading space and  two spaces",
    "In 1911, 42 apples cost 3.50.",
    "naïve café — 東京 🌳",
    "line one\nline two\n\n\ttabbed",
    "<|endoftext|>special in text",
    "",
]


def train_tokenizer(kind):
    tok = Tokenizer(models.BPE())
    if kind == "gpt2":
        specials = ["<|endoftext|>"]
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        # SmolLM2: digits one by one, then GPT-2 byte-level without a prefix space.
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def randomize(model, gen):
    """Larger-than-default random weights so logits spread over several units: with HF's
    0.02 init every logit is ~0 and a 1e-4 tolerance would test nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[0] if "transformer.h." in name else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(fan_in)))


def hf_perplexity(model, ids, window, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity, verbatim in substance."""
    seq_len = ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + window, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    return float(torch.exp(avg_nll))


def run_model(name, model, tok, out_dir, gen, vocab):
    model.eval()
    model_dir = os.path.join(out_dir, name)
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    # Only the files the tests need: transformers also writes generation_config.json.
    for extra in os.listdir(model_dir):
        if extra not in ("config.json", "model.safetensors", "tokenizer.json"):
            os.remove(os.path.join(model_dir, extra))

    random_ids = torch.randint(0, vocab, (1, 24), generator=gen)
    text_ids = torch.tensor([tok.encode(EVAL_TEXT).ids[:32]])
    sequences = {"random": random_ids, "text": text_ids}
    logits_out = {}
    record = {"sequences": {}}
    with torch.no_grad():
        for seq_name, ids in sequences.items():
            out = model(ids, labels=ids)
            logits = out.logits[0].float()
            if seq_name == "random":
                logits_out[seq_name] = logits.contiguous()
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
            record["sequences"][seq_name] = {
                "ids": ids[0].tolist(),
                "loss": float(out.loss),
                "nll": [float(v) for v in nll],
            }
        # Greedy continuation of a prompt, by argmax of full forwards (no cache involved).
        prompt = random_ids[0, :6].tolist()
        seq = list(prompt)
        for _ in range(8):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
        record["greedy"] = {"prompt": prompt, "generated": seq[len(prompt):]}

    all_ids = torch.tensor([tok.encode(EVAL_TEXT).ids])
    record["perplexity"] = {
        "text_tokens": all_ids.size(1),
        "runs": [
            {"window": w, "stride": s, "perplexity": hf_perplexity(model, all_ids, w, s)}
            for (w, s) in [(32, 16), (32, 32), (48, 10)]
        ],
    }
    save_file(logits_out, os.path.join(out_dir, "golden", f"{name}.logits.safetensors"))
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    args = parser.parse_args()
    out_dir = os.path.normpath(args.out)
    os.makedirs(os.path.join(out_dir, "golden"), exist_ok=True)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    toks = {"gpt2": train_tokenizer("gpt2"), "smollm": train_tokenizer("smollm")}
    golden = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "eval_text": EVAL_TEXT,
        "tokenizers": {},
        "models": {},
    }
    for kind, tok in toks.items():
        fast = PreTrainedTokenizerFast(tokenizer_object=tok)
        cases = []
        for text in TOKENIZER_TESTS:
            ids = tok.encode(text).ids
            # transformers' own call must agree with the tokenizers library it wraps.
            assert fast(text)["input_ids"] == ids, (kind, text)
            cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
        golden["tokenizers"][kind] = {"vocab_size": tok.get_vocab_size(), "cases": cases}

    smol = toks["smollm"]
    v = smol.get_vocab_size()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )
    )
    pruned = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=12,
            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=100000.0,
            tie_word_embeddings=False, attention_bias=True, bos_token_id=1, eos_token_id=2,
        )
    )
    g = toks["gpt2"]
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=g.get_vocab_size(), n_embd=32, n_head=4, n_layer=2, n_positions=64, n_inner=64,
            activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
        )
    )
    for name, model, tok in [("llama", llama, smol), ("llama-pruned", pruned, smol), ("gpt2", gpt2, g)]:
        randomize(model, gen)
        golden["models"][name] = run_model(name, model, tok, out_dir, gen, tok.get_vocab_size())

    with open(os.path.join(out_dir, "golden", "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote fixtures to {out_dir}")


if __name__ == "__main__":
    main()
