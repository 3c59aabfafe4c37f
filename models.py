"""Everything model-specific, so the train scripts stay generic.

Seven families, each a real diffusers pipeline: FLUX.1-dev (FluxPipeline), Stable Diffusion v1.4
(StableDiffusionPipeline with a DDIMScheduler), SD3.5-Medium (StableDiffusion3Pipeline), Qwen-Image
(QwenImagePipeline), HunyuanVideo T2V (HunyuanVideoPipeline), Wan2.1 T2V (WanPipeline) and SkyReels-V1 I2V
(HunyuanSkyreelsImageToVideoPipeline). Each has a section in the functions below (load, tiny preset, encode_prompts,
initial_noise, predict, decode, defaults). The `tiny-*` presets build the same pipeline classes from small configs
with seeded random weights and in-code tokenizers, so every test and smoke run works offline on a CPU.
`tiny-digits` is the one pretrained preset: a FluxPipeline on 8x8 pixels (no VAE, no text encoder), its weights
shipped in assets/ and made by digits.py (the real-data demo).

Latent layouts ("step layout", what the SDE steps in sde.py work on):
    FLUX       packed tokens [B, L, 4C]     (2x2 patches of the [B, C, h, w] VAE latent, as FluxPipeline packs them)
    Qwen-Image packed tokens [B, L, 4C]     (the same packing of its one-frame latent [B, C, 1, h, w])
    SD         [B, 4, h, w]
    SD3.5      [B, 16, h, w]
    Hunyuan    [B, C, f, h, w]
    Wan        [B, C, f, h, w]              (f = (frames - 1) / 4 + 1; one frame by default, as the official script)
    SkyReels   [B, C, f, h, w]              (the first-frame image latents are concatenated inside predict())
"""
import contextlib
import copy
import logging
import os
import string
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.utils import logging as transformers_logging

# diffusers' pipeline imports make transformers warn that torchvision (image processors) is missing;
# nothing here needs it, so those import-time warnings are silenced.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
from diffusers import (AutoencoderKL, AutoencoderKLHunyuanVideo, AutoencoderKLQwenImage, AutoencoderKLWan,
                       DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel,
                       QwenImagePipeline, QwenImageTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, UNet2DConditionModel, WanPipeline, WanTransformer3DModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.utils.torch_utils import randn_tensor
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, LlamaConfig,
                          LlamaModel, LlamaTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2Tokenizer, T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel)

transformers_logging.set_verbosity(_verbosity)

HUB_IDS = {
    "flux": "black-forest-labs/FLUX.1-dev",
    "sd14": "CompVis/stable-diffusion-v1-4",
    "hunyuan": "hunyuanvideo-community/HunyuanVideo",
    # The diffusers-format SkyReels-V1 I2V pipeline the official DanceGRPO README downloads (the Skywork/SkyReels-V1-
    # Hunyuan-I2V transformer plus HunyuanVideo's VAE and text encoders).
    "skyreels": "xzyhku/SkyReels-V1-I2V",
    "sd35": "stabilityai/stable-diffusion-3.5-medium",  # Flow-GRPO's main model
    "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "qwenimage": "Qwen/Qwen-Image",
}
TINY = ("tiny-flux", "tiny-sd", "tiny-hunyuan", "tiny-skyreels", "tiny-sd35", "tiny-wan", "tiny-qwenimage")
FAMILY = {"flux": "flux", "tiny-flux": "flux", "sd14": "sd", "tiny-sd": "sd", "hunyuan": "hunyuan",
          "tiny-hunyuan": "hunyuan", "skyreels": "skyreels", "tiny-skyreels": "skyreels", "sd35": "sd35",
          "tiny-sd35": "sd35", "wan": "wan", "tiny-wan": "wan", "qwenimage": "qwenimage",
          "tiny-qwenimage": "qwenimage", "tiny-digits": "flux"}
DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "tiny-digits.safetensors"  # made by digits.py --pretrain
PIPELINES = {"flux": FluxPipeline, "sd": StableDiffusionPipeline, "hunyuan": HunyuanVideoPipeline,
             "skyreels": HunyuanSkyreelsImageToVideoPipeline, "sd35": StableDiffusion3Pipeline,
             "wan": WanPipeline, "qwenimage": QwenImagePipeline}

FLUX_TEXT_LEN = 512  # T5 tokens, FluxPipeline's default max_sequence_length (the official preprocessing uses it too)
HUNYUAN_TEXT_LEN = 256  # Llama tokens after the prompt template, HunyuanVideoPipeline's default
TINY_TEXT_LEN = 64  # the tiny presets' character-level tokenizers: a prompt fits, no 512 tokens of padding
SD35_TEXT_LEN = 128  # T5 tokens: Flow-GRPO's compute_text_embeddings(..., max_sequence_length=128), train_sd3.py:625
QWEN_TEXT_LEN = 1024  # Qwen2.5-VL tokens after the template, QwenImagePipeline's default (official: padded to 1024)
WAN_TEXT_LEN = 226  # UMT5 tokens, WanPipeline's default (the official preprocessing calls its encode_prompt)
SKYREELS_EMBEDDED_GUIDANCE = 1.0  # official SkyReels GRPO feeds guidance=1000 (= 1.0 * 1000) next to its CFG


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def load_pipeline(model, model_path=None, dtype=torch.float32, seed=0):
    """The real diffusers pipeline for `model`, on CPU, frozen except for the trained network (still in .eval()).

    tiny-*: built from small configs with weights seeded by `seed` (identical on every rank).
    tiny-digits: the shipped pretrained weights (DIGITS_WEIGHTS; `seed` is not used).
    Real names: from_pretrained(model_path or HUB_IDS[model]) from local files only, so a missing download
    fails at once instead of hanging on the network."""
    if model not in FAMILY:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(FAMILY)}")
    family = FAMILY[model]
    if model in TINY or model == "tiny-digits":
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            pipe = digits_pipeline(DIGITS_WEIGHTS) if model == "tiny-digits" else {
                "flux": _tiny_flux, "sd": _tiny_sd, "hunyuan": _tiny_hunyuan, "skyreels": _tiny_skyreels,
                "sd35": _tiny_sd35, "wan": _tiny_wan, "qwenimage": _tiny_qwenimage}[family]()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        path = model_path or HUB_IDS[model]
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
        try:
            pipe = PIPELINES[family].from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"could not load {model!r} from {path!r} with local files only ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}). Download the weights and pass --model_path DIR, or use a "
                f"tiny preset ({', '.join(TINY)}, tiny-digits)") from None
    if family == "sd":  # DDPO/DanceGRPO sample SD with DDIM; same betas, from the checkpoint's scheduler config
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if family == "wan" and not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        # Wan ships UniPC (flow_shift 3); DanceGRPO samples it with the Euler flow SDE, shift 3, so __call__ uses Euler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.get("flow_shift", 3.0))
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
            if module is not trained_module(pipe):
                module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_name(family):
    """The pipeline component GRPO fine-tunes (also its checkpoint subfolder): "unet" for SD, else "transformer"."""
    return "unet" if family == "sd" else "transformer"


def trained_module(pipe):
    """The network GRPO fine-tunes: the UNet for SD, the transformer otherwise."""
    return getattr(pipe, trained_name(_family(pipe)))


def frozen_copy(pipe, device):
    """A frozen copy of the trained network as it is now (the initial policy, for the optional KL term of a full
    fine-tune): a second set of weights, bf16 on CUDA (FLUX 24 GB, HunyuanVideo 26 GB on every GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else trained_module(pipe).dtype
    return copy.deepcopy(trained_module(pipe)).requires_grad_(False).to(device, dtype).eval()


@contextlib.contextmanager
def reference_policy(pipe, frozen=None):
    """Inside it, predict() runs the frozen initial policy, the KL term's reference: a LoRA run switches its
    adapters off (the base is the initial policy, as Flow-GRPO's disable_adapter()); a full fine-tune swaps in
    `frozen` (frozen_copy, made before training)."""
    net, name = trained_module(pipe), trained_name(_family(pipe))
    net.disable_adapters() if frozen is None else setattr(pipe, name, frozen)
    try:
        yield
    finally:
        net.enable_adapters() if frozen is None else setattr(pipe, name, net)


def _family(pipe):
    return next(f for f, cls in PIPELINES.items() if isinstance(pipe, cls))


# ----------------------------------------------------------------------------------------------------------------
# Tiny presets: real pipeline classes, small configs, tokenizers built in code (character-level, any text works)
# ----------------------------------------------------------------------------------------------------------------

def _tiny_clip(hidden=32, cls=CLIPTextModel):
    """CLIP BPE tokenizer with a byte-level character vocabulary (no merges) and a 2-layer CLIPTextModel
    (or `cls`, e.g. CLIPTextModelWithProjection for SD3)."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, cls(config)


def _tiny_t5(hidden=32, config_cls=T5Config, cls=T5EncoderModel):
    """T5 Unigram tokenizer over single characters and a 2-layer T5EncoderModel (or UMT5 for Wan)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_TEXT_LEN)
    config = config_cls(vocab_size=len(pieces), d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0)
    return tokenizer, cls(config)


def _tiny_llama(hidden=32):
    """Llama BPE tokenizer over single characters (+ the Llama-3 header tokens of HunyuanVideo's prompt template),
    right padding as the transformer's text mask expects, and a 2-layer LlamaModel."""
    symbols = ["<unk>", "<s>", "</s>", "▁"] + list(string.ascii_letters + string.digits + string.punctuation + "\n")
    tokenizer = LlamaTokenizer(vocab={t: i for i, t in enumerate(symbols)}, merges=[], pad_token="</s>",
                               padding_side="right", add_bos_token=True,
                               additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tokenizer, LlamaModel(config)


@torch.no_grad()
def _brightness_readable(vae, gain=5.0):
    """Make a random tiny VAE's decoder respond to its latents the way a trained one does.

    A random decoder's GroupNorms (Wan: RMS norms) pin the image mean: every latent decodes to the same grey, and a
    demo reward such as brightness has nothing to learn. The tiny configs use one norm group (so
    the channels' relative means survive the last norm); zeroing the scale of the inner norms turns
    each residual block into identity + constant, so the decoder is close to a linear upsampler of
    the latents; a larger output convolution gives the images contrast. Weights and config values
    only: the classes and save_pretrained / from_pretrained stay the real ones."""
    last = vae.decoder.conv_norm_out if hasattr(vae.decoder, "conv_norm_out") else vae.decoder.norm_out
    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.GroupNorm) and m is not last:
            m.weight.zero_()
        elif hasattr(m, "gamma") and m is not last:  # Wan's RMS norms (channel-wise, one scale per channel)
            m.gamma.zero_()
    conv_out = [m for m in vae.decoder.conv_out.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    conv_out[-1].weight.mul_(gain)
    return vae


def _tiny_vae16(scaling_factor, shift_factor):
    """The 16-channel AutoencoderKL of FLUX and SD3 at toy width; two blocks -> 2x downsampling (real: 8x)."""
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=1, sample_size=32, scaling_factor=scaling_factor,
                        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    return _brightness_readable(vae)


def _tiny_flux():
    clip_tok, clip = _tiny_clip()
    t5_tok, t5 = _tiny_t5()
    vae = _tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's vae/config.json factors
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def _tiny_sd():
    clip_tok, clip = _tiny_clip()
    # three blocks -> 4x downsampling (SD's VAE: four blocks, 8x)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=1, sample_size=32, scaling_factor=0.18215)
    _brightness_readable(vae)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    # SD v1.4's noise schedule
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=clip_tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _tiny_hunyuan(cls=HunyuanVideoPipeline, in_channels=4):
    llama_tok, llama = _tiny_llama()
    clip_tok, clip = _tiny_clip()
    # 3 blocks: 4x spatial and 4x temporal compression (the real VAE: 8x and 4x, 16 channels)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 16),
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    norm_num_groups=1, spatial_compression_ratio=4, temporal_compression_ratio=4)
    _brightness_readable(vae)
    transformer = HunyuanVideoTransformer3DModel(in_channels=in_channels, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=16, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=32,
                                                 rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return cls(text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae, scheduler=scheduler,
               text_encoder_2=clip, tokenizer_2=clip_tok)


def _tiny_skyreels():
    # the I2V transformer sees the noisy latents and the first-frame latents stacked on channels
    return _tiny_hunyuan(HunyuanSkyreelsImageToVideoPipeline, in_channels=8)


def _tiny_sd35():
    clip_tok, clip = _tiny_clip(cls=CLIPTextModelWithProjection)
    clip2_tok, clip2 = _tiny_clip(cls=CLIPTextModelWithProjection)
    t5_tok, t5 = _tiny_t5()
    vae = _tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609)  # SD3.5's vae/config.json factors
    # SD3.5-Medium's features at toy width: MMDiT-X dual attention in the first layer, RMS qk-norm;
    # pooled = both CLIPs' projections (2 x 32), joint = T5 width (32)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=32,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    # SD3.5-Medium's scheduler/scheduler_config.json on the hub: FlowMatchEulerDiscreteScheduler, num_train_timesteps
    # 1000, shift 3.0, every other key at its default (no dynamic shifting)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                                    text_encoder_2=clip2, tokenizer_2=clip2_tok, text_encoder_3=t5,
                                    tokenizer_3=t5_tok, transformer=transformer)


def _tiny_wan():
    tokenizer, umt5 = _tiny_t5(config_cls=UMT5Config, cls=UMT5EncoderModel)
    # Wan's causal 3D VAE at toy width: 4 channels (real: 16), 4x space and 4x time (real: 8x, 4x); identity
    # latent statistics (real: per-channel latents_mean / latents_std)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=4,
                           scale_factor_spatial=4)
    _brightness_readable(vae, gain=2.0)  # Wan's last RMS norm keeps the scale: 5 saturates half the pixels
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer)


def _tiny_qwen25vl(hidden=32):
    """Qwen2 byte-level BPE tokenizer over single bytes (no merges) with the chat tokens of Qwen-Image's prompt
    template, and a 2-layer Qwen2.5-VL (its 1-block vision tower is never used for text)."""
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tokenizer.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.pad_token = "<|endoftext|>"
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]))
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config)


def _tiny_qwenimage():
    tokenizer, text_encoder = _tiny_qwen25vl()
    # Qwen-Image's VAE (Wan-style, one latent frame): 4 channels (real: 16), one block -> 2x (real: 8x)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    _brightness_readable(vae)
    # MMDiT on 2x2-packed latents (4C = 16 inputs), text width = the text encoder's
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    # deviation (tiny only): a fixed shift 3 (the official GRPO schedule) instead of Qwen-Image's resolution-
    # dependent dynamic shift, so the pipeline's own __call__ samples the schedule GRPO trains on
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


DIGITS_TEXT = (1, 32)  # tiny-digits' constant prompt embedding: 1 token of width 32 (and a pooled vector of 32)


def digits_pipeline(weights=DIGITS_WEIGHTS):
    """tiny-digits: a FluxPipeline in pixel space for 8x8 grey digits, no VAE and no text encoder.

    The transformer (1 double + 2 single blocks, 2 heads of 16, no guidance embedding: 84k parameters) sees the
    pixels in [-1, 1] packed 2x2 into 16 tokens of 4 channels, FluxPipeline's own packing with vae_scale_factor 1.
    Its text input is a learned constant, pipe.prompt_embedding = {prompt_embeds [1, 1, 32], pooled_prompt_embeds
    [1, 32]}, the same for every prompt. weights: a safetensors file of `transformer.<name>` tensors and those two
    (digits.py --pretrain writes it); None: random weights from torch's global RNG (pretraining starts there)."""
    tokens, width = DIGITS_TEXT
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=width,
                                         pooled_projection_dim=width, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.vae_scale_factor = 1  # pixels: FluxPipeline's packing and unpacking rules with no VAE downsampling
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=2)  # [-1, 1] -> [0, 1], as for a VAE's output
    pipe.prompt_embedding = {"prompt_embeds": torch.randn(1, tokens, width),  # learned in pretraining
                             "pooled_prompt_embeds": torch.randn(1, width)}
    if weights is not None:
        from safetensors.torch import load_file
        state = load_file(weights)
        transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items()
                                     if k.startswith("transformer.")}, strict=True)
        pipe.prompt_embedding = {k: state[k] for k in pipe.prompt_embedding}
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------

def _hunyuan_template(tokenizer):
    """diffusers' HunyuanVideo prompt template. Its crop_start (95) is the template's length under the Llama-3
    tokenizer; any other tokenizer (the tiny presets) gets the template prefix counted instead."""
    if "<|begin_of_text|>" in tokenizer.get_vocab():
        return DEFAULT_PROMPT_TEMPLATE
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    return {**DEFAULT_PROMPT_TEMPLATE, "crop_start": len(tokenizer(prefix).input_ids)}


def _hunyuan_text(pipe, prompts, device):
    embeds, pooled, mask = pipe.encode_prompt(prompts, prompt_template=_hunyuan_template(pipe.tokenizer),
                                              device=device, max_sequence_length=_text_len(pipe.tokenizer, HUNYUAN_TEXT_LEN))
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}


def _qwen_template_start(pipe):
    """QwenImagePipeline drops the first 34 tokens (its prompt template's prefix under Qwen's tokenizer) of the
    text encoder's output; the tiny preset's byte-level tokenizer gets its own count of that prefix."""
    if "<|vision_start|>" not in pipe.tokenizer.get_vocab():
        prefix = pipe.prompt_template_encode.split("{}")[0]
        pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)


def _text_len(tokenizer, default):
    """Text tokens for the transformer: the pipeline default, or fewer where the tokenizer says so (tiny presets)."""
    return min(default, tokenizer.model_max_length)


class _Truncations(logging.Filter):
    """Drops, and counts, the warnings that a prompt was cut to the text encoder's length: diffusers repeats the cut
    text in every call (megabytes a run for one long prompt)."""
    MARKS = ("was truncated", "longer than the specified maximum sequence length")

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record):
        cut = any(mark in record.getMessage() for mark in self.MARKS)
        self.count += cut
        return not cut


@torch.no_grad()
def encode_prompts(pipe, prompts, device):
    """Text conditioning as a dict of batch-first tensors (leading dim B = len(prompts)), via the pipeline's own
    encode_prompt. SD and SkyReels (CFG) add the empty prompt's embeddings under `negative_*` keys. A prompt longer
    than a text encoder reads is cut to its length (as the pipelines do), told in one line once per pipeline."""
    handlers, cuts = logging.getLogger("diffusers").handlers + logging.getLogger("transformers").handlers, _Truncations()
    for h in handlers:
        h.addFilter(cuts)
    try:
        cond = _encode_prompts(pipe, list(prompts), device)
    finally:
        for h in handlers:
            h.removeFilter(cuts)
    if cuts.count and not getattr(pipe, "_told_truncation", False):
        pipe._told_truncation = True
        longest = max(prompts, key=len)
        print(f"warning: prompts longer than the text encoder reads are cut to its length (e.g. {len(longest)} "
              f"characters: {longest[:40]!r}...); told once", file=sys.stderr, flush=True)
    return cond


def _encode_prompts(pipe, prompts, device):
    family = _family(pipe)
    if family == "flux" and pipe.text_encoder is None:  # tiny-digits: its learned constant, the same for every prompt
        given = {k: v.to(pipe.transformer.dtype).expand(len(prompts), *v.shape[1:])
                 for k, v in pipe.prompt_embedding.items()}
        embeds, pooled, _ = pipe.encode_prompt(prompts, device=device, **given)  # returns them as they are
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # [B, 1, 32], [B, 32]
    elif family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, device=device,
                                               max_sequence_length=_text_len(pipe.tokenizer_2, FLUX_TEXT_LEN))
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # [B, 512, 4096], [B, 768]; txt_ids = 0
    elif family == "sd":  # uncond = "" for every prompt, exactly as StableDiffusionPipeline does for CFG
        embeds, neg = pipe.encode_prompt(prompts, device, 1, True)
        cond = {"prompt_embeds": embeds, "negative_prompt_embeds": neg}  # [B, 77, 768] each
    elif family == "sd35":  # CLIP-L, CLIP-G and T5 on the same prompt; uncond = "" as the pipeline and Flow-GRPO
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=True,
            max_sequence_length=_text_len(pipe.tokenizer_3, SD35_TEXT_LEN))
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,  # [B, 77 + 128, 4096], [B, 2048]
                "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}
    elif family == "wan":  # uncond = "" (the official preprocessing's encode_prompt with CFG and no negative prompt)
        embeds, neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device=device,
                                         max_sequence_length=_text_len(pipe.tokenizer, WAN_TEXT_LEN))
        cond = {"prompt_embeds": embeds, "negative_prompt_embeds": neg}  # [B, 226, 4096] each, zero after the text
    elif family == "qwenimage":  # no negative prompt: the official Qwen-Image GRPO samples without CFG
        _qwen_template_start(pipe)
        embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=QWEN_TEXT_LEN)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}  # [B, L, 3584], [B, L]; L = longest prompt
    else:
        cond = _hunyuan_text(pipe, prompts, device)  # [B, 256, 4096], [B, 768], [B, 256]
        if family == "skyreels":  # official SkyReels GRPO: the unconditional branch is the empty prompt
            neg = _hunyuan_text(pipe, [""], device)
            cond.update({"negative_" + k: v.repeat(len(prompts), *[1] * (v.dim() - 1)) for k, v in neg.items()})
    return {k: v.to(device) for k, v in cond.items()}


@torch.no_grad()
def encode_image_condition(pipe, images, num_frames, generator=None):
    """SkyReels first-frame conditioning: images [B, 3, H, W] in [0, 1] -> {"image_latents": [B, C, f, h, w]},
    the VAE latent of each image (sampled, times the VAE scaling factor) in frame 0 and zeros after it, prepared by
    HunyuanSkyreelsImageToVideoPipeline.prepare_latents."""
    B, _, H, W = images.shape
    vae = pipe.vae
    image = (images * 2 - 1).to(vae.device, vae.dtype)  # [-1, 1], as the pipeline's video_processor.preprocess
    C = pipe.transformer.config.in_channels // 2
    f = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    h, w = H // pipe.vae_scale_factor_spatial, W // pipe.vae_scale_factor_spatial
    placeholder = torch.zeros(B, C, f, h, w)  # skips prepare_latents' noise draw; initial_noise() draws the noise
    _, image_latents = pipe.prepare_latents(image, B, C, H, W, num_frames, torch.float32, vae.device, generator,
                                            latents=placeholder)
    return {"image_latents": image_latents}


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

def initial_noise(pipe, batch, height, width, num_frames, generator):
    """x_1 ~ N(0, I) in the step layout, float32, drawn on CPU with `generator` the way each pipeline draws it."""
    family = _family(pipe)
    if family == "flux":  # drawn as [B, C, h, w] then packed into [B, h/2 * w/2, 4C], as FluxPipeline does
        C = pipe.transformer.config.in_channels // 4
        return pipe.prepare_latents(batch, C, height, width, torch.float32, "cpu", generator)[0]
    if family == "sd":  # [B, 4, H/s, W/s]; DDIM's init_noise_sigma is 1
        C = pipe.unet.config.in_channels
        return pipe.prepare_latents(batch, C, height, width, torch.float32, "cpu", generator)
    if family == "qwenimage":  # drawn as [B, 1, C, h, w] then packed into [B, h/2 * w/2, 4C], as QwenImagePipeline
        C = pipe.transformer.config.in_channels // 4
        return pipe.prepare_latents(batch, C, height, width, torch.float32, "cpu", generator)
    if family == "sd35":  # [B, 16, H/8, W/8]
        C = pipe.transformer.config.in_channels
        return pipe.prepare_latents(batch, C, height, width, torch.float32, "cpu", generator)
    C = pipe.transformer.config.out_channels
    f = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    s = pipe.vae_scale_factor_spatial
    return randn_tensor((batch, C, f, height // s, width // s), generator=generator, dtype=torch.float32)


def _flux_packed_hw(pipe, height, width):
    """(h, w) of the unpacked FLUX latent for an image of height x width (FluxPipeline.prepare_latents' rule)."""
    s = pipe.vae_scale_factor
    return 2 * (height // (s * 2)), 2 * (width // (s * 2))


def predict(pipe, latents, t, cond, *, guidance_scale, height, width, extra=None):
    """One network call on latents [B, ...] (step layout) at t: Tensor[B] (sigma in [0, 1] for flow models, the
    integer DDPM timestep for SD). Returns velocity (flow) or epsilon (SD) in float32, same shape as latents.

    FLUX / Hunyuan: guidance_scale is the embedded guidance, one call. SD / SD3.5 / Wan / SkyReels: classifier-free
    guidance, uncond and cond batched in one call: uncond + s * (cond - uncond); for SD3.5 the gradient flows through
    the conditional branch only (Flow-GRPO's detach), the others train both branches as their official code."""
    family, net = _family(pipe), trained_module(pipe)
    dtype, B = net.dtype, latents.shape[0]
    x = latents.to(dtype)
    c = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    if family == "flux":
        h, w = _flux_packed_hw(pipe, height, width)
        out = net(hidden_states=x,  # [B, L, 4C]
                  timestep=t.to(dtype),  # sigma; FluxTransformer2DModel multiplies by 1000 (FluxPipeline passes t/1000)
                  guidance=torch.full([B], guidance_scale, device=x.device, dtype=dtype)  # also x1000 inside
                  if net.config.guidance_embeds else None,  # FluxPipeline's rule (tiny-digits has no guidance)
                  pooled_projections=c["pooled_prompt_embeds"], encoder_hidden_states=c["prompt_embeds"],
                  txt_ids=torch.zeros(c["prompt_embeds"].shape[1], 3, device=x.device, dtype=dtype),
                  img_ids=pipe._prepare_latent_image_ids(B, h // 2, w // 2, x.device, dtype),
                  return_dict=False)[0]
    elif family == "sd":
        if guidance_scale == 1.0:
            out = net(x, t, encoder_hidden_states=c["prompt_embeds"], return_dict=False)[0]
        else:  # DDIM's scale_model_input is the identity; both branches train (DanceGRPO train_grpo_sd.py:611-622)
            eps = net(torch.cat([x, x]), torch.cat([t, t]), return_dict=False,
                      encoder_hidden_states=torch.cat([c["negative_prompt_embeds"], c["prompt_embeds"]]))[0]
            uncond, text = eps.float().chunk(2)
            return uncond + guidance_scale * (text - uncond)
    elif family == "sd35":  # StableDiffusion3Pipeline passes the scheduler's timestep sigma * 1000
        # Flow-GRPO trains through the conditional branch only: noise_pred_uncond.detach() (scripts/train_sd3.py:190)
        return _guided(lambda x, t, prompt_embeds, pooled_prompt_embeds: net(
            hidden_states=x, timestep=t * 1000, encoder_hidden_states=prompt_embeds,  # x: [B, 16, h, w]
            pooled_projections=pooled_prompt_embeds, return_dict=False)[0],
            x, t.float(), c, ("prompt_embeds", "pooled_prompt_embeds"), guidance_scale, detach_uncond=True)
    elif family == "wan":  # WanPipeline passes the scheduler's timestep sigma * 1000
        # both branches keep their gradient, as DanceGRPO's grpo_one_step (train_grpo_wan_2_1.py:238-248)
        return _guided(lambda x, t, prompt_embeds: net(hidden_states=x, timestep=t * 1000,  # x: [B, C, f, h, w]
                                                       encoder_hidden_states=prompt_embeds, return_dict=False)[0],
                       x, t.float(), c, ("prompt_embeds",), guidance_scale)
    elif family == "qwenimage":  # QwenImagePipeline passes t / 1000 = sigma; no guidance embedding, no CFG
        h, w = _flux_packed_hw(pipe, height, width)
        mask = c["prompt_embeds_mask"]
        if (pad := -c["prompt_embeds"].shape[1] % _context_parallel_degree(net)):  # --context_parallel: text tokens
            c["prompt_embeds"] = torch.nn.functional.pad(c["prompt_embeds"], (0, 0, 0, pad))  # split evenly, the
            mask = torch.nn.functional.pad(mask, (0, pad))  # padding masked out of the attention: the same velocity
        out = net(hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=c["prompt_embeds"],  # x: [B, L, 4C]
                  encoder_hidden_states_mask=None if mask.all() else mask,  # the pipeline drops an all-ones mask
                  img_shapes=[[(1, h // 2, w // 2)]] * B, guidance=None, return_dict=False)[0]
    elif family == "hunyuan":
        out = net(hidden_states=x,  # [B, C, f, h, w]
                  timestep=(t * 1000).float(),  # HunyuanVideoPipeline passes the fp32 scheduler timestep sigma*1000
                  encoder_hidden_states=c["prompt_embeds"], encoder_attention_mask=c["prompt_attention_mask"],
                  pooled_projections=c["pooled_prompt_embeds"],
                  guidance=torch.full([B], guidance_scale * 1000.0, device=x.device, dtype=dtype),
                  return_dict=False)[0]
    else:  # skyreels: [noise latents, first-frame latents] on channels; cond and uncond (empty prompt) batched
        xi = torch.cat([x, extra["image_latents"].to(dtype)], dim=1)  # [B, 2C, f, h, w]
        out = net(hidden_states=torch.cat([xi, xi]), timestep=(torch.cat([t, t]) * 1000).float(),
                  encoder_hidden_states=torch.cat([c["prompt_embeds"], c["negative_prompt_embeds"]]),
                  encoder_attention_mask=torch.cat([c["prompt_attention_mask"],
                                                    c["negative_prompt_attention_mask"]]),
                  pooled_projections=torch.cat([c["pooled_prompt_embeds"], c["negative_pooled_prompt_embeds"]]),
                  guidance=torch.full([2 * B], SKYREELS_EMBEDDED_GUIDANCE * 1000.0, device=x.device, dtype=dtype),
                  return_dict=False)[0]
        text, uncond = out.float().chunk(2)
        return uncond + guidance_scale * (text - uncond)
    return out.float()


def _guided(call, x, t, cond, keys, guidance_scale, detach_uncond=False):
    """Classifier-free guidance, uncond + s * (cond - uncond) in float32, the two branches batched in one call
    (the pipelines make one batched call too, Wan two; the official Wan GRPO one). The unconditional branch reads
    the `negative_<key>` entries of cond; guidance_scale 1 is a single conditional call. call(x, t, **cond).
    detach_uncond: no gradient through the unconditional branch (same value), so d out = s d cond."""
    if guidance_scale == 1.0:
        return call(x, t, **{k: cond[k] for k in keys}).float()
    out = call(torch.cat([x, x]), torch.cat([t, t]), **{k: torch.cat([cond[k], cond["negative_" + k]]) for k in keys})
    text, uncond = out.float().chunk(2)
    uncond = uncond.detach() if detach_uncond else uncond
    return uncond + guidance_scale * (text - uncond)


def ddim_schedule(pipe, num_steps):
    """SD's DDIM schedule: timesteps LongTensor[T] (descending) and alpha_bars Tensor[T + 1] with
    alpha_bars[i] = alphas_cumprod[timesteps[i]] and alpha_bars[T] = final_alpha_cumprod, so step i goes from
    alpha_bars[i] to alpha_bars[i + 1] (DDIMScheduler.step's prev_timestep = t - 1000 // T)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # a copy: set_timesteps mutates the scheduler
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long()  # [T]
    alpha_bars = torch.cat([scheduler.alphas_cumprod[timesteps], scheduler.final_alpha_cumprod.reshape(1)])
    return timesteps, alpha_bars.float()


def flow_schedule(pipe, num_steps):
    """The sigmas Tensor[T + 1] a flow pipeline samples with by itself: its FlowMatchEulerDiscreteScheduler's
    set_timesteps(T) with no sigmas given, as StableDiffusion3Pipeline's retrieve_timesteps and Flow-GRPO's rollout
    (yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py:119-127, sigmas=None) call it:

      sigma_min = shift(1 / N)              the scheduler's smallest training sigma (N = num_train_timesteps)
      t = linspace(1, sigma_min, T), sigma = shift(t) = s t / (1 + (s - 1) t), then a trailing 0

    (diffusers scheduling_flow_match_euler_discrete.py, __init__ and set_timesteps). This is not
    sde.flow_sigmas(T, s), the shift of linspace(1, 0, T + 1): SD3.5-M (s = 3, N = 1000) at T = 10 ends its last
    step at sigma 0.0089 where flow_sigmas has 0.25. Only for schedulers without resolution-dependent shifting
    (SD3.5, Wan as loaded here); the network's timestep is sigma (predict multiplies by 1000 where the pipeline does).
    """
    scheduler = pipe.scheduler
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.use_dynamic_shifting:
        shifting = scheduler.config.get("use_dynamic_shifting")
        raise ValueError(f"flow_schedule needs a FlowMatchEulerDiscreteScheduler without dynamic shifting, got "
                         f"{type(scheduler).__name__} (use_dynamic_shifting={shifting})")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # a copy: set_timesteps mutates it
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float()  # [T + 1], 1 -> 0


@torch.no_grad()
def decode(pipe, latents, height, width):
    """Clean latents (step layout) -> images [B, 3, H, W] or videos [B, T, 3, H, W], float in [0, 1]."""
    family, vae = _family(pipe), pipe.vae
    if family == "flux":
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [B, C, h, w]
        if vae is None:  # tiny-digits: the latents are the grey pixels in [-1, 1]
            return pipe.image_processor.postprocess(z.float(), output_type="pt").float().repeat(1, 3, 1, 1)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
    elif family == "sd":
        z = latents / vae.config.scaling_factor
    elif family == "sd35":
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
    elif family == "qwenimage":  # unpack to [B, C, 1, h, w], per-channel statistics, frame 0 of the decoded video
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        z = z * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(shape)
        image = vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0][:, :, 0]  # [B, 3, H, W] in [-1, 1]
        return pipe.image_processor.postprocess(image, output_type="pt").float()
    elif family == "wan":  # per-channel statistics, as WanPipeline: z * std + mean
        shape = (1, vae.config.z_dim, 1, 1, 1)
        z = latents * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(shape)
        video = vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]  # [B, 3, T, H, W] in [-1, 1]
        return pipe.video_processor.postprocess_video(video, output_type="pt").float()
    else:
        z = latents / vae.config.scaling_factor  # [B, C, f, h, w]
        video = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, T, H, W] in [-1, 1]
        return pipe.video_processor.postprocess_video(video, output_type="pt").float()
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
    return pipe.image_processor.postprocess(image, output_type="pt").float()


# ----------------------------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------------------------

# Read off the official DanceGRPO launch scripts (XueZeyue/DanceGRPO at 15cc71d; the README's table maps each
# script to the command here). prompts_per_rank: prompts a rank rolls out per iteration (--train_batch_size);
# grad_accum: samples per optimizer step on each rank (--gradient_accumulation_steps, batch 1 per step);
# micro_batch: (sample, timestep) pairs per forward/backward (the official code uses 1); keep: best-of-N survivors
# per group; size_multiple: VAE downsampling x patch size; ema_decay 0 = no EMA; keep_checkpoints 0 = all.
_DEFAULTS = {
    # scripts/finetune/finetune_flux_grpo_8gpus.sh: --train_batch_size 2 (l.26), --gradient_accumulation_steps 12
    # (l.31), --max_train_steps 300 (l.32), --learning_rate 1e-5 (l.33), --checkpointing_steps 40 (l.35), --h/--w 720
    # (l.39-40), --sampling_steps 16 (l.42), --eta 0.3 (l.43), --max_grad_norm 0.01 (l.46), --weight_decay 1e-4
    # (l.47), --num_generations 12 (l.49), --shift 3 (l.50), --timestep_fraction 0.6 (l.53), --clip_range 1e-4,
    # --adv_clip_max 5.0 (l.54-55), --use_ema --ema_decay 0.995 (l.56-57); guidance 3.5 (train_grpo_flux.py l.239)
    "flux": dict(num_steps=16, shift=3.0, eta=0.3, guidance_scale=3.5, height=720, width=720, size_multiple=16,
                 group_size=12, prompts_per_rank=2, timestep_fraction=0.6, lr=1e-5, iterations=300, grad_accum=12,
                 micro_batch=4, max_grad_norm=0.01, ema_decay=0.995, checkpoint_every=40, keep_checkpoints=2,
                 reward="hps"),
    # fastvideo/config_sd/dgx.py hpsv2() over compressibility() and base.py: num_epochs 300 (l.40), save_freq 50
    # (l.14), sample.batch_size 4 prompts (l.47) x num_generations 16 (l.53) = 64 samples a rank, train.batch_size 4
    # x gradient_accumulation_steps 8 (l.44, l.50) = 32 samples per optimizer step; base.py: 50 steps, eta 1.0,
    # CFG 5.0 (l.45-50), lr 1e-5 (l.64), max_grad_norm 1.0 (l.77), adv_clip_max 5, clip_range 1e-4,
    # timestep_fraction 1.0 (l.85-90)
    "sd14": dict(num_steps=50, shift=None, eta=1.0, guidance_scale=5.0, height=512, width=512, size_multiple=8,
                 group_size=16, prompts_per_rank=4, timestep_fraction=1.0, lr=1e-5, iterations=300, grad_accum=32,
                 micro_batch=8, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=50, keep_checkpoints=2,
                 reward="hps"),
    # scripts/finetune/finetune_hunyuan_grpo.sh: --train_batch_size 1 (l.26), --gradient_accumulation_steps 4 (l.30),
    # --max_train_steps 202 (l.31), --checkpointing_steps 50 (l.34), --checkpoints_total_limit 3 (l.37),
    # --h/--w 480 --t 53 (l.45-47), --sampling_steps 16 --eta 0.25 (l.48-49), --max_grad_norm 1.0 (l.53),
    # --num_generations 24 (l.55), --shift 5 (l.56), --timestep_fraction 0.6 (l.59), --bestofn 8 (l.61),
    # --vq_coef 1.0 --mq_coef 0.0 (l.62-63); guidance 6018 = 6.018 x 1000 (train_grpo_hunyuan.py). It parses
    # --ema_decay 0.999 (l.41) but never applies it, so EMA is off here too (--ema_decay 0.999 turns it on).
    "hunyuan": dict(num_steps=16, shift=5.0, eta=0.25, guidance_scale=6.018, height=480, width=480, num_frames=53,
                    size_multiple=16, group_size=24, keep=8, prompts_per_rank=1, timestep_fraction=0.6, lr=1e-5,
                    iterations=202, grad_accum=4, micro_batch=1, rollout_batch=8, max_grad_norm=1.0, ema_decay=0.0,
                    checkpoint_every=50, keep_checkpoints=3, reward="videoalign_vq"),
    # scripts/finetune/finetune_skyreels_i2v.sh: --train_batch_size 1 (l.26), --gradient_accumulation_steps 8 (l.30),
    # --max_train_steps 121 (l.31), --checkpointing_steps 40 (l.34), --checkpoints_total_limit 3 (l.36),
    # --h 400 --w 640 --t 53 (l.41-43), --sampling_steps 16 --eta 0.3 (l.44-45), --max_grad_norm 1.0 (l.49),
    # --num_generations 8 (l.51), --cfg_infer 5.0 (l.52), --shift 7 (l.53), --timestep_fraction 0.6 (l.55)
    "skyreels": dict(num_steps=16, shift=7.0, eta=0.3, guidance_scale=5.0, height=400, width=640, num_frames=53,
                     size_multiple=16, group_size=8, keep=None, prompts_per_rank=1, timestep_fraction=0.6, lr=1e-5,
                     iterations=121, grad_accum=8, micro_batch=1, max_grad_norm=1.0, ema_decay=0.0,
                     checkpoint_every=40, keep_checkpoints=3, reward="videoalign_mq"),
    # Flow-GRPO's pickscore_sd3 (yifan123/flow_grpo config/grpo.py:106-140 on config/base.py; scripts/train_sd3.py):
    # 10 steps (:113), CFG 4.5 (:115) also in training (base.py:82), 512 px (:117), 24 images a prompt (:119),
    # 48 prompts an epoch (:120) -> on 8 ranks 6 prompts a rank; two optimizer steps an epoch (:125), LoRA r 32 /
    # alpha 64 (train_sd3.py:430-431) with lr 3e-4 (base.py:63; the LoRA rate below), train batch 9 (:124), grad
    # norm 1.0 (base.py:76), checkpoint every 60 (:131), 5 kept (base.py:19).
    # timestep_fraction 0.99 of 10 steps trains steps 0-8 there (train_sd3.py:345): all T-1 trainable steps here.
    # Flow-GRPO's SDE (sde.flow_grpo_etas) at noise level 0.7 (base.py:54) on the scheduler's own sigmas
    # (models.flow_schedule), independent initial noise per image (train_sd3.py:639-651 passes no latents), KL beta
    # 0.01 (:128) as its kl_loss (grpo.kl_penalty), evaluation with 40 steps at noise 0 (:114). deviation: its
    # global std and EMA (0.9 every 8 steps, train_sd3.py:445) are not used. PickScore (:135). lr 1e-5: --lora_rank 0.
    "sd35": dict(num_steps=10, shift=3.0, sde="flow_grpo", eta=0.7, same_noise=False, kl_coef=0.01, eval_num_steps=40,
                 guidance_scale=4.5, height=512, width=512, size_multiple=16,
                 group_size=24, prompts_per_rank=6, timestep_fraction=1.0, lr=1e-5, lora_rank=32, iterations=1000,
                 grad_accum=72, micro_batch=9, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=60, keep_checkpoints=5,
                 reward="pickscore"),
    # finetune_wan_2_1_grpo.sh (line numbers there): single frames (--t 1, :39) at 512 x 512 (:37-38), 20 steps
    # (:40), eta 0.3 (:41), shift 3 (:48), 12 samples a prompt (:47) sharing their noise (:52), 2 prompts a rank
    # (:24), one optimizer step per 24 samples (:29), lr 1e-5 (:31), 1000 steps (:30), checkpoint every 200 (:33),
    # grad norm 1.0 (:44), fraction 0.6 (:51), HPS-v2.1 (:46) on the first frame (train_grpo_wan_2_1.py:353-365), CFG 5 in rollout and
    # training (--cfg_infer 5.0, :55; train_grpo_wan_2_1.py:195-205, 238-248); EMA parsed, never applied.
    "wan": dict(num_steps=20, shift=3.0, eta=0.3, guidance_scale=5.0, height=512, width=512, num_frames=1,
                size_multiple=16, group_size=12, prompts_per_rank=2, keep=None, timestep_fraction=0.6, lr=1e-5,
                iterations=1000, grad_accum=24, micro_batch=4, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=200,
                keep_checkpoints=2, reward="hps"),
    # finetune_qwenimage_grpo.sh (line numbers there): 720 x 720 (:38-39), 20 steps (:41), eta 0.3 (:42), shift 3
    # (:49), 12 samples a prompt (:48) sharing their noise (:53), 2 prompts a rank (:25), one optimizer step per 12
    # samples (:30), lr 1e-5 (:32), 300 steps (:31), checkpoint every 60 (:34), grad norm 1.0 (:45), fraction 0.6
    # (:52), HPS-v2.1 (:47);
    # no CFG and no guidance embedding (train_grpo_qwenimage.py:222-233; its --cfg 0.0, :36, is the caption-dropout
    # rate, latent_qwenimage_rl_datasets.py:51), no EMA (no --use_ema).
    "qwenimage": dict(num_steps=20, shift=3.0, eta=0.3, guidance_scale=1.0, height=720, width=720, size_multiple=16,
                      group_size=12, prompts_per_rank=2, timestep_fraction=0.6, lr=1e-5, iterations=300, grad_accum=12,
                      micro_batch=4, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=60, keep_checkpoints=2,
                      reward="hps"),
}
# LoRA (--lora_rank > 0) on a real model. FLUX: scripts/finetune/finetune_flux_grpo_8gpus_lora.sh, the 8-GPU script's
# settings but --max_train_steps 301 (l.32), --learning_rate 3e-4 (l.33), --checkpointing_steps 60 (l.35),
# --sampling_steps 12 (l.42), --max_grad_norm 1.0 (l.46), no EMA, --lora_alpha 256 --lora_rank 128 (l.57-58).
# The other models have no official LoRA script: lr 3e-4 (DDPO's LoRA rate), alpha = 2 x rank.
_LORA_DEFAULTS = {
    "flux": dict(num_steps=12, lr=3e-4, max_grad_norm=1.0, ema_decay=0.0, iterations=301, checkpoint_every=60,
                 lora_alpha=256.0),
}
# Tiny presets: the same sampler settings, small sizes, and enough samples per update (one update per
# iteration) for a CPU demo to learn visibly in a few minutes. With LoRA they take a larger rate.
_TINY_DEFAULTS = dict(num_steps=8, height=32, width=32, group_size=8, prompts_per_rank=4, lr=3e-3, iterations=40,
                      grad_accum=32, micro_batch=32, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=None,
                      keep_checkpoints=2, reward="brightness")
_TINY_LORA_LR = 3e-2
# tiny-digits (digits.py): the DanceGRPO flow SDE at Flow-GRPO's noise level 0.7 (eta here), 10 steps, shift 3,
# 4 prompts x 8 samples (one update per iteration), timestep fraction 0.6, lr 3e-4, the `digit` reward (--target_digit).
# KL 0.8 as Flow-GRPO's kl_loss (grpo.kl_penalty): without it GRPO finds an off-manifold 3 (reward hacking).
_DIGITS_DEFAULTS = dict(num_steps=10, shift=3.0, sde="dance", eta=0.7, same_noise=True, kl_coef=0.8, guidance_scale=1.0,
                        height=8, width=8, size_multiple=2, group_size=8, prompts_per_rank=4, timestep_fraction=0.6, lr=3e-4, iterations=80, grad_accum=32,
                        micro_batch=160, max_grad_norm=1.0, ema_decay=0.0, checkpoint_every=None, keep_checkpoints=2,
                        reward="digit", eval_every=10, eval_reward="digit_judge")  # held-out: the judge's fraction


def check_sampler(model, sde, guidance_scale) -> str | None:
    """One line where a model cannot sample as asked, or None."""
    if sde == "flow_grpo" and FAMILY[model] == "sd":
        return "--sde flow_grpo is a flow SDE; Stable Diffusion v1.4 samples with the DDIM SDE"
    if FAMILY[model] == "qwenimage" and guidance_scale != 1:
        return ("--guidance_scale: Qwen-Image trains without CFG (the official --cfg 0.0 is a caption-dropout rate, "
                "latent_qwenimage_rl_datasets.py:51); QwenImagePipeline's true CFG with its norm rescale is not built")
    return None


def model_defaults(model, lora=False):
    """Official defaults for a real name (with its LoRA script's where `lora`); small CPU-friendly values (same
    sampler settings) for a tiny preset. checkpoint_every None: at the end only. lora None: the model's own choice
    (LoRA rank 32 for sd35, as Flow-GRPO; a full fine-tune otherwise), given as `lora_rank`."""
    family = FAMILY[model]
    if model == "tiny-digits":
        return dict(_DIGITS_DEFAULTS, lora_rank=0, **({"lr": 3e-3} if lora else {}))  # LoRA: 10x, as the other tiny
    real = "sd14" if family == "sd" else family  # _DEFAULTS is keyed by the real model's name
    d = {"sde": None if family == "sd" else "dance", "same_noise": True, "kl_coef": 0.0, "eval_every": 0,
         **_DEFAULTS[real]}
    if lora is None:
        lora = model not in TINY and d.get("lora_rank", 0) > 0
    d["lora_rank"] = d.get("lora_rank", 0) if lora else 0
    if lora:
        d.update({"lr": 3e-4, **_LORA_DEFAULTS.get(real, {})})
    if model in TINY:  # tiny VAEs downsample 2x (FLUX, SD3.5, Qwen-Image) or 4x; SD's tiny UNet halves once more
        d.update(_TINY_DEFAULTS, size_multiple={"flux": 4, "sd": 8, "hunyuan": 8, "skyreels": 8, "sd35": 4, "wan": 8,
                                                "qwenimage": 4}[family])
        d.pop("lora_alpha", None)
        if family in ("hunyuan", "skyreels"):
            d.update(num_frames=9, keep=4 if family == "hunyuan" else None)
        if family == "skyreels":  # CFG 5 magnifies a weight change in the guided velocity: 3e-3 overshoots
            d.update(lr=5e-4)
        if lora:
            d.update(lr=_TINY_LORA_LR if family != "skyreels" else _TINY_LORA_LR / 6)
    return d


# ----------------------------------------------------------------------------- context parallelism (diffusers')

# The trained classes whose diffusers implementation has a context-parallel plan (`_cp_plan`, diffusers 0.42): which
# inputs are split over the sequence and where the output is gathered. The others have none.
CONTEXT_PARALLEL = {"flux": True, "qwenimage": True, "wan": True, "sd": False, "sd35": False, "hunyuan": False,
                    "skyreels": False}
TRAINED_CLASSES = {"flux": "FluxTransformer2DModel", "qwenimage": "QwenImageTransformer2DModel",
                   "wan": "WanTransformer3DModel", "sd": "UNet2DConditionModel", "sd35": "SD3Transformer2DModel",
                   "hunyuan": "HunyuanVideoTransformer3DModel", "skyreels": "HunyuanVideoTransformer3DModel"}


def add_parallel_args(parser):
    """The train scripts' --context_parallel."""
    parser.add_argument("--context_parallel", type=int, default=1,
                        help="split each sample's tokens over N ranks (diffusers' Ulysses attention; FLUX, Qwen-Image, "
                             "Wan): the ranks form a (data parallel x N) mesh, N ranks per sample (default 1: off)")


def check_context_parallel(args) -> str | None:
    """One line where --context_parallel cannot split this run's tokens, or None. The heads (Ulysses splits them
    too) and a plain python run are checked where the network is (context_parallel)."""
    n, family = args.context_parallel, FAMILY[args.model]
    if n < 1:
        return f"--context_parallel must be >= 1, got {n}"
    if n == 1:
        return None
    if not CONTEXT_PARALLEL[family]:
        import diffusers
        return (f"--context_parallel: {args.model}'s {TRAINED_CLASSES[family]} has no context-parallel plan in "
                f"diffusers {diffusers.__version__} (FLUX, Qwen-Image and Wan have one); run it with --context_parallel 1")
    world = int(os.environ.get("WORLD_SIZE", 0))  # torchrun's; checked again where the network is (bench.py --nproc)
    if world and world % n:
        return f"--context_parallel {n} must divide the number of ranks, {world}"
    m, frames = args.size_multiple, (getattr(args, "num_frames", None) or 1) if family == "wan" else 1
    tokens = (args.height // m) * (args.width // m) * ((frames - 1) // 4 + 1)  # a sample's latent tokens
    if tokens % n:
        return (f"--context_parallel {n} must divide a sample's {tokens} latent tokens ({args.height}x{args.width}"
                f"{f', {frames} frames' if family == 'wan' else ''}): diffusers splits them in equal parts")
    text = {"tiny-digits": DIGITS_TEXT[0], "flux": FLUX_TEXT_LEN}.get(args.model, TINY_TEXT_LEN)  # FLUX splits its text
    if family == "flux" and text % n:  # too (Qwen-Image's is padded in predict, Wan's is not split)
        return f"--context_parallel {n} must divide FLUX's {text} text tokens: diffusers splits them in equal parts"
    return None


def data_parallel(context_parallel=1) -> tuple[int, int]:
    """(rank, world) among the data-parallel ranks: ranks d N ... d N + N - 1 form one context-parallel group (the
    (dp, cp) mesh in row-major order), which rolls out, scores and trains the same samples."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank() // context_parallel, dist.get_world_size() // context_parallel


def context_parallel(net, n, device):
    """--context_parallel N > 1: diffusers' own context parallelism on the (FSDP2-sharded) network, Ulysses attention
    over the N ranks of each group of a (data parallel, ring 1, ulysses N) device mesh: the plan splits each sample's
    tokens at the network's input, each rank runs the blocks on its share, attention exchanges heads for tokens
    (all-to-all) and the output is gathered whole on every rank of the group. FSDP2 shards over all ranks and
    averages the gradient over them; a rank of a group holds only its tokens' part of the gradient, so the group's
    sum is the sample's: the reduction divides by the data-parallel ranks alone."""
    if n == 1:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % n:
        raise SystemExit(f"error: --context_parallel {n} needs torchrun with a multiple of {n} ranks; this run has {world}")
    if net.config.num_attention_heads % n:
        raise SystemExit(f"error: --context_parallel {n} must divide the {net.config.num_attention_heads} attention "
                         "heads (Ulysses attention splits them over the group)")
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from unittest import mock
    mesh = init_device_mesh("cuda" if device.type == "cuda" else "cpu", (world // n, 1, n),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    # diffusers records a device, rank % torch.accelerator.device_count(), which is 0 on a CPU-only machine (it uses
    # it nowhere else): one accelerator is reported there while it is built
    cpu_only = mock.patch.object(torch.accelerator, "device_count", lambda: 1) if not torch.accelerator.device_count() \
        else contextlib.nullcontext()
    with cpu_only:
        net.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n, mesh=mesh))
    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(world // n)
            module.set_force_sum_reduction_for_comms(True)  # sum, then divide: the same on gloo and NCCL


def _context_parallel_degree(net) -> int:
    """N of --context_parallel N on this network (1: off)."""
    config = getattr(net, "_parallel_config", None)
    return config.context_parallel_config.ulysses_degree if config and config.context_parallel_config else 1
