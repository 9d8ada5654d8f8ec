"""Requests larger than one pool, waiting on several instances at once, all get served.

Each instance keeps free blocks for its own demand so that lending does not starve it. A
waiting request bigger than its home's whole pool can only run with blocks lent by others;
if each instance kept its pool for such a request, none would lend and none would run. So
such a request does not count in its home's reserve: one home lends, another's request
runs, and the lender's own request runs after it.
"""

import asyncio
import random

from helpers_hf import make_hf_checkpoint
from infinite.cluster.inproc import InProcessCluster
from infinite.runtime.config import EngineConfig
from infinite.sampling.params import SamplingParams


async def test_big_requests_waiting_on_every_instance_do_not_deadlock(tmp_path):
    ckpt = str(make_hf_checkpoint(tmp_path, "llama_gqa", max_position_embeddings=1024))
    cfg = EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=12, threads_per_rank=1, placement_interval_s=60.0)
    rng = random.Random(7)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[rng.randrange(3, 300) for _ in range(220)] for _ in range(4)]  # 15 blocks each, pools of 12
    async with InProcessCluster(cfg, 2, timeout_s=10.0) as cl:
        async def run(p):
            last = None
            async for out in cl.front.generate(cl.front.make_request(p, params)):
                last = out
            return last

        outs = await asyncio.wait_for(asyncio.gather(*(run(p) for p in prompts)), 60)
        assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
        homes = {o.extra["rank"] for o in outs}
        assert homes == {0, 1}  # both instances were home to one, and both got served
