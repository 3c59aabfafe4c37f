"""Every reward of DanceGRPO by name, one line per reward for the train scripts.

    scorer = REWARDS[name](device)          # resolves the weights now, loads them on first call
    scores = scorer(x, prompts)             # x: images [B,3,H,W] or videos [B,T,3,H,W] in [0, 1]
                                            # scores: float32 Tensor[B] on x.device

| name | model | weights: argument `path`, else env var, else the local Hugging Face cache of | score |
|---|---|---|---|
| hps | HPS-v2.1 (OpenCLIP ViT-H-14) | DANCEGRPO_HPS_CKPT: xswu/HPSv2 HPS_v2.1_compressed.pt | cosine, ~0.2-0.4 |
| clip | DFN5B-CLIP-ViT-H-14-378 (the authors' CLIP score) | DANCEGRPO_CLIP_PATH: apple/DFN5B-CLIP-ViT-H-14-378 | cosine, ~0.3-0.4 |
| pickscore | PickScore v1 (CLIP ViT-H-14) | DANCEGRPO_PICKSCORE_PATH: yuvalkirstain/PickScore_v1 | 100 x cosine, ~18-23 |
| videoalign_vq/_mq/_ta | VideoReward (Qwen2-VL-2B + reward head) | DANCEGRPO_VIDEOALIGN_PATH: KwaiVGI/VideoReward; | z-scored, see below |
| | | DANCEGRPO_QWEN2VL_PATH: Qwen/Qwen2-VL-2B-Instruct (config, tokenizer) | |
| hpsv3 | HPSv3 (Qwen2-VL-7B + MLP head) | DANCEGRPO_HPSV3_PATH: MizzenAI/HPSv3 HPSv3.safetensors; | mu of (mu, sigma), see below |
| | | DANCEGRPO_HPSV3_BASE: Qwen/Qwen2-VL-7B-Instruct (config, tokenizer) | |
| brightness | none: mean Rec. 601 luma | - | [0, 1] |
| jpeg_compressibility | none: -(JPEG size in kB at quality 95), as DDPO | - | negative kB |
| digit | logistic regression on load_digits (digits.py), fitted in code | - (scikit-learn's bundled data) | P(target), [0, 1] |
| digit_judge | RBF SVM on load_digits (digits.py), for evaluation only | - | 1 if judged the target, else 0 |

The digit rewards score the target digit (build_scorers' target_digit, --target_digit; default 3) on the image
turned grey (mean over channels) and area-averaged to 8x8 (digits.features); `digit@0.5` is the binary reward.

The CLIP-family rewards take the OpenAI CLIP BPE tokenizer (context 77) from the model folder when
it has one, else from DANCEGRPO_CLIP_TOKENIZER: laion/CLIP-ViT-H-14-laion2B-s32B-b79K. `clip` reads
either a transformers CLIPModel folder or an OpenCLIP folder (open_clip_config.json + weights);
OpenCLIP weights, HPS included, are converted to transformers' CLIPModel, so open_clip (and the
torchvision it needs) is not required. Nothing is downloaded here: without a local copy,
constructing a reward fails at once naming the variable to set (or `hf download <repo>` once).
VideoAlign reports (raw - mean) / std with the mean/std of its model_config.json
(VQ 3.6757/2.2476, MQ 1.1646/1.3811, TA 2.8105/2.5121), as the official wrapper with use_norm=True;
like the released model's own forward it runs Qwen2-VL with plain positions 0..L-1 (no M-RoPE).
HPSv3 reports mu, the first of its head's (mu, sigma) at <|Reward|>, on the image resized to
256*28*28 pixels, as its inference.py and DanceGRPO's scripts ([:, 0]); plain positions too.
A reward model that errors raises; a non-finite score raises FloatingPointError. build_scorers(timeout=,
retries=) bounds both for the train scripts (guarded): a reward that keeps failing, or hangs past the timeout,
stops the run with one line naming it; constant_warning tells the terminal when a reward stopped telling samples apart.
deviation: preprocessing runs in torch on the device (bicubic with antialias on the 8-bit-rounded
input) instead of PIL images and mp4 files written to disk; the numbers differ by resampling and
video-codec noise only. Models run in float32 (VideoAlign, HPSv3: bfloat16 on GPU) with LoRA merged into
the weights, outside the training autocast (the official FLUX script runs HPS under fp16 autocast). Image rewards score a video as the mean over its frames (an extension).
"""

import functools
import glob
import io
import json
import math
import os
import re
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP; also Qwen2-VL's image mean/std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_H_14 = {  # open_clip's ViT-H-14.json, the architecture of the HPS-v2.1 checkpoint
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def _weights(path, env, hub_id, filename=None):
    """Local path of a reward's weights: the argument, else $env, else the local Hugging Face cache."""
    path = path or os.environ.get(env)
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (the path argument or ${env}) does not exist")
        return path
    from huggingface_hub import hf_hub_download, snapshot_download
    try:  # local_files_only: no network retries, fails in well under a second
        if filename:
            return hf_hub_download(hub_id, filename, local_files_only=True)
        return snapshot_download(hub_id, local_files_only=True)
    except Exception as e:
        what = f"{hub_id} {filename or ''}".strip()
        raise FileNotFoundError(f"weights {what} not found locally: set {env}=/local/path "
                                f"(or run `hf download {what}` once)") from e


def _u8(x):
    return (x.clamp(0, 1) * 255).round() / 255  # the official scorers see 8-bit images


# ---------------------------------------------------------------- CLIP family: hps, clip, pickscore

_OPEN_CLIP_PREFIXES = {  # OpenCLIP name -> transformers CLIPModel name
    "visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers.",
    "visual.conv1.": "vision_model.embeddings.patch_embedding.", "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm.",
    "visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight",
    "token_embedding.": "text_model.embeddings.token_embedding.", "ln_final.": "text_model.final_layer_norm.",
    "positional_embedding": "text_model.embeddings.position_embedding.weight", "logit_scale": "logit_scale",
}
_OPEN_CLIP_BLOCK = {".ln_1.": ".layer_norm1.", ".ln_2.": ".layer_norm2.", ".attn.out_proj.": ".self_attn.out_proj.",
                    ".mlp.c_fc.": ".mlp.fc1.", ".mlp.c_proj.": ".mlp.fc2."}


def open_clip_to_transformers(state_dict):
    """OpenCLIP CLIP state dict -> transformers CLIPModel state dict: the same weights, renamed.

    OpenCLIP packs q, k, v in one `in_proj_weight` and multiplies by `proj` from the right;
    transformers has separate q/k/v Linears and stores projections as Linear weights (transposed).
    """
    out = {}
    for key, w in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn_mask"):
            continue  # the causal mask buffer; transformers builds its own
        if key in ("visual.proj", "text_projection"):
            w = w.t()  # [width, embed] -> Linear weight [embed, width]
        old = next((p for p in _OPEN_CLIP_PREFIXES if key.startswith(p)), None)
        if old is None:
            raise KeyError(f"not an OpenCLIP CLIP key: {key}")
        key = _OPEN_CLIP_PREFIXES[old] + key[len(old):]
        for old, new in _OPEN_CLIP_BLOCK.items():
            key = key.replace(old, new)
        if ".attn.in_proj_" in key:  # [3 * width, ...] -> q, k, v
            block, kind = key.split(".attn.in_proj_")
            for name, part in zip("qkv", w.chunk(3)):
                out[f"{block}.self_attn.{name}_proj.{kind}"] = part
        else:
            out[key] = w
    return out


def _clip_model_from_open_clip(state_dict, cfg, eos_token_id):
    from transformers import CLIPConfig, CLIPModel
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    config = CLIPConfig(projection_dim=cfg["embed_dim"], text_config=dict(
        vocab_size=t["vocab_size"], hidden_size=t["width"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        max_position_embeddings=t["context_length"], hidden_act=act, eos_token_id=eos_token_id,
    ), vision_config=dict(
        hidden_size=v["width"], num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
        intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)), image_size=v["image_size"],
        patch_size=v["patch_size"], hidden_act=act,
    ))
    model = CLIPModel(config)
    model.load_state_dict(open_clip_to_transformers(state_dict), strict=True)
    return model


@functools.lru_cache(maxsize=None)
def _load_clip(path, tokenizer_path, device):
    """(model, tokenizer, resize mode) from a transformers folder, an OpenCLIP folder or a bare .pt."""
    from transformers import CLIPModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        model = CLIPModel.from_pretrained(path, local_files_only=True)  # float32 whatever the folder stores
        return model.float().to(device).eval(), tokenizer, "shortest"
    cfg_file = os.path.join(os.path.dirname(path) if os.path.isfile(path) else path, "open_clip_config.json")
    cfg = json.load(open(cfg_file)) if os.path.exists(cfg_file) else {"model_cfg": VIT_H_14}
    if os.path.isdir(path):
        path = next(p for p in glob.glob(os.path.join(path, "open_clip_*")) if not p.endswith(".json"))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("state_dict", state_dict)  # HPS checkpoints wrap it
    model = _clip_model_from_open_clip(state_dict, cfg["model_cfg"], tokenizer.eos_token_id)
    return model.float().to(device).eval(), tokenizer, cfg.get("preprocess_cfg", {}).get("resize_mode", "shortest")


def clip_pixels(x, size, mode):
    """[N,3,H,W] in [0,1] -> normalised [N,3,size,size], the three resize modes CLIP scorers use.

    shortest: short side to `size`, center crop (CLIPImageProcessor, open_clip default);
    longest: long side to `size`, zero-pad to a square (open_clip ResizeMaxSize, HPS-v2's eval);
    squash: resize both sides to `size` (DFN5B's open_clip preprocess_cfg).
    HPS-v2's eval transform turns the image into a float tensor before ResizeMaxSize, so its bicubic
    overshoot is kept; the others resize 8-bit images (PIL), which clamps to [0, 1].
    """
    x = _u8(x)
    h, w = x.shape[-2:]
    if mode == "squash":
        new = (size, size)
    elif mode == "longest":
        new = (round(h * size / max(h, w)), round(w * size / max(h, w)))
    else:
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
        x = x if mode == "longest" else x.clamp(0, 1)
    if mode == "longest":  # pad with black, the left/top half rounded down
        ph, pw = size - new[0], size - new[1]
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2  # center crop; 0 unless "shortest"
    x = x[..., top:top + size, left:left + size]
    mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def _clip_reward(device, path, tokenizer, env, hub_id, filename=None, resize=None, scaled=False):
    """Scorer: cosine of the image and text embeddings (x logit_scale.exp() if scaled)."""
    path = _weights(path, env, hub_id, filename)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    has_tok = os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    tok_path = folder if has_tok and not tokenizer else _weights(tokenizer, "DANCEGRPO_CLIP_TOKENIZER", CLIP_TOKENIZER)
    device = torch.device(device)

    def score(images, prompts):
        model, tok, mode = _load_clip(path, tok_path, device)
        pixels = clip_pixels(images.to(device, torch.float32), model.config.vision_config.image_size, resize or mode)
        text = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").to(device)
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**text).pooler_output)
        cos = F.cosine_similarity(img, txt, dim=-1)  # HPS: diag(normalize(img) @ normalize(txt).T)
        return cos * model.logit_scale.exp() if scaled else cos
    return score


def hps(device, path=None, tokenizer=None):
    """HPS-v2.1: OpenCLIP ViT-H-14 fine-tuned on HPDv2; eval transform = ResizeMaxSize(224)."""
    return _clip_reward(device, path, tokenizer, "DANCEGRPO_HPS_CKPT", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "longest")


def clip(device, path=None, tokenizer=None):
    """CLIP score: image-text cosine; DanceGRPO used apple/DFN5B-CLIP-ViT-H-14-378 (issue #19)."""
    return _clip_reward(device, path, tokenizer, "DANCEGRPO_CLIP_PATH", "apple/DFN5B-CLIP-ViT-H-14-378")


def pickscore(device, path=None, tokenizer=None):
    """PickScore v1: logit_scale.exp() * cosine, processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    return _clip_reward(device, path, tokenizer, "DANCEGRPO_PICKSCORE_PATH", "yuvalkirstain/PickScore_v1", scaled=True)


# ---------------------------------------------------------------- offline rewards

def brightness(device=None):
    """Mean luma Y = 0.299 R + 0.587 G + 0.114 B (Rec. 601), in [0, 1]."""
    luma = torch.tensor([0.299, 0.587, 0.114])
    return lambda images, prompts: torch.einsum("nchw,c->n", images.float(), luma.to(images.device)) / images[0, 0].numel()


def jpeg_compressibility(device=None):
    """DDPO's jpeg_compressibility: minus the JPEG size in kB at quality 95 (smaller file = higher reward)."""
    from PIL import Image

    def score(images, prompts):
        sizes = []
        for img in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
            buffer = io.BytesIO()
            Image.fromarray(img).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes)
    return score


# ---------------------------------------------------------------- VideoAlign (VideoReward)

# The official "detailed_special" prompt (VideoAlign prompt_template.py), verbatim: it is model input.
VIDEOALIGN_PROMPT = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""
# Qwen2-VL's chat template rendered for one user turn (a video or an image, then text) with
# add_generation_prompt; {vision} is the <|video_pad|> or <|image_pad|> run the processor expands it to.
QWEN2VL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>{vision}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
VIDEOALIGN_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils


def videoalign_num_frames(total, src_fps, fps=2.0, nframes=None):
    """qwen-vl-utils smart_nframes: resample to `fps`, 4..768 frames, an even count (FRAME_FACTOR 2)."""
    if nframes:
        n = round(nframes / 2) * 2
    else:
        n = min(max(total / src_fps * fps, 4), math.floor(min(768, total) / 2) * 2)
        n = round(n / 2) * 2
    n = min(n, total)
    if n < 2:
        raise ValueError(f"VideoAlign needs at least 2 frames, got a video of {total}")
    return n


def videoalign_size(h, w, max_pixels, min_pixels=VIDEO_MIN_PIXELS, factor=28):
    """qwen-vl-utils smart_resize: sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def qwen2vl_patches(frames, patch=14, temporal=2, merge=2):
    """Normalised [T,3,H,W] -> (pixel_values_videos [T/2 * H/14 * W/14, 3*2*14*14], (t, h, w) grid).

    The Qwen2-VL processor's layout: patches ordered by (time, merged row, merged col, row, col).
    """
    if frames.shape[0] % temporal:  # repeat the last frame, as the processor does
        frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, m, m, c, temporal, p, p
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


def qwen2vl_pixels(x, size):
    """8-bit [N,3,H,W] in [0,1] -> resized to `size` (bicubic, 8-bit again) and normalised as Qwen2-VL's processor."""
    if tuple(size) != tuple(x.shape[-2:]):
        x = _u8(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False))
    mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def videoalign_state_dict(state_dict, lora_scale):
    """The released checkpoint (a PEFT-wrapped Qwen2VLRewardModelBT, transformers-4.4x names) ->
    Qwen2VLModel keys plus `rm_head.*`, with each LoRA merged: W = W0 + scale * B @ A. Also reads
    HPSv3's (no LoRA; either transformers layout)."""
    out, lora = {}, {}
    for key, w in state_dict.items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            lora[key] = w
            continue
        if ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if key.startswith("model.visual.") or key.startswith("model.language_model."):
            key = key.removeprefix("model.")  # already the new layout
        elif key.startswith("model."):
            key = "language_model." + key.removeprefix("model.")  # old Qwen2-VL: text model at model.*
        out[key] = w
    for key, a in lora.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("model.")
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            w = out[f"language_model.{name}.weight"]
            out[f"language_model.{name}.weight"] = (w.float() + lora_scale * b.float() @ a.float()).to(w.dtype)
    out.pop("lm_head.weight", None)  # the reward needs hidden states only
    return out


def _videoalign_checkpoint(ckpt, base):
    """A VideoReward checkpoint as one state dict in model.pth's names. Either model.pth (the released
    model, save_full_model) or what VideoAlign's trainer writes by default: adapter_model.safetensors
    (the LoRA) and non_lora_state_dict.pth (the other trained weights, the reward head among them) over
    the base Qwen2-VL weights in `base`. Read with weights_only=True: no pickled code runs."""
    full = os.path.join(ckpt, "model.pth")
    if os.path.exists(full):
        return torch.load(full, map_location="cpu", mmap=True, weights_only=True)
    adapter, non_lora = (os.path.join(ckpt, f) for f in ("adapter_model.safetensors", "non_lora_state_dict.pth"))
    if not (os.path.exists(adapter) and os.path.exists(non_lora)):
        raise FileNotFoundError(f"{ckpt} holds neither model.pth nor adapter_model.safetensors + "
                                f"non_lora_state_dict.pth (VideoAlign's two checkpoint layouts)")
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(base, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{ckpt} is a LoRA checkpoint: it needs the base Qwen2-VL weights (*.safetensors) "
                                f"in DANCEGRPO_QWEN2VL_PATH={base}")
    state = {"base_model.model." + k: v for f in files for k, v in load_file(f).items()}  # as PeftModel names them
    state.update(load_file(adapter))  # base_model.model.model.layers.N....lora_A.weight
    state.update(torch.load(non_lora, map_location="cpu", weights_only=True))
    return state


@functools.lru_cache(maxsize=None)
def _load_videoalign(root, base, device, dtype):
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel
    cfg = json.load(open(os.path.join(root, "model_config.json")))
    if cfg["data_config"]["prompt_template_type"] != "detailed_special" or cfg["model_config"]["reward_token"] != "special":
        raise NotImplementedError("only the released VideoReward setup (detailed_special prompt, special reward tokens)")
    ckpt = max(glob.glob(os.path.join(root, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]), default=None)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint-* folder under {root} (the VideoReward layout)")
    lora = cfg["peft_lora_config"]
    scale = lora["lora_alpha"] / (math.sqrt(lora["lora_r"]) if lora.get("use_rslora") else lora["lora_r"])
    state = videoalign_state_dict(_videoalign_checkpoint(ckpt, base), scale)
    head = state.pop("rm_head.weight").to(device, torch.float32)  # [output_dim, hidden]
    tok_dir = os.path.join(ckpt, "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else base, local_files_only=True)
    tok.add_tokens(list(VIDEOALIGN_TOKENS), special_tokens=True)  # as in training; no-op if present
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    with torch.device(device):
        model = Qwen2VLModel._from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model.eval(), tok, head, cfg


def videoalign_inputs(videos, prompts, tok, vision_config, data_config, fps):
    """Videos [B,T,3,H,W] in [0,1] played at `fps`, prompts -> (input_ids, attention_mask,
    pixel_values_videos, video_grid_thw): what VideoAlign's qwen-vl-utils + Qwen2-VL processor build."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    b, t, _, h, w = videos.shape
    n = videoalign_num_frames(t, fps, data_config.get("fps") or 2.0, data_config.get("num_frames"))
    frames = _u8(videos[:, torch.linspace(0, t - 1, n).round().long()].flatten(0, 1))  # uniform sampling
    size = videoalign_size(h, w, data_config["max_frame_pixels"], factor=patch * merge)
    frames = qwen2vl_pixels(frames, size).view(b, n, 3, *size)
    patches, grids = zip(*(qwen2vl_patches(f, patch, vision_config.temporal_patch_size, merge) for f in frames))
    video = "<|video_pad|>" * (math.prod(grids[0]) // merge ** 2)  # one token per merged 2x2 patch group
    texts = [QWEN2VL_CHAT.format(vision=video, text=VIDEOALIGN_PROMPT.format(text_prompt=p)) for p in prompts]
    enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    return enc.input_ids, enc.attention_mask, torch.cat(patches), torch.tensor(grids)


def _videoalign(device, dim, path=None, base=None, fps=8.0, dtype=None):
    """VideoReward score `dim` (0 VQ, 1 MQ, 2 TA) of videos played at `fps` (DanceGRPO saves at 8)."""
    root = _weights(path, "DANCEGRPO_VIDEOALIGN_PATH", "KwaiVGI/VideoReward")
    base_id = json.load(open(os.path.join(root, "model_config.json")))["model_config"]["model_name_or_path"]
    base = _weights(base, "DANCEGRPO_QWEN2VL_PATH", base_id)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    def score(videos, prompts):
        model, tok, head, cfg = _load_videoalign(root, base, device, dtype)
        inputs = videoalign_inputs(videos.to(device, torch.float32), prompts, tok, model.config.vision_config,
                                   cfg["data_config"], fps)
        ids, mask, pixels, grid = (v.to(device) for v in inputs)  # ids: [B, L]
        # Positions 0..L-1 in all three M-RoPE sections, video tokens included: the released model's
        # forward (VideoAlign trainer.py) never calls get_rope_index, so it was trained and is run this way.
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1], device=device).expand_as(ids),
                       pixel_values_videos=pixels.to(dtype), video_grid_thw=grid).last_hidden_state
        special = torch.stack([ids == i for i in tok.convert_tokens_to_ids(list(VIDEOALIGN_TOKENS))], 1)  # [B, 3, L]
        if not (special.sum(-1) == 1).all():
            raise ValueError("each VideoAlign reward token must occur exactly once per prompt")
        at = hidden[torch.arange(ids.shape[0], device=device)[:, None], special.int().argmax(-1)].float()  # [B, 3, hidden]
        raw = at @ head.T  # [B, 3, output_dim]: the reward head read at <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>
        raw = raw[..., 0] if raw.shape[-1] == 1 else raw.diagonal(dim1=1, dim2=2)
        norm = cfg.get("inference_config")
        if norm:  # use_norm=True in DanceGRPO
            raw = (raw - torch.tensor([norm[f"{k}_mean"] for k in ("VQ", "MQ", "TA")], device=device)) \
                / torch.tensor([norm[f"{k}_std"] for k in ("VQ", "MQ", "TA")], device=device)
        return raw[:, dim]
    return score


# ---------------------------------------------------------------- HPSv3 (Qwen2-VL-7B + MLP head)

# HPSv3's INSTRUCTION and prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py, imported by
# hpsv3/inference.py:7), verbatim: they are model input, trailing spaces included. Read at MizzenAI/HPSv3
# 72b7eba (inference.py) and d232ff8 (model/qwen2vl_trainer.py, train.py, config/HPSv3_7B.yaml); the
# repository's own data_collator_qwen.py was not among the stored sources: this text is from two stored
# copies of that file, which agree. Its process_vision_info (hpsv3/dataset/utils.py, not stored either) is
# taken to be qwen-vl-utils' fetch_image (a pyproject dependency): smart_resize, then a PIL resize.
HPSV3_PROMPT = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}



Please provide the overall ratings of this image: <|Reward|>

END
"""
HPSV3_TOKEN = "<|Reward|>"  # added to the Qwen2-VL tokenizer before resize_token_embeddings (hpsv3/train.py)
HPSV3_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels (hpsv3/inference.py prepare_batch; HPSv3_7B.yaml)


def hpsv3_head(hidden, out_dim):
    """HPSv3's "ranknet" rm_head without rm_head_kwargs (hpsv3/model/qwen2vl_trainer.py, Qwen2VLRewardModelBT):
    Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, out_dim): keys 0, 3, 5."""
    return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, out_dim))


def _hpsv3_file(path):
    """The checkpoint file: `path` itself, or in the folder `path` HPSv3.safetensors, else its one
    *.safetensors or *.pth (a torch state dict as hpsv3/train.py saves, possibly under "model")."""
    if not os.path.isdir(path):
        return path
    files = glob.glob(os.path.join(path, "HPSv3.safetensors")) or \
        sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.pth")))
    if len(files) != 1:
        raise FileNotFoundError(f"{path} (DANCEGRPO_HPSV3_PATH) should hold one HPSv3 checkpoint "
                                f"(HPSv3.safetensors), found {files}")
    return files[0]


@functools.lru_cache(maxsize=None)
def _load_hpsv3(path, base, device, dtype):
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel
    # Qwen2VLForConditionalGeneration names of either transformers layout -> Qwen2VLModel's, lm_head dropped
    # (no LoRA in HPSv3_7B.yaml, so nothing is merged)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:  # weights_only: no pickled code runs
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state = state.get("model", state)
    state = videoalign_state_dict(state, lora_scale=0.0)
    head_state = {k.removeprefix("rm_head."): state.pop(k) for k in list(state) if k.startswith("rm_head.")}
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tok.add_tokens([HPSV3_TOKEN], special_tokens=True)  # as hpsv3/train.py create_model_and_processor
    if "5.weight" not in head_state:
        raise NotImplementedError(f"{path}: only HPSv3's ranknet rm_head (rm_head.0, .3, .5) is supported")
    rows = state["language_model.embed_tokens.weight"].shape[0]
    if rows != len(tok):  # the reference resizes the embeddings to len(tokenizer) after adding the token
        raise ValueError(f"the HPSv3 embeddings have {rows} rows but the tokenizer in {base} has {len(tok)} "
                         f"tokens with {HPSV3_TOKEN}: DANCEGRPO_HPSV3_BASE should be Qwen2-VL-7B-Instruct")
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    config.text_config.vocab_size = rows
    with torch.device(device):
        model = Qwen2VLModel._from_config(config, dtype=dtype)
        head = hpsv3_head(config.text_config.hidden_size, head_state["5.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    head.load_state_dict(head_state, strict=True)  # float32, as the reference keeps rm_head
    return model.eval(), head.eval(), tok


def hpsv3_inputs(images, prompts, tok, vision_config):
    """Images [B,3,H,W] in [0,1], prompts -> (input_ids, attention_mask, pixel_values, image_grid_thw): what
    hpsv3/inference.py prepare_batch builds (qwen-vl-utils resize to 256*28*28 pixels, Qwen2-VL processor)."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    size = videoalign_size(*images.shape[-2:], HPSV3_PIXELS, HPSV3_PIXELS, factor=patch * merge)
    pixels = qwen2vl_pixels(_u8(images), size)  # [B, 3, h, w]
    # a still image: the processor repeats it to temporal_patch_size frames
    patches, grids = zip(*(qwen2vl_patches(p[None], patch, vision_config.temporal_patch_size, merge) for p in pixels))
    image = "<|image_pad|>" * (math.prod(grids[0]) // merge ** 2)
    texts = [QWEN2VL_CHAT.format(vision=image, text=HPSV3_PROMPT.format(text_prompt=p)) for p in prompts]
    enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    return enc.input_ids, enc.attention_mask, torch.cat(patches), torch.tensor(grids)


def hpsv3(device, path=None, base=None, dtype=None):
    """HPSv3's mu, the first of the head's (mu, sigma) at <|Reward|>: what hpsv3/inference.py's reward()
    returns in column 0 and DanceGRPO keeps (train_grpo_qwenimage.py:390-394, hps_score[:, 0])."""
    path = _hpsv3_file(_weights(path, "DANCEGRPO_HPSV3_PATH", "MizzenAI/HPSv3", "HPSv3.safetensors"))
    base = _weights(base, "DANCEGRPO_HPSV3_BASE", "Qwen/Qwen2-VL-7B-Instruct")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # HPSv3_7B.yaml: bf16

    def score(images, prompts):
        model, head, tok = _load_hpsv3(path, base, device, dtype)
        inputs = hpsv3_inputs(images.to(device, torch.float32), prompts, tok, model.config.vision_config)
        ids, mask, pixels, grid = (v.to(device) for v in inputs)  # ids: [B, L]
        # Positions 0..L-1, as VideoAlign: Qwen2VLRewardModelBT.forward passes inputs_embeds and no
        # input_ids or grid to the Qwen2-VL model, so no M-RoPE index is built (qwen2vl_trainer.py).
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1], device=device).expand_as(ids),
                       pixel_values=pixels.to(dtype), image_grid_thw=grid).last_hidden_state  # [B, L, hidden]
        at = ids == tok.convert_tokens_to_ids(HPSV3_TOKEN)  # [B, L]
        if not (at.sum(-1) == 1).all():
            raise ValueError(f"{HPSV3_TOKEN} must occur exactly once per prompt")
        out = head(hidden[at].float())  # [B, 2]: (mu, sigma)
        return out[:, 0]
    return score


def digit(device=None, target=3):
    """The digits demo's reward: a logistic-regression classifier's probability that the image is `target`."""
    import digits  # scikit-learn and the data only when a digit reward is used
    _check_digit(target)

    def score(images, prompts):
        return torch.from_numpy(digits.probabilities(images)[:, target])
    return score


def digit_judge(device=None, target=3):
    """For evaluation only: 1.0 where an independent classifier (an RBF SVM) judges the image `target`, else 0.0,
    so the mean over samples is the fraction of the target digit."""
    import digits
    _check_digit(target)

    def score(images, prompts):
        return torch.from_numpy(digits.judged(images) == target).float()
    return score


def _check_digit(target):
    if target not in range(10):
        raise ValueError(f"the target digit must be one of 0..9, got {target!r}")


# ---------------------------------------------------------------- registry and --reward spec

def _checked(name, constructor, video_model=False):
    """A constructor whose scorers validate inputs, run without grad and refuse non-finite scores."""
    @functools.wraps(constructor)
    def build(device, **kwargs):
        fn = constructor(device, **kwargs)

        def scorer(x, prompts):
            if x.ndim not in (4, 5) or x.shape[-3] != 3 or len(prompts) != x.shape[0]:
                raise ValueError(f"{name}: want x [B,3,H,W] or [B,T,3,H,W] and B prompts, got {tuple(x.shape)}, {len(prompts)}")
            if video_model and x.ndim == 4:
                raise ValueError(f"{name} scores videos [B,T,3,H,W], got images {tuple(x.shape)}")
            with torch.no_grad():
                if x.ndim == 5 and not video_model:  # image reward on a video: mean over frames
                    b, t = x.shape[:2]
                    s = fn(x.flatten(0, 1), [p for p in prompts for _ in range(t)]).view(b, t).mean(1)
                else:
                    s = fn(x, list(prompts))
            s = s.float().to(x.device)
            if s.shape != (x.shape[0],):
                raise RuntimeError(f"{name} returned shape {tuple(s.shape)}, want ({x.shape[0]},)")
            if not torch.isfinite(s).all():
                bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
                raise FloatingPointError(f"{name} gave non-finite scores for samples {bad}: {s.tolist()}")
            return s
        return scorer
    return build


REWARDS = {
    "hps": _checked("hps", hps),
    "clip": _checked("clip", clip),
    "pickscore": _checked("pickscore", pickscore),
    "videoalign_vq": _checked("videoalign_vq", functools.partial(_videoalign, dim=0), video_model=True),
    "videoalign_mq": _checked("videoalign_mq", functools.partial(_videoalign, dim=1), video_model=True),
    "videoalign_ta": _checked("videoalign_ta", functools.partial(_videoalign, dim=2), video_model=True),
    "hpsv3": _checked("hpsv3", hpsv3),
    "brightness": _checked("brightness", brightness),
    "jpeg_compressibility": _checked("jpeg_compressibility", jpeg_compressibility),
    "digit": _checked("digit", digit),
    "digit_judge": _checked("digit_judge", digit_judge),
}


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    threshold: float | None = None  # binary reward: 1.0 where the score is above it, else 0.0


def parse_reward_spec(spec: str) -> list[RewardSpec]:
    """'hps:0.7,clip:1.4' -> weighted rewards; 'hps@0.28' -> binary HPS; items are name[@threshold][:weight]."""
    specs = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*(?:@\s*([^:\s]+)\s*)?(?::\s*(\S+)\s*)?", part)
        try:
            name, threshold, weight = m.groups()
            specs.append(RewardSpec(name, float(weight or 1.0), None if threshold is None else float(threshold)))
            if name not in REWARDS or not all(math.isfinite(v) for v in (specs[-1].weight, specs[-1].threshold or 0)):
                raise ValueError
        except (AttributeError, ValueError):
            raise ValueError(f"bad reward {part.strip()!r} in {spec!r}: want name[@threshold][:weight], "
                             f"name one of {', '.join(REWARDS)}") from None
    return specs


def build_scorers(specs, device, video_fps=None, *, target_digit=3, timeout=None, retries=0):
    """One scorer per spec, thresholded to 0/1 where the spec has a threshold; a model used by
    several specs (e.g. 'hps:1,hps@0.28:0.5') is built once. video_fps: the frame rate the videos
    play at (train_video's --fps); VideoAlign samples its frames by it, as the official scripts,
    which save each video at --fps and let VideoAlign read it back. target_digit: the digit that
    `digit` and `digit_judge` reward (--target_digit). timeout (seconds, None: none) and retries: each
    call guarded by them (guarded)."""
    def build(name):
        fps = {"fps": float(video_fps)} if video_fps and name.startswith("videoalign") else {}
        target = {"target": int(target_digit)} if name in ("digit", "digit_judge") else {}
        return guarded(name, REWARDS[name](device, **fps, **target), timeout, retries)
    base = {name: build(name) for name in dict.fromkeys(s.name for s in specs)}

    def binary(fn, threshold):
        return lambda x, prompts: (fn(x, prompts) > threshold).float()
    return [base[s.name] if s.threshold is None else binary(base[s.name], s.threshold) for s in specs]


def add_args(parser):
    """The train scripts' reward flags."""
    parser.add_argument("--target_digit", type=int, default=3, choices=range(10),
                        help="the digit the digit rewards ask for")
    parser.add_argument("--reward_timeout", type=float, default=600.0,
                        help="seconds a reward call may take, else the run stops")
    parser.add_argument("--reward_retries", type=int, default=2,
                        help="retries of a reward call that raised, then the run stops")


def settings(args) -> dict:
    """build_scorers' keyword settings from the train scripts' flags (add_args)."""
    return dict(target_digit=args.target_digit, timeout=args.reward_timeout, retries=args.reward_retries)


def guarded(name, fn, timeout=None, retries=0):
    """Scorer `fn` with a deadline and retries. Each call runs in a daemon thread that the caller waits for at most
    `timeout` seconds (a hung reward model cannot be interrupted, but the run need not wait for it, nor for it at
    exit). A call that raised is retried up to `retries` times, one warning line each; one that gives no score in
    time is not (it may still hold its memory). What still fails stops the run: SystemExit, one line naming the
    reward and the error; the train loop has saved nothing since its last checkpoint. Non-finite scores
    (FloatingPointError) pass through: that iteration skips its update (sampling.score)."""
    def scorer(x, prompts):
        for attempt in range(retries + 1):
            done, box = threading.Event(), {}

            def call():
                try:
                    if x.is_cuda:  # the current device is per thread
                        torch.cuda.set_device(x.device)
                    box["scores"] = fn(x, prompts)
                except BaseException as e:  # handed to the caller's thread
                    box["error"] = e
                finally:
                    done.set()
            threading.Thread(target=call, name=f"reward {name}", daemon=True).start()
            if not done.wait(timeout):
                raise SystemExit(f"error: reward {name} gave no score within --reward_timeout {timeout:g} s (hung?); "
                                 f"the run stops, its last checkpoint is intact")
            error = box.get("error")
            if error is None:
                return box["scores"]
            if isinstance(error, (FloatingPointError, KeyboardInterrupt, SystemExit)):
                raise error
            why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            if attempt < retries:
                print(f"warning: reward {name} failed ({why}); retry {attempt + 1} of {retries}", flush=True)
        raise SystemExit(f"error: reward {name} failed {retries + 1} time(s) in a row ({why}); the run stops, its "
                         f"last checkpoint is intact")
    return scorer


def constant_warning(rows, iterations=3) -> str | None:
    """A warning line when the last `iterations` training rows of metrics.jsonl (in `rows`) are the first to give
    every sample of every group the same score (groups_without_spread 1): no advantage, no gradient. None else,
    so a lasting constant reward is told once, then again every `iterations` iterations."""
    streak = 0
    for row in reversed([r for r in rows if "groups_without_spread" in r]):
        if row["groups_without_spread"] < 1:
            break
        streak += 1
    if streak and streak % iterations == 0:
        return (f"warning: the reward gave all samples of each group the same score for the last {streak} iterations: "
                f"no advantage, no learning (a saturated or binary reward, a broken reward model, or collapsed samples?)")
    return None
