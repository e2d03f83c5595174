"""A tiny Stable Diffusion pipeline built from config, for tests that run the real diffusers code.

No image model ships with the node, and a real one is gigabytes: this builds a UNet, a VAE and
a CLIP text encoder with a few tens of thousands of parameters in all (fixed seeds, so every
run builds the same weights) and a word-level tokenizer, saves them with `save_pretrained` and
the node loads them from that directory as it would any DiffusionPipeline. The images are
noise, but every step of the node's path (tokenizer, text encoder, scheduler, UNet, VAE, PNG)
is the real one. Two denoising steps at 64x64 take about 0.1 s on one CPU core.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import load_config, merge_settings
from node.engine import build_engine
from node.server.app import create_app
from server_support import Node, NodeProcess, NodeTestServer, free_port, start_node_process, wait_for

# The tokenizer knows these words; any other word is <unk> (still one token each).
VOCABULARY = ("a", "an", "the", "red", "green", "blue", "cat", "dog", "house", "tree", "in", "on", "of", "picture")
MAX_PROMPT_TOKENS = 16  # the text encoder's window: a prompt over it is PROMPT_TOO_LONG
# Call arguments the node's config passes to the pipeline (`engine_args` of the model).
PIPELINE_ARGS = {"num_inference_steps": 2, "guidance_scale": 1.0}
IMAGE_MODEL = "tiny-sd"
SIZES = ["64x64", "32x48"]
MAX_IMAGES = 3
CONFIDENTIAL_IMAGES = "/v1/confidential/images/generations"
PLAIN_IMAGES = "/v1/images/generations"


def build_tiny_pipeline(directory: Path) -> Path:
    """Save the tiny pipeline under `directory` (made if needed) and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    specials = ("<pad>", "<unk>", "<bos>", "<eos>")
    vocab = {token: index for index, token in enumerate((*specials, *VOCABULARY))}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        model_max_length=MAX_PROMPT_TOKENS,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            projection_dim=16,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<bos>"],
            eos_token_id=vocab["<eos>"],
        )
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory)
    return directory


def parameter_count(directory: Path) -> int:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(directory)
    return sum(p.numel() for name in ("unet", "vae", "text_encoder") for p in getattr(pipeline, name).parameters())


def image_model(directory: Path, **fields: Any) -> dict[str, Any]:
    """The `[[engine.models]]` entry of the tiny pipeline."""
    return {
        "name": IMAGE_MODEL,
        "source": str(directory),
        "task": "image",
        "sizes": SIZES,
        "max_images": MAX_IMAGES,
        "engine_args": PIPELINE_ARGS,
        **fields,
    }


def image_body(prompt: str = "a red cat", **fields: Any) -> dict[str, Any]:
    return {"model": IMAGE_MODEL, "prompt": prompt, **fields}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline's directory, built once per test session."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def make_image_node(aiohttp_client, tiny_pipeline):
    """`await make_image_node(model=None, **config_overrides)` -> Node: an in-process node whose
    engine is the one its config selects (diffusers for the tiny pipeline)."""

    async def make(model: dict[str, Any] | None = None, **overrides: Any) -> Node:
        base = {"engine": {"kind": "vllm", "models": [model or image_model(tiny_pipeline)]}}
        config = load_config(**merge_settings(base, overrides))
        engine = build_engine(config)
        app = create_app(config, engine)
        client = await aiohttp_client(NodeTestServer(app))
        await wait_for(lambda: engine.ready, timeout=60, what="image engine ready")
        return Node(app, client, engine)

    return make


def spawn_image_node(directory: Path, *settings: str, extra_args: list[str] | None = None) -> NodeProcess:
    """`tee-node serve --config <file>` serving the tiny pipeline (its only model), on a free
    port, once /ready answers; `settings` are extra top-level TOML lines (before the tables)."""
    port = free_port()
    config = tempfile.NamedTemporaryFile("w", prefix="tee-node-images-", suffix=".toml", delete=False)
    model = image_model(directory)
    config.write(
        "\n".join(
            [
                'tee_mode = "simulated"',
                *settings,
                "[engine]",
                'kind = "vllm"',
                "[[engine.models]]",
                f'name = "{model["name"]}"',
                f'source = "{model["source"]}"',
                'task = "image"',
                f"sizes = {SIZES!r}".replace("'", '"'),
                f"max_images = {MAX_IMAGES}",
                "engine_args = { num_inference_steps = 2, guidance_scale = 1.0 }",
            ]
        )
        + "\n"
    )
    config.close()
    return start_node_process(
        ["serve", "--config", config.name, "--port", str(port), *(extra_args or [])],
        port,
        ready_within=90,
        log_prefix="tee-node-images-",
    )


@pytest.fixture(scope="session")
def image_node(tiny_pipeline) -> Iterator[NodeProcess]:
    """`tee-node serve` with the tiny pipeline as its one model, shared by the session's tests."""
    node = spawn_image_node(tiny_pipeline)
    try:
        yield node
    finally:
        node.stop()
        node.log_path.unlink(missing_ok=True)
