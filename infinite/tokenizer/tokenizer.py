"""Tokenizer of a checkpoint folder: ``tokenizer.json`` plus ``tokenizer_config.json``.

A thin wrapper over ``tokenizers.Tokenizer`` that adds what the serving path
needs from the Hugging Face side files: bos/eos ids, the ``add_bos_token``
switch, and chat-template rendering with the same sandboxed jinja2 setup as
transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

FALLBACK_TEMPLATE_DOC = (
    "Without a chat_template, messages render as '<role>: <content>\\n' lines, "
    "followed by 'assistant: ' when add_generation_prompt is true."
)


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    raise ValueError(f"cannot read special token {tok!r}")


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        config = dict(config or {})
        self.config = config
        self._tk = tokenizer
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        add_bos = config.get("add_bos_token")
        self.add_bos_token: bool | None = None if add_bos is None else bool(add_bos)
        self.special_tokens = {k: _token_content(config.get(k)) for k in
                               ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k) is not None}
        if chat_template is None:
            chat_template = _select_template(config.get("chat_template"))
        self.chat_template = chat_template

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self._tk.token_to_id(token)
        if tid is None:
            raise ValueError(f"special token {token!r} from tokenizer_config.json is not in the vocabulary")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tk

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, honours tokenizer_config's add_bos_token."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.bos_token_id is not None and self.add_bos_token is not None:
            bos = self.bos_token_id
            if self.add_bos_token and (not ids or ids[0] != bos):
                ids = [bos] + ids
            elif not self.add_bos_token and ids and ids[0] == bos:
                plain = self._tk.encode(text, add_special_tokens=False).ids
                if ids[1:] == plain:  # the leading bos came from the post-processor
                    ids = plain
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def info(self) -> dict[str, Any]:
        """What vLLM's ``/tokenizer_info`` returns: tokenizer_config.json's settings (JSON-plain
        ones) with the special tokens as strings and the chat template, so that a client (lm-eval's
        remote tokenizer) needs no local copy of the tokenizer."""
        out: dict[str, Any] = {"tokenizer_class": self.config.get("tokenizer_class") or "PreTrainedTokenizerFast"}
        for k, v in self.config.items():
            if k != "added_tokens_decoder" and isinstance(v, (str, int, float, bool, type(None))):
                out[k] = v
        out.update(self.special_tokens)
        out["chat_template"] = self.chat_template
        out["vocab_size"] = self.vocab_size
        return out

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **extra: Any) -> str:
        """Render a conversation as prompt text.

        Uses ``chat_template`` (a request's own, as vLLM allows) or the checkpoint's,
        in jinja2 like transformers does; otherwise the plain fallback described by
        FALLBACK_TEMPLATE_DOC. ``extra`` (``tools``, template kwargs) are template variables.
        """
        _check_messages(messages)
        source = chat_template or self.chat_template
        if source is None:
            return render_fallback(messages, add_generation_prompt)
        template = _compile(source)
        ctx = {**self.special_tokens, **extra}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **ctx)


def _select_template(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError("chat_template list has no 'default' entry")
    raise ValueError(f"chat_template must be a string or a list of named templates, got {type(value).__name__}")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role'")
        if "content" not in m:
            raise ValueError(f"messages[{i}] needs a 'content'")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ValueError(f"only text content parts are supported, got {p!r}")
            parts.append(p["text"])
        return "".join(parts)
    raise TypeError(f"message content must be a str or a list of text parts, got {type(content).__name__}")


def render_fallback(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The documented template-less rendering (see FALLBACK_TEMPLATE_DOC)."""
    _check_messages(messages)
    text = "".join(f"{m['role']}: {_content_text(m['content'])}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


@lru_cache(maxsize=16)
def _compile(source: str):
    """Compile a chat template in the sandbox transformers uses (same options and helpers)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """Tokenizer of a checkpoint folder, or None when it has no tokenizer.json (token-id prompts only)."""
    path = Path(path)
    tk_file = path / "tokenizer.json"
    if not tk_file.is_file():
        return None
    tk = HFTokenizer.from_file(str(tk_file))
    config: dict[str, Any] = {}
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        with open(cfg_file, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_file} must hold a JSON object")
    template = None
    jinja_file = path / "chat_template.jinja"  # newer transformers save the template on its own
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        with open(path / "chat_template.json", encoding="utf-8") as f:
            template = _select_template(json.load(f).get("chat_template"))
    return Tokenizer(tk, config, template)
