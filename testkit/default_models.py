"""The default models' published architectures, built on the meta device (no download, no memory) to
learn what each weighs in the dtype the worker runs it in on a GPU.

The configs are those of the models' own repositories: openai-whisper's ``large-v3-turbo`` dims,
``stabilityai/stable-diffusion-xl-base-1.0`` (unet, text_encoder, text_encoder_2, vae),
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (transformer, text_encoder, vae) and ``facebook/mms-tts-eng``
(VitsConfig's defaults are that model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from handler.runtime.memory import module_bytes

GB = 10**9


def _whisper_turbo() -> torch.nn.Module:
    # Whisper's encoder and decoder, as Whisper builds them (its alignment-head buffer is a sparse
    # tensor, which the meta device cannot make, and weighs nothing).
    from whisper.model import AudioEncoder, TextDecoder

    return torch.nn.ModuleList([AudioEncoder(n_mels=128, n_ctx=1500, n_state=1280, n_head=20, n_layer=32),
                                TextDecoder(n_vocab=51866, n_ctx=448, n_state=1280, n_head=20, n_layer=4)])


def sdxl_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)


def _sdxl_text_encoders() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                         hidden_act="quick_gelu"))
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
    return torch.nn.ModuleList([first, second])


def _sdxl_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024)


def wan_transformer() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                 num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def umt5_xxl() -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu"))


def _wan_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True])


def _mms_tts() -> torch.nn.Module:
    from transformers import VitsConfig, VitsModel

    return VitsModel(VitsConfig())


@dataclass(frozen=True)
class Component:
    """One part of a default pipeline, in the dtype the worker runs it in on a GPU."""

    task: str
    name: str
    build: Callable[[], torch.nn.Module]
    dtype: torch.dtype

    def bytes(self) -> int:
        with torch.device("meta"):
            module = self.build().to(self.dtype)
        return module_bytes(module)


# openai-whisper keeps fp32 weights and casts them per layer in fp16 (its LayerNorm runs in fp32);
# diffusers pipelines run in bf16 but for a video VAE, kept in fp32; VITS runs in fp32.
COMPONENTS = (
    Component("transcribe", "Whisper turbo", _whisper_turbo, torch.float32),
    Component("text2image", "SDXL UNet", sdxl_unet, torch.bfloat16),
    Component("text2image", "SDXL text encoders", _sdxl_text_encoders, torch.bfloat16),
    Component("text2image", "SDXL VAE", _sdxl_vae, torch.bfloat16),
    Component("text2video", "Wan2.1 1.3B transformer", wan_transformer, torch.bfloat16),
    Component("text2video", "UMT5-XXL text encoder", umt5_xxl, torch.bfloat16),
    Component("text2video", "Wan VAE", _wan_vae, torch.float32),
    Component("speech", "MMS-TTS", _mms_tts, torch.float32),
)


def largest_leaf_bytes(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> int:
    """Bytes of a module's largest layer (what leaf offloading brings in at a time, twice with the next)."""
    with torch.device("meta"):
        module = build().to(dtype)
    return max(module_bytes(leaf) for leaf in module.modules() if not list(leaf.children()))
