"""Structured output: the spec (plain data), grammar compilation, the sampler's mask, and
100% valid outputs from the random-weight default model (the grammar does all the work)."""

from __future__ import annotations

import json
import re

import jsonschema
import msgspec
import pytest
import torch

from infinite import LLM, SamplingParams
from infinite.sampling.params import StructuredOutputsParams as SO
from infinite.sampling.sampler import Sampler, SampleRow
from infinite.sampling.structured import GrammarCompiler, GrammarError, choice_as_lark, unpack_bitmask
from infinite.tiny import default_model_dir
from infinite.tokenizer import load_tokenizer

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "point": {"type": "object", "properties": {
                                          "x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                                          "required": ["x", "y"], "additionalProperties": False}},
     "required": ["ok", "point"], "additionalProperties": False},
    {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
]
REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"#[0-9a-f]{6}"]
CHOICES = ["positive", "negative", 'a "quoted"\nline']
LARK = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/'
GBNF = 'root ::= "yes" | "no"'


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=256, max_num_seqs=64)


@pytest.fixture(scope="module")
def compiler():
    tok = load_tokenizer(default_model_dir())
    return GrammarCompiler(tok, tok.vocab_size, (tok.eos_token_id,))


def test_spec_is_plain_data_with_one_kind():
    spec = SO(json={"type": "object", "b": 1, "a": 2})
    assert spec.json == json.dumps({"type": "object", "b": 1, "a": 2}, sort_keys=True)
    assert spec.key() == SO(json={"a": 2, "b": 1, "type": "object"}).key()
    assert spec.kind == "json" and SO(json_object=True).kind == "json_object"
    params = SamplingParams(structured_outputs={"regex": "a+"}, logit_bias={"7": -100, 3: 2.5}, prompt_logprobs=2)
    assert params.logit_bias == {7: -100.0, 3: 2.5}
    back = msgspec.json.decode(msgspec.json.encode(params), type=SamplingParams)  # crosses processes as is
    assert back == params and isinstance(back.structured_outputs, SO)
    for bad in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"regex": ""}):
        with pytest.raises(ValueError):
            SO(**bad)
    for bad in ({"logit_bias": {1: 101}}, {"logit_bias": {-1: 0}}, {"prompt_logprobs": 21}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("spec, reason", [
    (SO(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    (SO(regex="a(b"), "unclosed group"),
    (SO(grammar="start: undefined_rule"), "undefined_rule"),
    (SO(json='{"type": '), "not valid JSON"),
])
def test_uncompilable_specs_say_why(compiler, spec, reason):
    with pytest.raises(GrammarError, match=reason):
        compiler.compile(spec)


def test_choice_as_lark_escapes():
    assert choice_as_lark(['a "b"', "c\\d"]) == 'start: "a \\"b\\"" | "c\\\\d"'


def test_unpack_bitmask_bit_order():
    words = torch.tensor([[0b101, -(2**31)], [0, 1]], dtype=torch.int32)
    allowed = unpack_bitmask(words, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]  # bit 31 of word 1 is token 63 > 40
    assert allowed[1].nonzero().flatten().tolist() == [32]


def test_sampler_masks_only_grammar_rows_and_applies_logit_bias(compiler):
    v = compiler.vocab_size
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(0))
    m = compiler.matcher(SO(choice=["yes", "no"]))
    rows = [SampleRow(SamplingParams(temperature=0), [1], [], matcher=m),
            SampleRow(SamplingParams(temperature=0, logit_bias={5: 100}), [1], []),
            SampleRow(SamplingParams(temperature=0, logprobs=1), [1], [])]
    res = Sampler(grammar_executor=compiler.executor).sample(logits, rows)
    tok = load_tokenizer(default_model_dir())
    assert any(w.startswith(tok.decode([res.token_ids[0]])) for w in ("yes", "no"))
    assert res.token_ids[1] == 5
    assert res.token_ids[2] == int(logits[2].argmax())


def _valid_json(text: str, schema: dict) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True


def test_every_output_validates_with_a_random_model(llm):
    specs, checks = [], []
    for schema in SCHEMAS:
        specs.append(SO(json=schema))
        checks.append(lambda t, s=schema: _valid_json(t, s))
    for rx in REGEXES:
        specs.append(SO(regex=rx))
        checks.append(lambda t, rx=rx: re.fullmatch(rx, t) is not None)
    specs.append(SO(choice=CHOICES))
    checks.append(lambda t: t in CHOICES)
    specs.append(SO(grammar=LARK))
    checks.append(lambda t: re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,5}", t) is not None)
    specs.append(SO(grammar=GBNF))
    checks.append(lambda t: t in ("yes", "no"))
    seeds = range(3)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=64, structured_outputs=spec)
              for spec in specs for s in seeds]
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    assert len(outs) == len(specs) * len(seeds)
    for k, out in enumerate(outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (specs[k // len(seeds)], c.text)
        assert checks[k // len(seeds)](c.text), (specs[k // len(seeds)], c.text)
    # Without the grammar the same seeds give text that is not even JSON (the model is noise).
    free = llm.generate(["Answer:"] * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=16) for s in seeds],
                        use_tqdm=False)
    assert not any(o.outputs[0].text.startswith("{") and o.outputs[0].text.endswith("}") for o in free)


def test_bad_grammar_is_refused_before_running(llm):
    with pytest.raises(ValueError, match="strin"):
        llm.generate("x", SamplingParams(structured_outputs=SO(json={"type": "strin"})), use_tqdm=False)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate("x", SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
