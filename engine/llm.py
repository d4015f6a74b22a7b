"""The offline API: `LLM(model, **config).generate(prompts, SamplingParams)`, as vLLM users know it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedserve.config.engine import EngineConfig

from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.runner.loader import wrap_model
from pagedserve.engine.core.request import RequestOutput, SamplingParams, merge_delta


class LLM:
    """Generate for many prompts at once with continuous batching over a paged KV cache."""

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig.create(model=model, **config)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, served_name: str = "in-memory-model", **config: Any) -> "LLM":
        """Serve a transformers model object already in memory (it keeps its device and dtype)."""
        llm = cls.__new__(cls)
        llm.config = EngineConfig.create(**config)
        llm.engine = LLMEngine(llm.config, loaded=wrap_model(model, tokenizer, served_name))
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. Prompts may be strings or lists of token ids. `priority`: one
        int per prompt, lower served earlier (vLLM's), with `scheduling_policy="priority"`. `lora`: the name of
        a loaded LoRA adapter for every prompt, or one name (None: the base model) per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (
            [sampling_params or SamplingParams()] * len(prompts)
            if not isinstance(sampling_params, Sequence)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priorities)} priorities")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(loras)} LoRA names")
        request_ids = []
        for prompt, params, request_priority, request_lora in zip(prompts, params_list, priorities, loras):
            request_id = f"llm-{next(self._ids)}"
            prompt_input = prompt if isinstance(prompt, str) else list(prompt)
            self.engine.add_request(request_id, prompt_input, params, priority=request_priority, lora=request_lora)
            request_ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm, unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                    if delta.finished:
                        progress.update(1)
                refused = self.engine.take_refused()
                if refused:  # a constraint that did not compile: the call fails as a bad one does at once
                    raise refused[0][1]
        except BaseException:
            for request_id in request_ids:  # the others end too, and leave nothing behind in the engine
                self.engine.abort(request_id)
            while self.engine.has_unfinished_requests():
                self.engine.step()
                self.engine.take_refused()
            raise
        finally:
            progress.close()
        return [results[request_id] for request_id in request_ids]
