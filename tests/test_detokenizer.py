"""Incremental detokenizer (UTF-8 safety, equality with a full decode, stop strings) and the
tokenizer helpers, on the tiny offline byte-level BPE tokenizer."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from minisgl_backend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from minisgl_backend.tokenizer import load_tokenizer
from minisgl_backend.tools.tiny_tokenizer import SPECIAL_TOKENS, corpus, save_tiny_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "She said: \"Let's meet at the café near the station.\" naïve façade",
    "日本語のテキスト、東京は日本の首都です。中文：你好，世界！",
    "Emoji 😀🚀🎉👍❤️ and math α+β=γ ∑x²≤∞",
    "def add(a, b):\n    return a + b\n\n\tTabs  and   spaces",
    "Numbers 0123456789 $19.99 10:30 65536.",
    "Zürich Søren Ελληνικά Русский 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0301 é",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_tok"))
    save_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _stream(tok, ids, chunks, prompt_ids=None, stop=(), skip=True):
    det = IncrementalDetokenizer(tok, prompt_ids, list(stop), skip_special_tokens=skip)
    pieces, stopped, i = [], False, 0
    for n in chunks:
        step = det.feed(ids[i:i + n])
        i += n
        pieces.append(step.text)
        assert "\ufffd" not in step.text or "\ufffd" in tok.decode(ids, skip_special_tokens=skip)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        pieces.append(det.flush())
    return pieces, stopped, det


def _ones(n):
    return [1] * n


# ---------------------------------------------------------------- tiny tokenizer & helpers


def test_tiny_tokenizer_roundtrip_and_determinism(tok_dir, tok, tmp_path):
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    for t in TEXTS + corpus()[:10]:
        assert tok.decode(tok.encode(t)) == t
    other = str(tmp_path / "again")
    save_tiny_tokenizer(other)
    for name in os.listdir(tok_dir):
        with open(os.path.join(tok_dir, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name


def test_multibyte_tokens_exist(tok):
    ids = tok.encode("日本語 😀")
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_tiny_tokenizer_same_beside_model_config(tok, tmp_path, model_type):
    d = str(tmp_path / model_type)
    save_tiny_tokenizer(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": model_type, "vocab_size": 512, "eos_token_id": [0, 2]}, f)
    t2 = load_tokenizer(d)
    for t in TEXTS + ["12345 678", "I'M   x\n\n y"]:
        assert t2.encode(t) == tok.encode(t)
        assert t2.decode(t2.encode(t)) == t


def test_tiny_tokenizer_has_a_chatml_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False).endswith("assistant\n")


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))


# ---------------------------------------------------------------- detokenizer: text equality


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tok, text):
    ids = tok.encode(text)
    pieces, stopped, _ = _stream(tok, ids, _ones(len(ids)))
    assert not stopped
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)


def test_single_token_cache_keeps_special_token_handling_apart(tok):
    """The per-tokenizer cache of one-id texts is keyed by skip_special_tokens too: a special
    token streamed with and without skipping decodes as a full decode would, in either order."""
    special = tok.all_special_ids[0]
    ids = tok.encode("Hi there") + [special] + tok.encode(" again")
    for skip in (False, True, False):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(det.feed([t]).text for t in ids) + det.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)


def test_multibyte_split_never_broken(tok):
    text = "日本語😀🚀é"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, None, [])
    emitted = ""
    for t in ids:
        piece = det.feed([t]).text
        assert "\ufffd" not in piece
        emitted += piece
        assert text.startswith(emitted)
    assert emitted + det.flush() == text


def test_with_prompt_context_and_special_tokens(tok):
    prompt = tok.encode("<|im_start|>user\nSay café<|im_end|>\n<|im_start|>assistant\n")
    out = tok.encode("Sure: café 日本 ") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" end")
    pieces, _, _ = _stream(tok, out, _ones(len(out)), prompt_ids=prompt)
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=True) == "Sure: café 日本  end"
    pieces, _, _ = _stream(tok, out, [3] * (len(out) // 3 + 1), prompt_ids=prompt, skip=False)
    assert "".join(pieces) == tok.decode(out, skip_special_tokens=False)
    assert "<|im_end|>" in "".join(pieces)


def test_prompt_ending_mid_character(tok):
    ids = tok.encode("日本語")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    out = tok.encode(" ok")
    pieces, _, _ = _stream(tok, out, _ones(len(out)), prompt_ids=ids[:cut])
    assert "".join(pieces) == " ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=hs.lists(hs.integers(0, 511), max_size=60), data=hs.data(),
       prompt=hs.lists(hs.integers(3, 511), max_size=8))
def test_random_ids_concat_equals_decode(tok, ids, data, prompt):
    chunks = data.draw(hs.lists(hs.integers(1, 5), min_size=len(ids), max_size=len(ids)))
    prompt_ids = tok.encode("Hi there ") + prompt if prompt else None
    pieces, stopped, _ = _stream(tok, ids, chunks, prompt_ids=prompt_ids)
    assert not stopped
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    # nothing emitted before the end ends inside a character: pieces are a prefix of the text
    assert all(not p.endswith("\ufffd") or "\ufffd" in full for p in pieces)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hs.text(max_size=40), seed=hs.integers(0, 10**6))
def test_random_text_stream_equals_text(tok, text, seed):
    import unicodedata

    text = unicodedata.normalize("NFC", text)
    ids = tok.encode(text)
    rng = random.Random(seed)
    chunks = [rng.randint(1, 4) for _ in ids]
    pieces, _, _ = _stream(tok, ids, chunks)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


def test_window_stays_bounded_on_pathological_stream(tok):
    lead = tok.convert_tokens_to_ids("æ")  # the lone byte 0xE6: every prefix ends inside a char
    ids = [lead] * 300 + tok.encode("日本 ok")
    det = IncrementalDetokenizer(tok, None, [])
    pieces = []
    for t in ids:
        pieces.append(det.feed([t]).text)
        assert len(det._window) <= 2 * 32 + 4
    pieces.append(det.flush())
    assert "".join(pieces) == tok.decode(ids)


def test_real_text_corpus_chunked(tok):
    text = "\n".join(corpus()[:40])
    ids = tok.encode(text)
    rng = random.Random(0)
    for _ in range(5):
        chunks = [rng.randint(1, 7) for _ in ids]
        pieces, _, _ = _stream(tok, ids, chunks)
        assert "".join(pieces) == text


# ---------------------------------------------------------------- stop strings


def _stop_run(tok, text, stop, chunk=1):
    ids = tok.encode(text)
    chunks = [chunk] * (len(ids) // chunk + 1)
    return _stream(tok, ids, chunks, stop=stop)


def test_stop_string_spanning_tokens(tok):
    text = "The quick brown fox jumps over the lazy dog."
    for chunk in (1, 2, 5, 100):
        pieces, stopped, det = _stop_run(tok, text, ["fox jumps"], chunk)
        assert stopped and det.stop_str == "fox jumps"
        assert "".join(pieces) == "The quick brown "
        assert det.feed(tok.encode(" more")).text == "" and det.feed([]).stopped
        assert det.flush() == ""


def test_stop_at_very_start(tok):
    pieces, stopped, _ = _stop_run(tok, "Hello world", ["Hel"])
    assert stopped and "".join(pieces) == ""
    pieces, stopped, _ = _stop_run(tok, "Hello world", ["Hello world"], chunk=100)
    assert stopped and "".join(pieces) == ""


def test_partial_stop_never_streamed_then_released(tok):
    det = IncrementalDetokenizer(tok, None, ["abc"])
    assert det.feed(tok.encode("xx a")).text == "xx "
    assert det.feed(tok.encode("b")).text == ""  # "ab" could still become "abc"
    step = det.feed(tok.encode("d"))
    assert step.text == "abd" and not step.stopped
    assert det.feed(tok.encode(" ab")).text == " "
    assert det.flush() == "ab"  # flush releases what was held


def test_overlapping_candidates(tok):
    # "ab" and "abc": the earliest occurrence wins as soon as it is complete
    pieces, stopped, det = _stop_run(tok, "xxabc", ["abc", "ab"])
    assert stopped and "".join(pieces) == "xx"
    # the first stop string to COMPLETE wins, however the text is chunked
    for chunk in (1, 100):
        pieces, stopped, det = _stop_run(tok, "1abcd2", ["bc", "abcd"], chunk)
        assert stopped and "".join(pieces) == "1a" and det.stop_str == "bc"
        # same end: the longer one
        pieces, stopped, det = _stop_run(tok, "1xab2", ["ab", "xab"], chunk)
        assert stopped and "".join(pieces) == "1" and det.stop_str == "xab"
    # a held candidate that fails while a later one starts inside it
    pieces, stopped, det = _stop_run(tok, "aab!", ["ab!", "zzz"])
    assert stopped and "".join(pieces) == "a"


def test_stop_with_multibyte_and_no_leak(tok):
    text = "Hello 日本語 world"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, None, ["本語 w"])
    emitted = ""
    for t in ids:
        step = det.feed([t])
        emitted += step.text
        assert "本" not in emitted
        if step.stopped:
            break
    assert step.stopped and emitted == "Hello 日"


def test_flush_after_partial_stop_and_incomplete_char(tok):
    ids = tok.encode("go 日")
    det = IncrementalDetokenizer(tok, None, ["o 日本"])
    text = "".join(det.feed([t]).text for t in ids[:-1])
    assert text == "g"
    assert det.flush() == tok.decode(ids[:-1])[1:]  # held "o " + incomplete char, released


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hs.text(alphabet="abc xé日", max_size=30), stop=hs.lists(hs.text(alphabet="abc xé日", min_size=1, max_size=4), max_size=3),
       seed=hs.integers(0, 1000))
def test_stop_strings_property(tok, text, stop, seed):
    ids = tok.encode(text)
    rng = random.Random(seed)
    pieces, stopped, det = _stream(tok, ids, [rng.randint(1, 3) for _ in ids], stop=stop)
    out = "".join(pieces)
    full = tok.decode(ids)
    hits = [(full.find(s) + len(s), -len(s), s) for s in stop if s in full]
    if hits:
        end, neg_len, s = min(hits)
        assert stopped and out == full[: end + neg_len] and det.stop_str == s
    else:
        assert not stopped and out == full


def test_stop_matcher_unit():
    m = StopStringMatcher(["</s>", "STOP"])
    assert m.push("hello <") == "hello "
    assert m.push("/") == ""
    assert m.push("x") == "</x"
    assert m.push("ST") == ""
    assert m.push("OP now") == "" and m.stopped and m.matched == "STOP"
    assert m.push("more") == "" and m.flush() == ""
    m = StopStringMatcher([])
    assert m.push("abc") == "abc" and m.flush() == ""
