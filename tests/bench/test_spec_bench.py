"""bench/spec_bench.py end to end on the CPU: every phase (batch-1 workloads, parity pass, batch sweep, W1-like run,
the constant rule) for n-gram and a draft model, on a model trained a little on Python's text (the benchmark's
figures mean nothing here; that it runs and reports them consistently does: a GPU call that fails at once costs
the session's device time)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import bench_script


@pytest.fixture(scope="module")
def spec_bench():
    yield from bench_script("spec_bench")


def test_every_phase_runs_and_reports(spec_bench, tiny_text_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "spec.json"
    spec_bench.main(["--model", str(tiny_text_model_dir), "--k", "2", "--draft-model", str(tiny_text_model_dir),
                     "--draft-k", "2", "--batch-sizes", "1,2", "--w1-requests", "4", "--w1-prompt-tokens", "16,32",
                     "--w1-max-tokens", "8", "--num-prompts", "1", "--max-tokens", "12", "--dtype", "float32",
                     "--passage-tokens", "60", "--restart-tokens", "8", "--free-prompt-tokens", "16",
                     "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {(row["workload"], row["batch"], row["method"]): row for row in report["rows"]}
    methods = ("plain", "ngram k=2", "ngram k=2 const", "draft k=2")
    for method in methods:
        for workload in ("edit", "free"):
            row = rows[workload, 1, method]
            assert row["output_tokens_per_s"] > 0 and row["steps"] > 0
            if method != "plain":  # a draft model that is the model itself accepts everything greedy
                assert row["proposed"] > 0 and row["verify_steps"] > 0
    for method in methods[:3]:  # the sweep and the W1-like run: plain, the rule and the constant rule
        assert {(w, b) for w, b, m in rows if m == method} >= {("edit sweep", 1), ("edit sweep", 2), ("W1-like", 64)}
    assert rows["edit", 1, "draft k=2"]["acceptance_rate"] == 1.0
    # The same n-gram engine without pipelined verifications, at batch 1: it pipelines none, and the other does.
    assert rows["edit", 1, "ngram k=2 serial"]["num_pipelined_steps"] == 0
    assert rows["edit", 1, "ngram k=2 const"]["num_pipelined_steps"] > 0
    # The W1-like run with the product's default batch bound (issue 27's bar), against plain's.
    defaults = rows["W1-like", 64, "ngram k=2 bound 8"]
    assert defaults["speedup"] > 0 and defaults["outputs_equal"] == "4/4"
    # float32: speculation gives plain decoding's tokens (the parity pass finds no difference).
    assert all(not entry["divergences"] for entry in report["parity"]), report["parity"]
    assert set(report["step_cost_models"]) == {*methods, "ngram k=2 serial"}
    table = capsys.readouterr().out
    assert "crossover (ngram k=2)" in table and "parity (draft k=2, edit, batch 1, top-2 logprobs): 1/1 equal" in table
