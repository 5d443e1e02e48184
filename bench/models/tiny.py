"""Built-in tiny pipelines: real architectures with random weights from a fixed seed, built offline.

Built once into the cache, then loaded like any other folder through `from_pretrained`. Widths are
multiples of 64 so that every quantization backend (bitsandbytes 4-bit, torchao int8 dynamic) accepts them.
"""

from __future__ import annotations

from pathlib import Path

from bench.cache import build_once, cache_dir

TINY_VERSION = "v1"  # bump when a builder changes, so caches rebuild
WIDTH = 64
SEED = 0


def build_tiny(name: str) -> Path:
    """The cached folder of built-in model `name`, built on first use."""
    builders = {"tiny-flux": _build_tiny_flux}
    return build_once(cache_dir("models") / f"{name}-{TINY_VERSION}", builders[name])


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


def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = byte_level_vocab()
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=WIDTH,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()"]
    t5_tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(pieces), d_model=WIDTH, d_ff=2 * WIDTH, d_kv=16, num_heads=4, num_layers=2,
                 pad_token_id=0, eos_token_id=1)
    )  # fmt: skip
    return clip.eval(), clip_tokenizer, t5.eval(), t5_tokenizer


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def _build_tiny_flux(folder: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        axes_dims_rope=(8, 12, 12),
        guidance_embeds=True,
    ).eval()
    clip, clip_tokenizer, t5, t5_tokenizer = _text_encoders()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
