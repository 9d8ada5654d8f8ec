from infinite.kv.block_pool import BlockPool
from infinite.kv.cache import KVCache, auto_num_blocks, bytes_per_block
from infinite.kv.rmanager import RBlock, RManager, blocks_for

__all__ = ["BlockPool", "KVCache", "RBlock", "RManager", "auto_num_blocks", "blocks_for", "bytes_per_block"]
