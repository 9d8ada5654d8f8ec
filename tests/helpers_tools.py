"""A tool-aware copy of the embedded default model: same weights and tokenizer, with a
Hermes-style chat template like Qwen2.5's (tools listed in the system turn, calls as
``<tool_call>{json}</tool_call>``, results as ``<tool_response>`` in a user turn)."""

from __future__ import annotations

import json
from pathlib import Path

from infinite.tiny import default_model_dir

HERMES_TEMPLATE = (
    "{%- if tools %}<|system|>\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\nFunction signatures within <tools></tools>:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Return each call as <tool_call>{\"name\": <function-name>, \"arguments\": <args-json-object>}</tool_call>"
    "<|end|>\n"
    "{%- elif messages[0].role == 'system' %}<|system|>\n{{ messages[0].content }}<|end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|{{ message.role }}|>\n{{ message.content }}<|end|>\n"
    "{%- elif message.role == 'assistant' %}<|assistant|>\n{{ message.content }}"
    "{%- for tc in message.tool_calls %}<tool_call>{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}</tool_call>{%- endfor %}<|end|>\n"
    "{%- elif message.role == 'tool' %}<|user|>\n<tool_response>\n{{ message.content }}\n</tool_response><|end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tool_checkpoint(root: Path) -> Path:
    """``root/tiny-tools``: links to the default model's files, its own tokenizer_config.json."""
    src = default_model_dir()
    out = Path(root) / "tiny-tools"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out
