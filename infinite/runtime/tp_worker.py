"""A rank of a tensor-parallel group other than its first: its shard of the model, its heads' KV
pool, the first rank's block tables mirrored; it runs every step the first rank broadcasts
(runtime/tp.py) and nothing else. No scheduler, sampler or tokenizer: those run once per
instance, on the first rank.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from infinite.kv.cache import KVCache
from infinite.model.config import ModelConfig
from infinite.model.loader import load_model
from infinite.model.parallel import TPGroup
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import resolve_model_dir
from infinite.runtime.memory import size_pool
from infinite.runtime.model_runner import LocalAttention, forward
from infinite.runtime.tp import (NOOP, SETUP, STEP, STEP_COMMANDS, STOP, Channel, MirrorBatch, PayloadReader, get_step,
                                 serve_blocks)

log = logging.getLogger(__name__)

Handler = Callable[[PayloadReader | None], None]


class TPWorker:
    """``rank`` is the instance's (cluster) rank; ``group.rank`` this process's place in its group.
    The constructor makes the same collectives, in the same order, as the first rank's LLMEngine."""

    def __init__(self, config: EngineConfig, group: TPGroup, blocks: TPGroup, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.group = group
        self.device = config.torch_device()
        model_dir = resolve_model_dir(config.model)
        ckpt = ModelConfig.from_pretrained(model_dir)
        self.dtype = config.torch_dtype(ckpt.torch_dtype, self.device)
        self.model = load_model(model_dir, dtype=self.dtype, device=self.device, tp=group)
        self.model_config = c = self.model.config
        self.block_size = config.block_size
        num_blocks, _ = size_pool(self.model, config, self.dtype, self.device)
        num_blocks = group.all_min(num_blocks)
        self.kv = KVCache(c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype,
                          self.device)
        self.scale = c.head_dim ** -0.5
        self.channel = Channel(group)
        self.block_channel = Channel(blocks)
        cmd, setup, _, _ = self.channel.recv()
        if cmd != SETUP:
            raise RuntimeError(f"the group's first rank sent command {cmd} before its setup")
        max_rows, max_blocks, max_model_len = (int(x) for x in setup.ints(3))
        self.model.rope.reserve(max_model_len)
        self.input_batch = MirrorBatch(rank, max_rows, max_blocks, self.block_size, self.device)
        self.handlers: dict[int, Handler] = {NOOP: lambda _: None, STEP: self._step}
        self.steps = 0

    def _step(self, r: PayloadReader) -> None:
        inputs = get_step(r, self.input_batch)
        forward(self.model, inputs, LocalAttention(self.kv, inputs, self.scale))

    def serve(self) -> None:
        """Run the first rank's commands until STOP. The block channel is served on a thread of its own
        (a migration's reads and writes come while steps run). A GroupError means the group failed."""
        blocks = threading.Thread(target=self._serve_blocks, name="tp-blocks", daemon=True)
        blocks.start()
        with torch.inference_mode():
            while True:
                cmd, payload, _, _ = self.channel.recv()
                if cmd == STOP:
                    break
                handler = self.handlers.get(cmd)
                if handler is None:
                    raise RuntimeError(f"unknown command {cmd} from the group's first rank")
                if cmd in STEP_COMMANDS:
                    self.input_batch.apply(payload)
                handler(payload)
                self.steps += 1
        blocks.join(5.0)

    def _serve_blocks(self) -> None:
        try:
            with torch.inference_mode():
                serve_blocks(self.block_channel, self.kv)
        except Exception:  # noqa: BLE001 - the group failed; the step loop sees it too
            log.warning("tensor-parallel rank %d.%d: the block channel ended", self.rank, self.group.rank,
                        exc_info=True)
