"""The embedded default model: a small random Llama checkpoint built offline.

No weights can be downloaded, so the project writes its own default model: a
byte-level BPE tokenizer trained on the prose below and a Llama-architecture
checkpoint with fixed-seed random weights, in exactly the files a Hugging
Face checkpoint has (config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). It goes through the same loader as
any real checkpoint, and transformers can load it too. Output is
byte-for-byte deterministic.

    python -m infinite.tiny DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

NAME = "tiny-llama-v2"
SEED = 1234
BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]
TARGET_VOCAB = 2000
ARCH = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=32768, rope_theta=10000.0)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral stairs,
counted the steps out of habit, and checked the great lamp. The sea below was calm and grey, and a thin line of
light was growing in the east. Gulls circled the rocks, calling to one another, and the smell of salt and seaweed
drifted up through the open window.

In the village, the baker had already lit her ovens. Bread, she liked to say, does not wait for anyone. She shaped
the loaves by hand, dusted them with flour, and slid them into the heat. By six o'clock the first customers were
standing at the door: fishermen on their way to the harbour, children sent by their parents, and the old teacher
who always asked for the smallest loaf and paid with exact change.

A computer is a machine that follows instructions. A program is a list of those instructions, written in a language
that people can read and machines can execute. When we write a program, we describe what should happen step by
step: read the input, compute a result, and write the output. Good programs are simple, clear, and tested. When
something goes wrong, we read the error message carefully, form a hypothesis, and try a small experiment.

Large language models predict the next token of a text. They read a prompt, split it into tokens, and compute a
probability for every token in the vocabulary. Sampling picks one token, appends it to the text, and the process
repeats. Serving many users at once means batching their requests together, keeping the memory of each request in
a cache of keys and values, and scheduling the work so that no request waits too long.

The river ran through the middle of the town, under seven stone bridges. In spring it was high and fast, brown with
melted snow from the mountains. In summer it slowed and cleared, and you could see the fish holding still against
the current. People walked along its banks in the evening, talking about the weather, the harvest, the price of
bread, and the news from the city.

Questions and answers. What is the capital of France? The capital of France is Paris. How many days are in a week?
There are seven days in a week. What colour is the sky on a clear day? It is blue. Why do leaves fall in autumn?
Trees drop their leaves to save water and energy during the cold months. Can you help me? Of course, I am happy to
help. Please tell me what you need, and I will do my best.

Numbers and time: one, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June, July,
August, September, October, November, December. It is 10:30 in the morning; the meeting starts at 14:00.

The garden behind the house was small but full of life. There were tomatoes and beans, a row of lettuce, and a
tangle of roses along the fence. Bees moved from flower to flower. In the corner stood an apple tree that her
grandfather had planted, and every autumn the family gathered its fruit and made pies, jam, and cider.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

She opened the letter slowly. The handwriting was familiar, although she had not seen it in many years. "Dear
friend," it began, "I hope this finds you well. I have thought of you often, and of the summer we spent by the
lake." She read it twice, then folded it carefully and placed it in the drawer with the others.

Every good system starts small. First make it work, then make it right, then make it fast. Measure before you
optimise, and keep the tests green. Write down what you learn, so that the next person does not have to learn it
again. Simple, honest tools last longer than clever ones.
"""


def build_tokenizer():
    """Train the byte-level BPE on CORPUS (deterministic: the trainer breaks ties by pair)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tk.train_from_iterator([CORPUS], trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tk


def model_config(vocab_size: int, bos_id: int, eos_id: int, arch: dict[str, Any] = ARCH) -> dict[str, Any]:
    """config.json as transformers' LlamaConfig writes it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "dtype": "float32",
        "eos_token_id": eos_id,
        "head_dim": arch["head_dim"],
        "hidden_act": "silu",
        "hidden_size": arch["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": arch["intermediate_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": arch["num_attention_heads"],
        "num_hidden_layers": arch["num_hidden_layers"],
        "num_key_value_heads": arch["num_key_value_heads"],
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": arch["rope_theta"], "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def random_weights(vocab_size: int, arch: dict[str, Any] = ARCH) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors: normal(0, 0.02) from one seeded generator, norms at 1."""
    H, I = arch["hidden_size"], arch["intermediate_size"]
    d, nh, nkv = arch["head_dim"], arch["num_attention_heads"], arch["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, H))]
    for i in range(arch["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (nh * d, H)),
            (p + "self_attn.k_proj.weight", (nkv * d, H)),
            (p + "self_attn.v_proj.weight", (nkv * d, H)),
            (p + "self_attn.o_proj.weight", (H, nh * d)),
            (p + "mlp.gate_proj.weight", (I, H)),
            (p + "mlp.up_proj.weight", (I, H)),
            (p + "mlp.down_proj.weight", (H, I)),
        ]
    shapes.append(("lm_head.weight", (vocab_size, H)))
    gen = torch.Generator().manual_seed(SEED)
    out = {name: torch.empty(shape).normal_(0.0, 0.02, generator=gen) for name, shape in shapes}
    for i in range(arch["num_hidden_layers"]):
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(H)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(H)
    out["model.norm.weight"] = torch.ones(H)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out: str | Path) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``out``; returns the vocab size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer()
    tk.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": ARCH["max_position_embeddings"],
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    return tk.get_vocab_size(with_added_tokens=True)


def write_tiny_checkpoint(out: str | Path, max_position_embeddings: int | None = None, **shape: int) -> Path:
    """Write the whole default checkpoint into ``out`` (created if needed). ``max_position_embeddings``:
    the same model with a longer (or shorter) context limit, for long-context tests and benches;
    ``shape``: other ``ARCH`` values (wider layers: a model whose prefill is compute-bound)."""
    unknown = set(shape) - set(ARCH)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}; known: {sorted(ARCH)}")
    arch = {**ARCH, **shape}
    from safetensors.torch import save_file

    out = Path(out)
    vocab = write_tokenizer_files(out)
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos_id, eos_id = tk.token_to_id(BOS), tk.token_to_id(EOS)
    config = model_config(vocab, bos_id, eos_id, arch)
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    save_file(random_weights(vocab, arch), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def cache_root() -> Path:
    env = os.environ.get("INFINITE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "infinite"


def default_model_dir() -> Path:
    """The default checkpoint folder, generated on first use.

    Built in a temporary sibling folder and renamed into place, so readers
    never see a half-written checkpoint and concurrent first uses are safe
    (the loser of the rename discards its copy).
    """
    root = cache_root()
    final = root / NAME
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        write_tiny_checkpoint(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infinite.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output folder (created; existing files are overwritten)")
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(args.dir)
    print(out)


if __name__ == "__main__":
    main()
