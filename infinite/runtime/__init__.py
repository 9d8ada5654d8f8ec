"""One instance's engine: scheduler, block allocator, model runner, LLMEngine, AsyncLLMEngine."""
