"""Sibling projections fused into one GEMM: found by watching a forward, same outputs, no extra memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.engine.kernels.fused_projections import FusedFollower, FusedLead, ProjectionFusion
from pagedserve.engine.llm import LLM
from pagedserve.engine.runner.loader import weights_footprint_bytes
from pagedserve.engine.core.request import SamplingParams
from tiny_models import ARCHS

PROMPTS = [[5, 17, 42, 99, 7, 130, 64, 201, 12], [33, 8, 250, 71, 4], list(range(3, 60))]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8)


class Block(nn.Module):
    """a and b read x; c reads another tensor; d is called twice; e has a hook (as TP's row-parallel
    layers do); f and g read one tensor, changed in place between them. Only a and b may be fused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 3)
        self.c = nn.Linear(8, 4)
        self.d = nn.Linear(8, 8, bias=False)
        self.e = nn.Linear(8, 5)
        self.e.register_forward_hook(lambda _m, _i, output: output * 1)
        self.f = nn.Linear(8, 2)
        self.g = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.d(self.d(x))
        z = x.clone()
        f = self.f(z)
        z.mul_(2)
        return torch.cat([self.a(x), self.b(x), self.c(y), self.e(x), f, self.g(z)], dim=-1)


def test_only_siblings_of_one_input_are_fused_and_outputs_stay():
    block = Block()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = block(x)
        fusion = ProjectionFusion.watch(block)
        block(x)
        groups = fusion.apply()
        assert [group.names for group in groups] == [["a", "b"]]
        assert isinstance(block.a, FusedLead) and isinstance(block.b, FusedFollower)
        assert all(type(getattr(block, name)) is nn.Linear for name in "cdefg")
        torch.testing.assert_close(block(x), expected)
        assert block.a.pending is None  # the last follower took its part: nothing outlives the forward
        # Each member's weight reads as the one it replaced (tools that inspect `q_proj.weight`).
        for member, original in zip((block.a, block.b), fusion.groups[0].originals):
            assert torch.equal(member.weight, original.weight) and torch.equal(member.bias, original.bias)
        # A follower called without its lead computes its own slice.
        torch.testing.assert_close(block.b(x), fusion.groups[0].originals[1](x))
        fusion.undo()
        assert type(block.a) is nn.Linear and type(block.b) is nn.Linear
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_engine_gives_unfused_tokens_in_the_same_memory(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    plain = LLM(str(model_dir), dtype="float32", block_size=8, fuse_projections=False)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, PARAMS, use_tqdm=False)]
    fused = LLM(str(model_dir), dtype="float32", block_size=8)
    runner = fused.engine.runner
    names = sorted({"/".join(group.names) for group in runner._fusion.groups})
    assert names == ["gate_proj/up_proj", "q_proj/k_proj/v_proj"]
    assert len(runner._fusion.groups) == 2 * runner.shape.num_layers
    assert runner.weights_bytes() == plain.engine.runner.weights_bytes()
    assert [o.outputs[0].token_ids for o in fused.generate(PROMPTS, PARAMS, use_tqdm=False)] == expected


def test_shutdown_gives_the_callers_model_back_unfused(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("qwen2")  # biases on q/k/v
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    footprint = weights_footprint_bytes(model)
    llm = LLM.from_model(model, AutoTokenizer.from_pretrained(model_dir), block_size=8)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedLead)
    assert weights_footprint_bytes(model) == footprint
    llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    llm.engine.runner.shutdown()
    assert type(attention.q_proj) is nn.Linear and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
