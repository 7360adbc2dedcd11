#!/usr/bin/env python3
"""Reference renderings of SmolLM2-135M-Instruct's chat template by transformers.

Reads the model folder's tokenizer_config.json (from `scripts/fetch-smollm2.sh` or
`espalier run pipelines/quickstart.toml`, which fetches it into models/), renders a few
conversations with transformers' `apply_chat_template` (tokenize=False), and writes the
template's config fields and the renderings to tests/fixtures/chat_template_smollm2.json, which
`host/src/generate.rs` checks its minijinja rendering against.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers jinja2
    /tmp/hf/bin/python scripts/make_chat_fixture.py [models/smollm2-135m-instruct]
"""
import json
import pathlib
import sys

from transformers import AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
model = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "models" / "smollm2-135m-instruct"
config = json.loads((model / "tokenizer_config.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(str(model))

conversations = [
    ([{"role": "user", "content": "What is pruning?"}], True),
    ([{"role": "user", "content": "What is pruning?"}], False),
    (
        [
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "Name a tree that is trained as an espalier."},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "  Say   it with spaces\nand a newline.  "},
        ],
        True,
    ),
    ([{"role": "user", "content": "Ünïcödé, emoji 🌳 and \"quotes\"."}], True),
]

cases = []
for messages, add in conversations:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    cases.append({"messages": messages, "add_generation_prompt": add, "rendered": rendered})

fixture = {
    "source": "transformers apply_chat_template, SmolLM2-135M-Instruct tokenizer_config.json",
    "tokenizer_config": {k: config.get(k) for k in ("chat_template", "bos_token", "eos_token")},
    "cases": cases,
}
out = root / "tests" / "fixtures" / "chat_template_smollm2.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {out} ({len(cases)} cases)")
