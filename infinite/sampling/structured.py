"""Structured output: grammars compiled with llguidance, token masks for the batched sampler.

Why llguidance (and not xgrammar): it is a single wheel with no dependencies
(xgrammar pulls apache-tvm-ffi and builds on torch's extension machinery), it
needs no per-vocabulary precompilation (building the token trie of a 128K
vocabulary takes milliseconds), its masks are computed lazily per step in
about 50 µs, and it covers all four of vLLM's kinds natively: JSON schema,
regex, choice (as a Lark alternation) and Lark grammars (GBNF is converted).
vLLM ships it as its ``guidance`` backend.

The params carry only the spec (plain data); the engine compiles it here, once
per distinct spec (``GrammarCompiler`` caches by ``StructuredOutputsParams.key``),
and gives each request its own ``LLMatcher`` state, which lives on the engine's
``Request`` and never travels.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from infinite.sampling.params import StructuredOutputsParams

# JSON is generated compactly (one space after ',' and ':', no free whitespace): with
# flexible whitespace a weak model can emit spaces and newlines forever inside a valid prefix.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """The spec cannot be compiled; the message is llguidance's reason."""


def grammar_source(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a spec; no validation yet."""
    import llguidance as llg

    kind = spec.kind
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json":
        try:
            schema = json.loads(spec.json)  # type: ignore[arg-type]
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex)  # type: ignore[arg-type]
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark(choice_as_lark(spec.choice))  # type: ignore[arg-type]
    grammar = spec.grammar or ""
    if "::=" in grammar:  # GBNF (llama.cpp's notation), as vLLM accepts too
        from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

        try:
            grammar = gbnf_to_lark(grammar)
        except (GbnfToLarkError, ValueError) as e:
            raise GrammarError(f"cannot read the GBNF grammar: {e}") from None
    return llg.LLMatcher.grammar_from_lark(grammar)


def choice_as_lark(choices: list[str]) -> str:
    """``start: "a" | "b"``; a JSON string literal is also a valid Lark string literal."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """One per engine: the llguidance view of the model's vocabulary and the compiled grammars.

    Thread-safe: the server validates on the event loop while the step thread builds
    matchers for new requests.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._lltok: Any = None
        self._executor: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        import llguidance as llg

        if self._lltok is None:
            if self._tokenizer is None:
                raise GrammarError("this model has no tokenizer, so it cannot constrain its output to a grammar")
            self._lltok = llg.LLTokenizer(
                self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._lltok

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The validated grammar of ``spec``; raises GrammarError with llguidance's reason."""
        import llguidance as llg

        key = spec.key()
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
            lltok = self._ll_tokenizer()
        try:
            source = grammar_source(spec)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(source, lltok)
        if is_error:
            raise GrammarError(f"invalid {spec.kind} for structured output: {messages[0]}")
        with self._lock:
            self._grammars[key] = source
            while len(self._grammars) > _CACHE_SIZE:
                self._grammars.popitem(last=False)
        return source

    def matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh per-request matcher at the start of the output."""
        import llguidance as llg

        m = llg.LLMatcher(self._ll_tokenizer(), self.compile(spec))
        if m.is_error():
            raise GrammarError(f"invalid {spec.kind} for structured output: {m.get_error()}")
        return m

    def executor(self) -> Any:
        import llguidance as llg

        if self._executor is None:
            self._executor = llg.LLExecutor()
        return self._executor


def allowed_tokens(matchers: list[Any], vocab_size: int, executor: Any) -> Tensor:
    """[M, V] bool: the tokens each matcher allows next (masks computed in parallel by llguidance)."""
    from llguidance.torch import fill_next_token_bitmask_par

    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
    return unpack_bitmask(bitmask, vocab_size)


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """int32 [M, W] (bit j of word w = token 32w + j) -> bool [M, V]."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # [M, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def advance(matcher: Any, token_id: int) -> bool:
    """Feed the sampled token; True when the grammar is complete and admits nothing more."""
    matcher.consume_token(token_id)
    return matcher.is_stopped()
