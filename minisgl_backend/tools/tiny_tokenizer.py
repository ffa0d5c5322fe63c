"""A tiny byte-level BPE tokenizer, trained offline, for tests (no hub, no network).

    from minisgl_backend.tools.tiny_tokenizer import save_tiny_tokenizer
    tok = save_tiny_tokenizer("/tmp/tiny")          # writes tokenizer.json + tokenizer_config.json
    AutoTokenizer.from_pretrained("/tmp/tiny")      # loads the same tokenizer back

Deterministic: the same files every run (the corpus is built in, training is single-pass BPE).
The byte-level alphabet is always in the vocabulary, so any text (any Unicode) round-trips, and
multi-byte UTF-8 characters may be split across tokens (good for detokenizer tests).
"""

from __future__ import annotations

import json
import os
import sys

VOCAB_SIZE = 512
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "What is the capital of France? The capital of France is Paris.",
    "What is 2 + 2? It is 4. What is 12 * 12? It is 144.",
    "The year 2024 had 366 days; the year 2023 had 365 days.",
    "Call me at 555-0134 or write to hello@example.com before 10:30 am.",
    "Prices rose by 3.5% in March, from $19.99 to $20.69.",
    "She said: \"Let's meet at the café near the station.\"",
    "He was naïve about the façade of the old château.",
    "Voilà! The piñata broke, and everyone cheered.",
    "Müller and Søren went to Zürich for a coöperative meeting.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "中文也可以：你好，世界！",
    "Русский текст: привет, мир.",
    "Ελληνικά: γειά σου κόσμε.",
    "Emoji are fun 😀 🚀 🎉 👍 and hearts ❤️ too.",
    "Math symbols: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14159.",
    "A list: apples, bananas, cherries, dates, and elderberries.",
    "Once upon a time, there was a little robot who loved to read books.",
    "The robot read every book in the library, one page at a time.",
    "In the morning, the sun rises in the east and sets in the west.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "if x > 0 and y < 0: print('mixed signs')",
    "{\"name\": \"tiny\", \"size\": 512, \"ok\": true}",
    "<html><body><p>Hello</p></body></html>",
    "Question: Why is the sky blue? Answer: Rayleigh scattering of sunlight.",
    "The assistant answers questions politely and concisely.",
    "user: tell me a joke\nassistant: Why did the chicken cross the road?",
    "Tabs\tand\tnewlines\nare whitespace too.\n\n",
    "UPPER CASE, lower case, Title Case, and MiXeD cAsE.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 42 99 100 1000 65536.",
    "Punctuation: ! ? . , ; : ' \" ( ) [ ] { } - _ = + * / \\ | @ # $ % ^ & ~ `",
    "The weather today is sunny with a chance of rain in the afternoon.",
    "Please summarize the following paragraph in one sentence.",
    "Thank you for your help, it was very useful.",
    "Good night, sleep well, and see you tomorrow.",
]


def corpus() -> list[str]:
    """The built-in training corpus (a few KB), repeated a little so common merges win."""
    return _SENTENCES * 3


# Qwen2's pre-tokenizer regex. The tiny tokenizer uses exactly Qwen2's normalizer (NFC) and
# pre-tokenizer, so that a folder whose config.json says model_type qwen2 (for which
# transformers forces `Qwen2Tokenizer`, rebuilding those parts itself) tokenizes identically.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build_tiny_tokenizer():
    """The tokenizer as a `PreTrainedTokenizerFast` (not saved)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_tokenizer(out_dir: str):
    """Train (offline) and save the tiny tokenizer to `out_dir`; return it.

    tokenizer_config.json names `PreTrainedTokenizerFast` as tokenizer_class, so AutoTokenizer
    loads this exact tokenizer even beside a config.json of another model type (e.g. qwen2).
    """
    os.makedirs(out_dir, exist_ok=True)
    fast = build_tiny_tokenizer()
    fast.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    # transformers may also write chat_template.jinja; keep it consistent with the config.
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATE)
    return fast


if __name__ == "__main__":  # python -m minisgl_backend.tools.tiny_tokenizer OUT_DIR
    out = sys.argv[1] if len(sys.argv) > 1 else "tiny_tokenizer"
    t = save_tiny_tokenizer(out)
    print(f"saved tiny tokenizer (vocab {len(t)}) to {out}")
