"""Tiny random-weight pipelines built from configs and saved with save_pretrained.

The worker loads them through its production path (`from_pretrained(local_dir)`), so the
tests exercise the real loading and calling code on CPU in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_vits(target: Path) -> Path:
    """A VITS text-to-speech model (MMS-TTS class) with a character vocabulary."""
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    target.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["<pad>", *"abcdefghijklmnopqrstuvwxyz '.,!?-"])}
    (target / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(target / "vocab.json"), pad_token="<pad>", unk_token="<pad>", add_blank=True,
                              normalize=True, phonemize=False, is_uroman=False, language=None)
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        flow_size=16, spectrogram_bins=8, duration_predictor_num_flows=2, duration_predictor_filter_channels=16,
        prior_encoder_num_flows=2, upsample_initial_channel=16, upsample_rates=[8, 2],
        upsample_kernel_sizes=[16, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        sampling_rate=16000,
    )
    torch.manual_seed(0)
    VitsModel(config).eval().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _clip_tokenizer() -> object:
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for character in characters:
            vocab[character + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_stable_diffusion(target: Path) -> Path:
    """A Stable Diffusion pipeline: 2-block UNet, 2-block VAE, 2-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, layer_norm_eps=1e-05, vocab_size=len(tokenizer.get_vocab()),  # type: ignore[attr-defined]
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    pipeline.save_pretrained(target)
    return target


def _t5_tokenizer() -> object:
    """A small unigram T5 tokenizer: a few words and the alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    words = ["a", "the", "cat", "dog", "red", "blue", "house", "tree", "boat", "sea", "sky", "walk", "run", "on", "in"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=64)


def build_wan(target: Path) -> Path:
    """A Wan2.1 text-to-video pipeline: UMT5 encoder (d_model 32), 3-channel VAE, 2-layer transformer."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer.get_vocab()), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,  # type: ignore[attr-defined]
        relative_attention_num_buckets=8,
    ))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipeline.save_pretrained(target)
    return target


def build_ltx(target: Path) -> Path:
    """An LTX-Video pipeline: T5 encoder (d_model 32), 8-channel VAE (decoder sized too), 1-layer transformer."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer.get_vocab()), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,  # type: ignore[attr-defined]
        relative_attention_num_buckets=8,
    ))
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    pipeline = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer, transformer=transformer)
    pipeline.save_pretrained(target)
    return target
