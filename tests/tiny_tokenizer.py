"""A tiny tokenizer trained on the bundled sample corpus, built once per test session.

(Not named tokenizers.py: tests/ is on sys.path, and that name would shadow the `tokenizers`
package transformers imports.)

`tiny_tokenizer_dir()` has no chat template (the plain template applies);
`tiny_tokenizer_dir(CHATML)`
is the same vocabulary with a ChatML template. Both reserve <|im_start|> and <|im_end|>.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import rega_engine.demo

SAMPLE_DIR = Path(rega_engine.demo.__file__).parent / "sample"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
          "endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.cache
def tiny_tokenizer_dir(chat_template: str | None = None) -> str:
    from rega_engine.tokenizer import train_tokenizer

    out = tempfile.mkdtemp(prefix="rega-tiny-tokenizer-")
    atexit.register(shutil.rmtree, out, True)
    text = (SAMPLE_DIR / "corpus.txt").read_text(encoding="utf-8")
    return str(train_tokenizer([text], out, vocab_size=1000, chat_template=chat_template,
                               special_tokens=CHATML_TOKENS))


def tiny_tokenizer(chat_template: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir(chat_template))
