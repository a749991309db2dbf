"""Content that spells a special token stays text: `rtune data inspect --json` on such records.

Writes three records whose instructions and responses contain `<eos>`, `<bos>`, `<|im_end|>`,
`<|im_start|>`, `<start_of_turn>`, `<s>` and `</s>`, runs the real CLI for every method, with the
Gemma and SmolLM2 tokenizers (tulu, and SmolLM2's own ChatML template), and prints per record
whether the response is trained verbatim, which special tokens carry a label (expected: the end
token alone, once) and whether the whole sequence holds the same special tokens as a plain control
record's (those of the template alone: nothing injected into the prompt either):

    python scripts/special_text_check.py
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from rtune.models.builtin import builtin_tokenizer_dir
from rtune.render import IGNORE, METHODS

RECORDS = [
    {"instruction": "Explain what <eos> and <bos> mean in <start_of_turn>user turns.",
     "response": "In Gemma, <bos> starts a sequence and <eos> ends it; <start_of_turn> opens a turn."},
    {"instruction": "Why does ChatML end a message with <|im_end|>?",
     "response": "ChatML closes each message with <|im_end|>, e.g. <|im_start|>user\nhi<|im_end|>."},
    {"instruction": "Fix this HTML: <s>old</s>",
     "response": "Use <del>old</del> instead of <s>old</s>; SentencePiece models call their BOS <s> and EOS </s>."},
    {"instruction": "Name a colour.", "response": "Blue."},  # control: the template's own special tokens
]
MODELS = [("gemma-3-270m", ["tulu"]), ("smollm2-135m-instruct", ["tulu", "model"])]  # Gemma base has no chat template


def inspect(path: Path, model: str, method: str, template: str, index: int) -> dict:
    command = ["rtune", "data", "inspect", str(path), "--model", model, "--method", method,
               "--template", template, "--index", str(index), "--json"]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "special.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        failures = 0
        for model, templates in MODELS:
            tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir(model))
            special = set(tokenizer.all_special_ids)
            for template in templates:
                for method in METHODS:
                    verbatim, trained_specials, all_specials = [], [], []
                    for index, record in enumerate(RECORDS):
                        shown = inspect(path, model, method, template, index)
                        all_specials.append([t for t in shown["input_ids"] if t in special])
                        trained = [t for t, label in zip(shown["input_ids"], shown["labels"]) if label != IGNORE]
                        verbatim.append(record["response"] in shown["trained_text"])
                        trained_specials.append(tokenizer.convert_ids_to_tokens([t for t in trained if t in special]))
                    as_control = all(found == all_specials[-1] for found in all_specials)
                    ok = all(verbatim) and all(len(s) == 1 for s in trained_specials) and as_control
                    failures += not ok
                    print(f"{model:22} {template:5} {method:14} response trained verbatim: {all(verbatim)}  "
                          f"special tokens trained per record: {trained_specials}  "
                          f"sequence's special ids as the control's: {as_control}  {'ok' if ok else 'FAIL'}")
        print("all ok" if not failures else f"{failures} combinations FAILED")


if __name__ == "__main__":
    main()
