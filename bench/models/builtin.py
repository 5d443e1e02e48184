"""Built-in pipelines: real architectures with random weights from a fixed seed, built offline.

Built once into the cache, then loaded like any other folder through `from_pretrained`, so every quantizer
takes its real path. `tiny-flux` runs anywhere in seconds (widths are multiples of 64 so that every backend,
bitsandbytes 4-bit included, accepts them); `flux-dev-shape` is FLUX.1-dev at full size (about 11.9 B
transformer parameters, T5-XXL, CLIP-L, the FLUX VAE), initialised on the GPU: its memory and latency are
real, its images are not. `sd3-medium-shape` likewise for Stable Diffusion 3 medium (about 2 B transformer
parameters, CLIP-L, OpenCLIP bigG, T5-XXL).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.cache import build_once, cache_dir, versions_key
from bench.errors import UserError, first_line
from bench.parent_death import PARENT_ENV, die_with_parent

BUILD_VERSION = "v2"  # bump when a builder changes, so caches rebuild
WIDTH = 64
SEED = 0


def build_builtin(name: str) -> Path:
    """The cached folder of built-in model `name`, built on first use."""
    from bench.environment import MODEL_LIBRARIES, library_versions

    # keyed by the builder's version and the libraries that build the weights (the same seed can give other
    # weights, and other files, under another torch or diffusers)
    versions = versions_key(library_versions(*MODEL_LIBRARIES))
    return build_once(cache_dir("models") / f"{name}-{BUILD_VERSION}-{versions}", BUILDERS[name])


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte-level symbols, their word-final forms and the special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    symbols += [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


@functools.cache
def _tokenizers():
    """A byte-level CLIP tokenizer and a character-level T5 (Unigram) tokenizer, made without files."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab = byte_level_vocab()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()"]
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip(config: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = byte_level_vocab()
    special = {
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(max_position_embeddings=77, **special, **config)).eval()


def _t5(config: dict):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, **config)).eval()


def _vae(**config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **config,
    ).eval()


def _flux_pipeline(
    folder: Path, transformer_config: dict, clip_config: dict, t5_config: dict, vae_config: dict, scheduler_config: dict
) -> None:
    """Build a FluxPipeline with random weights (seed SEED) on the current default device and save it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(SEED)
    clip_tokenizer, t5_tokenizer = _tokenizers()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=_vae(**vae_config),
        text_encoder=_clip(clip_config),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5(t5_config),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**transformer_config).eval(),
    )
    pipe.save_pretrained(folder)


TINY_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
    "shift_factor": 0.0609, "scaling_factor": 1.5035,
}  # fmt: skip
TINY_T5 = {"d_model": WIDTH, "d_ff": 2 * WIDTH, "d_kv": 16, "num_heads": 4, "num_layers": 2}


def _build_tiny_flux(folder: Path, blocks: tuple[int, int] = (1, 1)) -> None:
    """The tiny FLUX pipeline; `blocks` = (double-stream, single-stream) transformer blocks."""
    _flux_pipeline(
        folder,
        transformer_config={
            "patch_size": 1, "in_channels": 64, "num_layers": blocks[0], "num_single_layers": blocks[1],
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": WIDTH,
            "pooled_projection_dim": WIDTH, "axes_dims_rope": (8, 12, 12), "guidance_embeds": True,
        },
        clip_config={"vocab_size": len(byte_level_vocab()), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": WIDTH},
        t5_config={"vocab_size": len(_tokenizers()[1]), **TINY_T5},
        vae_config=TINY_VAE,
        scheduler_config={},
    )  # fmt: skip


def _sd3_pipeline(
    folder: Path,
    transformer_config: dict,
    clip_l_config: dict,
    clip_g_config: dict,
    t5_config: dict,
    vae_config: dict,
    scheduler_config: dict,
) -> None:
    """Build a StableDiffusion3Pipeline with random weights (seed SEED) on the current default device and save it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(SEED)
    clip_tokenizer, t5_tokenizer = _tokenizers()
    transformer = SD3Transformer2DModel(**transformer_config).eval()  # first: the seed's draws stay as they were
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=_vae(**vae_config),
        text_encoder=_clip(clip_l_config, with_projection=True),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip(clip_g_config, with_projection=True),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5(t5_config),
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
    ).save_pretrained(folder)


def _build_tiny_sd3(folder: Path) -> None:
    """Stable Diffusion 3 at toy width: two projecting CLIP encoders whose hidden states fill the T5 width."""
    clip_config = {"vocab_size": len(byte_level_vocab()), "hidden_size": WIDTH // 2, "intermediate_size": WIDTH, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "projection_dim": WIDTH // 2}  # fmt: skip
    _sd3_pipeline(
        folder,
        transformer_config={
            "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 32, "num_attention_heads": 2, "caption_projection_dim": WIDTH,
            "joint_attention_dim": WIDTH, "pooled_projection_dim": WIDTH,
        },
        clip_l_config=clip_config,
        clip_g_config=clip_config,
        t5_config={"vocab_size": len(_tokenizers()[1]), **TINY_T5},
        vae_config=TINY_VAE,
        scheduler_config={},
    )  # fmt: skip


@contextmanager
def _on_the_gpu_in_bf16() -> Iterator[None]:
    """Create tensors directly on the GPU in bf16 (a full-size model builds in seconds there, not minutes)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            yield
    finally:
        torch.set_default_dtype(previous)
        torch.cuda.empty_cache()


# The published configs of the full-size models (FLUX.1-dev; Stable Diffusion 3 medium). Both pipelines use
# CLIP-L, T5-XXL and a 16-channel VAE of the same layout.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip
VAE_16 = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
          "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
          "sample_size": 1024}  # fmt: skip
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56), "guidance_embeds": True,
}  # fmt: skip
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip


def _build_flux_dev_shape(folder: Path) -> None:
    """FLUX.1-dev's published configs, random bf16 weights initialised directly on the GPU."""
    with _on_the_gpu_in_bf16():
        _flux_pipeline(
            folder,
            transformer_config=FLUX_DEV_TRANSFORMER,
            clip_config={"vocab_size": 49408, **CLIP_L},
            t5_config={"vocab_size": 32128, **T5_XXL},
            vae_config={**VAE_16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
            scheduler_config={"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                              "max_shift": 1.15, "shift": 3.0, "use_dynamic_shifting": True},
        )  # fmt: skip


def _build_sd3_medium_shape(folder: Path) -> None:
    """Stable Diffusion 3 medium's published configs (MMDiT, CLIP-L, OpenCLIP bigG, T5-XXL), random bf16 weights
    initialised directly on the GPU."""
    with _on_the_gpu_in_bf16():
        _sd3_pipeline(
            folder,
            transformer_config=SD3_MEDIUM_TRANSFORMER,
            clip_l_config={"vocab_size": 49408, **CLIP_L},
            clip_g_config={"vocab_size": 49408, **CLIP_G},
            t5_config={"vocab_size": 32128, **T5_XXL},
            vae_config={**VAE_16, "shift_factor": 0.0609, "scaling_factor": 1.5305},
            scheduler_config={"shift": 3.0},
        )


# the full-size models, built on the GPU
BUILD_FAILED = "quantbench: building failed: "  # the child's last line when it fails
GPU_BUILDERS = {"flux-dev-shape": _build_flux_dev_shape, "sd3-medium-shape": _build_sd3_medium_shape}


def _in_a_child_process(name: str) -> Callable[[Path], None]:
    """Full-size model `name`'s builder, run in a child process (refused first where torch sees no CUDA).

    Building creates a CUDA context, about 0.6 GiB that would stay on the first GPU for the whole run if the
    driver built the model itself: every cell placed there would run beside it (`gpu_other_processes` 1). The
    child dies with the driver (`bench.parent_death`); its output goes to `<cache>/logs/build-<name>.log`.
    """

    def build(folder: Path) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"model builtin {name!r} is built on a CUDA GPU (billions of parameters); none is here")
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        log_path = cache_dir("logs") / f"build-{name}.log"
        with open(log_path, "w") as log:
            done = subprocess.run(
                [sys.executable, "-m", "bench.models.builtin", name, str(folder)],
                env={**os.environ, "PYTHONPATH": path, PARENT_ENV: str(os.getpid())},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            last = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
            reason = last.removeprefix(BUILD_FAILED) if last.startswith(BUILD_FAILED) else f"exit {done.returncode}"
            raise UserError(f"model builtin {name!r}: building it failed: {reason} (its whole output: {log_path})")

    return build


BUILDERS = {
    "tiny-flux": _build_tiny_flux,
    # FLUX.1-dev's depth at the tiny width: what compiling costs per block, on any CPU
    "tiny-flux-deep": functools.partial(
        _build_tiny_flux, blocks=(FLUX_DEV_TRANSFORMER["num_layers"], FLUX_DEV_TRANSFORMER["num_single_layers"])
    ),
    "tiny-sd3": _build_tiny_sd3,
    **{name: _in_a_child_process(name) for name in GPU_BUILDERS},
}
SYNTHETIC = tuple(BUILDERS)  # every built-in model has random weights


def _build_in_this_process(name: str, folder: Path) -> None:
    """The child process of `_in_a_child_process`: build, or end with the traceback and then one line that says
    why (`BUILD_FAILED` and the error's first line) for the driver to show."""
    die_with_parent()
    try:
        GPU_BUILDERS[name](folder)
    except Exception as error:
        traceback.print_exc()
        print(f"{BUILD_FAILED}{type(error).__name__}: {first_line(error)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":  # NAME FOLDER
    _build_in_this_process(sys.argv[1], Path(sys.argv[2]))
