"""Engines behind the node: vLLM in-process, diffusers in-process (image models), an upstream
OpenAI-compatible server, or echo."""

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
    text = [m for m in config.engine.models if m.task != "image"]
    image = [m for m in config.engine.models if m.task == "image"]
    engines: list[Engine] = []
    if text or not image:  # a config of image models only never imports vLLM
        from .vllm import VllmEngine

        engines.append(VllmEngine(config.engine.model_copy(update={"models": text}), config.cache_dir, config.log_level))
    if image:
        from .images import ImageEngine

        engines.append(ImageEngine(image))
    if len(engines) == 1:
        return engines[0]
    from .routed import RoutedEngine

    return RoutedEngine(engines)


__all__ = ["Engine", "ModelCard", "build_engine"]
