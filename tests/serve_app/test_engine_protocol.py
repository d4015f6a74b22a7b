"""`ServingEngine` (serve_app/engine_protocol.py) is all a replica asks of its engine: the real engine and the
fake one the HTTP tests use both offer every member, so a member dropped from either fails here, not in a
Ray test minutes later."""

from __future__ import annotations

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.serve_app.engine_protocol import ServingEngine

from fake_engine import FakeAsyncEngine  # beside this file (conftest puts the folder on sys.path)


def protocol_members() -> set[str]:
    declared = {name for name in vars(ServingEngine) if not name.startswith("_")}
    return declared | set(ServingEngine.__annotations__)


def test_the_protocol_names_what_the_replica_calls() -> None:
    assert protocol_members() >= {
        "generate", "abort", "get_stats", "check_health", "add_step_listener", "shutdown", "from_config",
        "is_dead", "model_name", "tokenizer", "max_model_len",
    }


def test_the_real_engine_offers_every_member() -> None:
    # Checked on the class: building one loads a model. Its data members are properties there.
    assert sorted(name for name in protocol_members() if not hasattr(AsyncLLMEngine, name)) == []


def test_the_fake_engine_satisfies_the_protocol(tiny_model_path: str) -> None:
    engine = FakeAsyncEngine.from_config(EngineConfig(model=tiny_model_path))
    assert isinstance(engine, ServingEngine)
    assert sorted(name for name in protocol_members() if not hasattr(engine, name)) == []
