"""Tokenizer wrapper, chat templates and the incremental detokenizer (on the tiny model's tokenizer)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError

from infinite.tiny import BOS, EOS, write_tokenizer_files
from infinite.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer, render_fallback

TEXT = "héllo 世界 🙂 The lighthouse keeper woke before dawn."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    t = load_tokenizer(tok_dir)
    assert t is not None
    return t


def test_encode_decode_roundtrip(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id == tok.backend.token_to_id(BOS)
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == BOS + TEXT
    assert tok.eos_token_id == tok.backend.token_to_id(EOS)
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True) > 1000


def test_matches_transformers(tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo?"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_chat_template_errors_and_fallback(tok, tok_dir, tmp_path):
    with pytest.raises(TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError):
        tok.apply_chat_template({"role": "user"})
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user"}])
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert plain.apply_chat_template(msgs) == "user: hi\nassistant: yo\nassistant: "
    assert plain.apply_chat_template(msgs, add_generation_prompt=False) == render_fallback(msgs, False)
    # add_bos_token=False removes the post-processor's bos, but keeps one the text spells out.
    assert plain.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert plain.encode(BOS + "hi") == tok.encode("hi")


def test_missing_tokenizer_is_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_bad_special_token(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(tmp_path)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = IncrementalDetokenizer(tok)
    deltas = [d.add_token(i) for i in ids]
    deltas.append(d.finish())
    assert "".join(deltas) == d.text
    return deltas


def test_stream_never_splits_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the text does split characters
    deltas = _stream(tok, ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_stream_with_prompt_context(tok):
    prompt = tok.encode("The lighthouse", add_special_tokens=True)
    gen = tok.encode(" keeper 世界", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(d.add_token(i) for i in gen) + d.finish()
    assert text == " keeper 世界"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1228), max_size=40), st.booleans())
def test_stream_equals_decode_random_ids(tok, ids, skip):
    ids = [i % tok.vocab_size for i in ids]
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = "".join(d.add_token(i) for i in ids) + d.finish()
    assert out == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_stream_equals_text(tok, text):
    deltas = _stream(tok, tok.encode(text, add_special_tokens=False))
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)
