"""The engine's logic, free of devices: requests, scheduler, sampler, detokenizer and the step loop (`LLMEngine`)."""
