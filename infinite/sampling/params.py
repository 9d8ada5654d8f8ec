"""Per-request sampling parameters, with vLLM's names, defaults and ranges.

Validation happens once, at construction, so the sampler (which runs every
decode step) can trust every field without re-checking it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is decoded greedily (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
# Largest number of top logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# What each output of a request holds (vLLM's RequestOutputKind): everything so far, what is new since
# the previous output, or nothing until the finished output (which is always cumulative).
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# torch.Generator.manual_seed accepts this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _check_float(name: str, value: object) -> float:
    """Ints are fine for float fields (JSON gives `1`), bools and nan/inf are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


# OpenAI's range for logit_bias values.
LOGIT_BIAS_MAX = 100.0


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, a regex, one of several strings, or a Lark grammar
    (vLLM's names). Exactly one kind is set. Plain data only: the engine compiles it (and caches
    the compiled grammar by ``key()``), so the params can cross processes as they are.

    ``json`` is kept as a JSON string (a dict given here is serialised), so that the key of two
    equal schemas is the same and the field stays plain data.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            kinds.append("json_object")
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar or json_object; "
                f"got {kinds or 'none'}"
            )
        if isinstance(self.json, (dict, bool)):
            self.json = json.dumps(self.json, sort_keys=True)
        elif self.json is not None and not isinstance(self.json, str):
            raise TypeError(f"structured json must be a JSON schema (dict or str), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured {name} must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError("structured choice must be a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured choice entries must be non-empty strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> str:
        """What the compiled grammar is cached by (same spec, same grammar)."""
        value = getattr(self, self.kind) if self.kind != "json_object" else True
        return json.dumps([self.kind, value])


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop, for one request.

    `stop` and `stop_token_ids` are normalised to lists; `top_k=0` becomes -1
    (both mean "off").
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: until the model's max length
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top logprobs besides the chosen token; 0 = chosen only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # per prompt token: its logprob + the top k; 0 = its own only
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: str = "cumulative"  # one of OUTPUT_KINDS
    # Tenant separation for the prefix cache: requests share cached KV only when their salts are equal
    # (vLLM puts it on the prompt; here it rides with the request's options so it crosses processes).
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.include_stop_str_in_output = _check_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)

        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

        if self.logprobs is not None:
            self.logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}")

        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _check_int("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"prompt_logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.prompt_logprobs}"
                )

        self.logit_bias = self._normalise_logit_bias(self.logit_bias)

        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(
                "structured_outputs must be a StructuredOutputsParams (or a dict of its fields), "
                f"got {type(self.structured_outputs).__name__}"
            )

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)

        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self.n = _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got {self.cache_salt!r}")

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a str, a list of str or None, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop must contain only strings, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop strings must be non-empty, got ''")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of int or None, got {type(ids).__name__}")
        for t in ids:
            _check_int("stop_token_ids entry", t)
            if t < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t}")
        return list(ids)

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        """Keys may come as decimal strings (JSON objects have string keys), as OpenAI sends them."""
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        out: dict[int, float] = {}
        for k, v in bias.items():
            if isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)
            tid = _check_int("logit_bias key", k)
            if tid < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tid}")
            val = _check_float(f"logit_bias[{tid}]", v)
            if not -LOGIT_BIAS_MAX <= val <= LOGIT_BIAS_MAX:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {val} for token {tid}")
            out[tid] = val
        return out or None

    @property
    def greedy(self) -> bool:
        """Greedy rows take the argmax; top-k/top-p/min-p and the seed are then moot."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self, **changes: object) -> SamplingParams:
        """A deep copy (lists are not shared), optionally with some fields changed and re-validated."""
        new = copy.deepcopy(self)
        for name, value in changes.items():
            if name not in self.__dataclass_fields__:
                raise TypeError(f"SamplingParams has no field {name!r}")
            setattr(new, name, value)
        if changes:
            new.__post_init__()
        return new
