"""Engines behind the node: vLLM in-process, an upstream OpenAI-compatible server, or echo."""

from __future__ import annotations

from ..config import NodeConfig
from .base import Engine, ModelCard


def build_engine(config: NodeConfig) -> Engine:
    """The engine the config names; heavy imports (vLLM) happen only for the kind chosen."""
    kind = config.engine.kind
    if kind == "echo":
        from .echo import DEFAULT_ECHO_MODEL, EchoEngine

        names = [m.name for m in config.engine.models] or [DEFAULT_ECHO_MODEL]
        tasks = frozenset({"chat", "completions", "embeddings"})
        return EchoEngine(
            [ModelCard(name, tasks) for name in dict.fromkeys(names)], token_delay=config.engine.echo_token_delay
        )
    if kind == "upstream":
        from .upstream import UpstreamEngine

        return UpstreamEngine(config.engine, max_connections=config.limits.max_in_flight)
    from .vllm import VllmEngine

    return VllmEngine(config.engine, config.cache_dir, config.log_level)


__all__ = ["Engine", "ModelCard", "build_engine"]
