"""rewards.py: every scorer through its real loading path on tiny random models, offline.

References are written here, independently of rewards.py: the OpenCLIP layout is produced from a
transformers CLIPModel by an inverse key mapping; scores are compared with that CLIPModel's own
embeddings; the VideoAlign LoRA merge is compared with peft's merge_and_unload and its patch layout
with transformers' Qwen2-VL image processor.
"""

import json
import math
import os
import shutil
import time

import pytest
import torch

import rewards

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------- tiny CLIP models in two layouts

@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """OpenAI-CLIP-style BPE tokenizer over single letters; <|startoftext|>, <|endoftext|> last, as in CLIP."""
    from transformers import CLIPTokenizer
    tokens = list(LETTERS) + [c + "</w>" for c in LETTERS] + ["<|startoftext|>", "<|endoftext|>"]
    path = tmp_path_factory.mktemp("clip_tok")
    CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[]).save_pretrained(path)
    return str(path)


def tiny_clip(act="gelu", seed=0):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    config = CLIPConfig(projection_dim=16, text_config=dict(
        vocab_size=54, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=77, hidden_act=act, eos_token_id=53, bos_token_id=52, pad_token_id=53,
    ), vision_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, hidden_act=act,
    ))
    model = CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms and logit scale
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(50.0))
    return model


def open_clip_layout(model):
    """Inverse of rewards.open_clip_to_transformers, written out layer by layer (open_clip's names)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    for hf, oc in (("vision_model.encoder.layers", "visual.transformer.resblocks"),
                   ("text_model.encoder.layers", "transformer.resblocks")):
        for i in range(2):
            h, o = f"{hf}.{i}.", f"{oc}.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
                out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
                out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
                out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
                out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    return out


def open_clip_config(quick_gelu=False, resize_mode=None):
    cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": quick_gelu,
                         "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                         "text_cfg": {"context_length": 77, "vocab_size": 54, "width": 32, "heads": 2, "layers": 2}}}
    if resize_mode:
        cfg["preprocess_cfg"] = {"mean": list(rewards.CLIP_MEAN), "std": list(rewards.CLIP_STD), "resize_mode": resize_mode}
    return cfg


def reference_cosine(model, tokenizer_path, images, prompts):
    """The CLIPModel's own normalised embeddings on CLIP-normalised 32x32 pixels."""
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tokenizer_path)
    text = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    mean, std = torch.tensor(rewards.CLIP_MEAN)[:, None, None], torch.tensor(rewards.CLIP_STD)[:, None, None]
    with torch.no_grad():
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=(images - mean) / std)
    return (out.image_embeds * out.text_embeds).sum(-1)


def images_8bit(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


PROMPTS = ["a cat on a mat", "the quick brown fox jumps"]


def test_hps_reads_the_open_clip_checkpoint_and_matches_the_model_cosine(tmp_path, clip_tokenizer):
    model = tiny_clip()
    torch.save({"state_dict": open_clip_layout(model)}, tmp_path / "HPS_v2.1_compressed.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config()))
    scorer = rewards.REWARDS["hps"]("cpu", path=str(tmp_path / "HPS_v2.1_compressed.pt"), tokenizer=clip_tokenizer)
    x = images_8bit(2)
    torch.testing.assert_close(scorer(x, PROMPTS), reference_cosine(model, clip_tokenizer, x, PROMPTS), atol=1e-5, rtol=1e-5)
    wide = scorer(torch.rand(2, 3, 20, 48), PROMPTS)  # resized to 14x32, padded to 32x32
    assert wide.shape == (2,) and torch.isfinite(wide).all()


def test_clip_reads_a_transformers_folder_and_an_open_clip_folder(tmp_path, clip_tokenizer):
    x = images_8bit(2)
    model = tiny_clip(seed=2)
    model.save_pretrained(tmp_path / "hf")
    from transformers import CLIPTokenizer
    CLIPTokenizer.from_pretrained(clip_tokenizer).save_pretrained(tmp_path / "hf")  # the folder's own tokenizer
    scorer = rewards.REWARDS["clip"]("cpu", path=str(tmp_path / "hf"))
    torch.testing.assert_close(scorer(x, PROMPTS), reference_cosine(model, clip_tokenizer, x, PROMPTS), atol=1e-5, rtol=1e-5)

    model = tiny_clip("quick_gelu", seed=3)  # DFN5B's layout: OpenCLIP, QuickGELU, "squash" resize
    (tmp_path / "oc").mkdir()
    torch.save(open_clip_layout(model), tmp_path / "oc" / "open_clip_pytorch_model.bin")
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(open_clip_config(True, "squash")))
    scorer = rewards.REWARDS["clip"]("cpu", path=str(tmp_path / "oc"), tokenizer=clip_tokenizer)
    torch.testing.assert_close(scorer(x, PROMPTS), reference_cosine(model, clip_tokenizer, x, PROMPTS), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(scorer(torch.rand(2, 3, 24, 40), PROMPTS)).all()


def test_pickscore_is_logit_scale_times_cosine(tmp_path, clip_tokenizer):
    model = tiny_clip(seed=4)
    model.save_pretrained(tmp_path)
    scorer = rewards.REWARDS["pickscore"]("cpu", path=str(tmp_path), tokenizer=clip_tokenizer)
    x = images_8bit(2)
    torch.testing.assert_close(scorer(x, PROMPTS), 50.0 * reference_cosine(model, clip_tokenizer, x, PROMPTS), atol=1e-4, rtol=1e-5)
    video = torch.rand(2, 3, 3, 40, 32)  # [B,T,3,H,W]: the mean over frames
    per_frame = scorer(video.flatten(0, 1), [p for p in PROMPTS for _ in range(3)]).view(2, 3)
    torch.testing.assert_close(scorer(video, PROMPTS), per_frame.mean(1))


def test_pickscore_runs_in_float32_whatever_its_folder_stores(tmp_path, clip_tokenizer):
    """A folder saved in bf16 (as a user may convert it) scores like the float32 model upcast from those
    same bf16 weights; the official FLUX script runs PickScore in fp32 too."""
    model = tiny_clip(seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    scorer = rewards.REWARDS["pickscore"]("cpu", path=str(tmp_path), tokenizer=clip_tokenizer)
    x = images_8bit(2)
    expected = model.float().logit_scale.exp() * reference_cosine(model.float(), clip_tokenizer, x, PROMPTS)
    torch.testing.assert_close(scorer(x, PROMPTS), expected, atol=1e-4, rtol=1e-5)


def test_clip_pixels_resize_modes():
    x = torch.ones(1, 3, 16, 32)  # white, twice as wide as high
    black = ((0 - torch.tensor(rewards.CLIP_MEAN)) / torch.tensor(rewards.CLIP_STD))[:, None]
    white = ((1 - torch.tensor(rewards.CLIP_MEAN)) / torch.tensor(rewards.CLIP_STD))[:, None]
    longest = rewards.clip_pixels(x, 8, "longest")  # 4x8 image, 2 black rows above and below
    assert longest.shape == (1, 3, 8, 8)
    torch.testing.assert_close(longest[0, :, [0, 1, 6, 7]].flatten(1), black.expand(3, 32))
    torch.testing.assert_close(longest[0, :, 2:6].flatten(1), white.expand(3, 32))
    ramp = torch.arange(32.0).div(31).expand(1, 3, 16, 32)
    shortest = rewards.clip_pixels(ramp, 16, "shortest")  # no resize, the middle 16 columns
    torch.testing.assert_close(shortest, rewards.clip_pixels(ramp[..., 8:24], 16, "squash"))
    assert rewards.clip_pixels(x, 8, "squash").shape == (1, 3, 8, 8)


def test_hps_keeps_the_bicubic_overshoot_the_8_bit_scorers_clamp():
    """HPS-v2's eval transform is ToTensor() then ResizeMaxSize (a float resize, no clamp); CLIP/PickScore
    resize 8-bit images, which clamps. A black/white edge shrunk 4x overshoots [0, 1] under bicubic."""
    edge = torch.zeros(1, 3, 32, 32)
    edge[..., 16:] = 1.0
    mean, std = torch.tensor(rewards.CLIP_MEAN)[:, None, None], torch.tensor(rewards.CLIP_STD)[:, None, None]
    hps = rewards.clip_pixels(edge, 8, "longest") * std + mean  # back to [0, 1] units
    squash = rewards.clip_pixels(edge, 8, "squash") * std + mean
    assert hps.max() > 1 + 1e-3 and hps.min() < -1e-3
    assert squash.max() <= 1 + 1e-6 and squash.min() >= -1e-6


# ---------------------------------------------------------------- offline rewards

def test_brightness_white_brighter_than_black_and_works_on_video():
    scorer = rewards.REWARDS["brightness"]("cpu")
    x = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8), torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 8, 8)])
    torch.testing.assert_close(scorer(x, ["", "", ""]), torch.tensor([1.0, 0.0, 0.299]))
    video = torch.rand(2, 5, 3, 8, 8)
    torch.testing.assert_close(scorer(video, ["", ""]), scorer(video.flatten(0, 1), [""] * 10).view(2, 5).mean(1))


def test_jpeg_flat_more_compressible_than_noise_and_works_on_video():
    from PIL import Image
    import io
    scorer = rewards.REWARDS["jpeg_compressibility"]("cpu")
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    s = scorer(torch.cat([torch.full((1, 3, 64, 64), 0.5), noise]), ["", ""])
    assert s[0] > s[1] and (s < 0).all()
    buf = io.BytesIO()  # DDPO's definition: minus the kB of a quality-95 JPEG of the 8-bit image
    Image.fromarray((noise[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    assert s[1].item() == pytest.approx(-buf.tell() / 1000)
    assert scorer(torch.rand(2, 3, 3, 32, 32), ["", ""]).shape == (2,)


# ---------------------------------------------------------------- spec parser, scorer checks, failure

def test_parse_reward_spec_weights_and_thresholds():
    S = rewards.RewardSpec
    assert rewards.parse_reward_spec("hps:0.7,clip:1.4") == [S("hps", 0.7), S("clip", 1.4)]
    assert rewards.parse_reward_spec("hps@0.28") == [S("hps", 1.0, 0.28)]
    assert rewards.parse_reward_spec(" brightness , hps@0.28:2 ") == [S("brightness"), S("hps", 2.0, 0.28)]


@pytest.mark.parametrize("spec", ["", "hps:", "hps:abc", "nope:1", "hps@x", "hps:1,,clip", "hps:nan", "hps@0.2@0.3"])
def test_parse_reward_spec_rejects_bad_specs_naming_the_part_and_known_names(spec):
    with pytest.raises(ValueError) as e:
        rewards.parse_reward_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and "videoalign_vq" in msg and "name[@threshold][:weight]" in msg


def test_build_scorers_thresholds_to_binary_and_shares_models():
    specs = rewards.parse_reward_spec("brightness:1,brightness@0.5:2,jpeg_compressibility")
    plain, binary, jpeg = rewards.build_scorers(specs, "cpu")
    x = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.8)])
    torch.testing.assert_close(binary(x, ["", ""]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(plain(x, ["", ""]), torch.tensor([0.2, 0.8]))
    assert jpeg(x, ["", ""]).shape == (2,)


def test_scorers_refuse_non_finite_scores_and_bad_inputs():
    nan = rewards._checked("nan", lambda device: lambda x, prompts: torch.tensor([0.0, float("nan")]))("cpu")
    with pytest.raises(FloatingPointError, match=r"samples \[1\]"):
        nan(torch.rand(2, 3, 4, 4), ["", ""])
    scorer = rewards.REWARDS["brightness"]("cpu")
    with pytest.raises(ValueError):
        scorer(torch.rand(2, 3, 4, 4), [""])  # one prompt for two images
    with pytest.raises(ValueError):
        scorer(torch.rand(2, 4, 4), ["", ""])


@pytest.mark.parametrize("name,env", [("hps", "DANCEGRPO_HPS_CKPT"), ("clip", "DANCEGRPO_CLIP_PATH"),
                                      ("pickscore", "DANCEGRPO_PICKSCORE_PATH"),
                                      ("videoalign_vq", "DANCEGRPO_VIDEOALIGN_PATH"), ("hpsv3", "DANCEGRPO_HPSV3_PATH")])
def test_missing_weights_fail_fast_naming_the_variable(name, env, monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv(env, raising=False)
    start = time.time()
    with pytest.raises(FileNotFoundError, match=env):
        rewards.REWARDS[name]("cpu")
    monkeypatch.setenv(env, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=env):
        rewards.REWARDS[name]("cpu")
    assert time.time() - start < 10


# ---------------------------------------------------------------- VideoAlign on a tiny Qwen2-VL

def test_videoalign_frame_count_and_size_follow_qwen_vl_utils():
    def round_by(n, f): return round(n / f) * f  # qwen-vl-utils, written out again

    def reference_size(h, w, max_px, min_px=128 * 28 * 28, f=28):
        hb, wb = max(f, round_by(h, f)), max(f, round_by(w, f))
        if hb * wb > max_px:
            beta = math.sqrt((h * w) / max_px)
            hb, wb = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f
        elif hb * wb < min_px:
            beta = math.sqrt(min_px / (h * w))
            hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
        return hb, wb
    for h, w in [(480, 480), (720, 1280), (400, 640), (64, 64), (28, 300)]:
        assert rewards.videoalign_size(h, w, 200704) == reference_size(h, w, 200704)
    assert rewards.videoalign_size(64, 64, 200704) == (336, 336)  # up to the 128*28*28 minimum
    assert rewards.videoalign_num_frames(53, 8.0) == 14  # HunyuanVideo, 53 frames saved at 8 fps: 13.25 -> 14
    assert rewards.videoalign_num_frames(6, 8.0) == 4  # at least 4 frames
    assert rewards.videoalign_num_frames(53, 8.0, nframes=9) == 8  # Python round(4.5) = 4, as in qwen-vl-utils
    assert rewards.videoalign_num_frames(3, 1.0) == 2  # at most the largest even count the video has


def test_qwen2vl_patches_match_the_transformers_processor_layout():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    image = torch.randn(3, 56, 84)
    proc = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    ref = proc(images=[image.numpy()], return_tensors="pt", input_data_format="channels_first")
    patches, grid = rewards.qwen2vl_patches(image[None].expand(2, -1, -1, -1))  # a still: two equal frames
    torch.testing.assert_close(patches, ref.pixel_values.float())
    assert grid == tuple(ref.image_grid_thw[0].tolist()) == (1, 4, 6)
    patches, grid = rewards.qwen2vl_patches(torch.randn(3, 3, 28, 28))  # odd frame count: last frame repeated
    assert grid == (2, 2, 2) and patches.shape == (8, 3 * 2 * 14 * 14)


def byte_level_vocab():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))  # GPT-2's bytes_to_unicode
    cs = bs[:] + [256 + n for n in range(256) if n not in bs]
    bs = bs + [n for n in range(256) if n not in bs]
    return {chr(c): i for i, c in enumerate(sorted(cs, key=lambda c: bs[cs.index(c)]))}


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen2vl(base, extra_vocab):
    """A 2-layer Qwen2VLForConditionalGeneration (seed 0), its vocabulary `extra_vocab` rows larger than a
    byte-level tokenizer holding Qwen's special tokens; config and tokenizer saved in `base` (a Qwen2-VL
    folder without weights). Returns (tokenizer, model)."""
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    tok = Qwen2Tokenizer(vocab=byte_level_vocab(), merges=[])
    tok.add_tokens(QWEN_SPECIALS, special_tokens=True)
    tok.save_pretrained(base)
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS)))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) + extra_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e4}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    config.save_pretrained(base)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    return tok, model


@pytest.fixture(scope="module")
def videoalign_dirs(tmp_path_factory):
    """Base folder (Qwen2-VL config + tokenizer) and a VideoReward folder in the released layout:
    model_config.json and checkpoint-N/model.pth holding a PEFT-wrapped model, old transformers names."""
    from peft import LoraConfig, get_peft_model
    base, root = tmp_path_factory.mktemp("qwen2vl"), tmp_path_factory.mktemp("videoreward")
    tok, model = tiny_qwen2vl(base, extra_vocab=3)  # the reward tokens are added by the loader, as in training
    targets = sorted({n.split(".")[-1] for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = {}
    for k, v in peft_model.state_dict().items():  # transformers 4.4x names: visual.*, model.* (text)
        k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
        state[k.replace("base_model.model.model.visual.", "base_model.model.visual.")] = v.clone()
    state["base_model.model.rm_head.weight"] = torch.randn(1, 32)
    (root / "checkpoint-7").mkdir()
    torch.save(state, root / "checkpoint-7" / "model.pth")
    cfg = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200704, "sample_type": "uniform",
                           "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special"},
           "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                            "use_special_tokens": True, "reward_token": "special"},
           "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
           "inference_config": {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 4.0, "TA_mean": 0.25, "TA_std": 0.5}}
    (root / "model_config.json").write_text(json.dumps(cfg))
    raw = tmp_path_factory.mktemp("videoreward_raw")  # same weights, no normalisation
    os.symlink(root / "checkpoint-7", raw / "checkpoint-7")
    (raw / "model_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "inference_config"}))
    tok.add_tokens(list(rewards.VIDEOALIGN_TOKENS), special_tokens=True)
    return str(base), str(root), str(raw), peft_model.merge_and_unload().eval(), state, tok, cfg


def test_videoalign_state_dict_merges_lora_like_peft(videoalign_dirs):
    _, _, _, merged, state, _, _ = videoalign_dirs
    ours = rewards.videoalign_state_dict(state, 8 / 4)
    head = ours.pop("rm_head.weight")
    reference = merged.model.state_dict()  # peft's merge_and_unload: a Qwen2VLModel inside
    assert set(ours) == set(reference) and head.shape == (1, 32)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], atol=1e-6, rtol=1e-6)


def test_videoalign_matches_the_official_forward(videoalign_dirs):
    """VideoAlign's Qwen2VLRewardModelBT.forward, written out on the peft-merged model: video features
    scattered into the embeddings, the text model run with position_ids=None (sequential positions),
    rm_head at the three reward tokens, then (raw - mean) / std."""
    base, root, _, merged, state, tok, cfg = videoalign_dirs
    videos = torch.rand(2, 9, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    prompts = ["a red kite over the hills", "waves"]
    ids, mask, pixels, grid = rewards.videoalign_inputs(videos, prompts, tok, merged.config.vision_config,
                                                        cfg["data_config"], fps=8.0)
    assert grid.tolist() == [[2, 20, 28]] * 2 and pixels.shape == (2 * 2 * 20 * 28, 3 * 2 * 14 * 14)  # 4 frames, 280x392
    with torch.no_grad():
        embeds = merged.model.language_model.embed_tokens(ids)
        video = torch.cat(merged.model.get_video_features(pixels, grid).pooler_output)
        embeds[ids == merged.config.video_token_id] = video
        hidden = merged.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = hidden @ state["base_model.model.rm_head.weight"].T  # [B, L, 1]
    special = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(list(rewards.VIDEOALIGN_TOKENS))))
    raw = logits[special].view(2, 3)
    norm = cfg["inference_config"]
    for d, key in enumerate(("VQ", "MQ", "TA")):
        expected = (raw[:, d] - norm[f"{key}_mean"]) / norm[f"{key}_std"]
        ours = rewards.REWARDS[f"videoalign_{key.lower()}"]("cpu", path=root, base=base)(videos, prompts)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_videoalign_scores_videos_end_to_end(videoalign_dirs):
    base, root, raw_root, *_ = videoalign_dirs
    videos = torch.rand(2, 6, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    prompts = ["a dog runs on the beach", "snow {falls}"]  # different lengths: right padding in the batch
    scores = {d: rewards.REWARDS[f"videoalign_{d}"]("cpu", path=root, base=base)(videos, prompts) for d in ("vq", "mq", "ta")}
    raw = {d: rewards.REWARDS[f"videoalign_{d}"]("cpu", path=raw_root, base=base)(videos, prompts) for d in ("vq", "mq", "ta")}
    for d, mean, std in (("vq", 1.0, 2.0), ("mq", -0.5, 4.0), ("ta", 0.25, 0.5)):
        assert scores[d].shape == (2,) and torch.isfinite(scores[d]).all()
        torch.testing.assert_close(scores[d], (raw[d] - mean) / std)  # (raw - mean) / std per dimension
    assert not torch.allclose(raw["vq"], raw["mq"]) and not torch.allclose(raw["vq"], raw["ta"])
    vq = rewards.REWARDS["videoalign_vq"]("cpu", path=root, base=base)
    alone = torch.cat([vq(videos[i:i + 1], prompts[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(scores["vq"], alone, atol=1e-5, rtol=1e-5)  # batching changes nothing
    with pytest.raises(ValueError, match="videos"):
        vq(torch.rand(2, 3, 40, 56), prompts)


def test_videoalign_prompt_is_the_official_text():
    p = rewards.VIDEOALIGN_PROMPT  # trailing spaces are part of the model input
    assert "**Visual Quality:**  \n" in p and "lowest possible. \n" in p and "acceptable.  \n" in p
    assert p.startswith("\nYou are tasked") and p.endswith("<|TA_reward|>\nEND\n") and len(p) == 3997


def test_videoalign_loads_the_trainers_default_adapter_layout(videoalign_dirs, tmp_path):
    """What VideoAlign's trainer writes without save_full_model: adapter_model.safetensors (LoRA, no adapter
    name) + non_lora_state_dict.pth (reward head) over the base Qwen2-VL weights. Same scores as model.pth."""
    from safetensors.torch import save_file
    base, root, _, _, state, _, cfg = videoalign_dirs
    lora = {k.replace(".default", ""): v for k, v in state.items() if ".lora_" in k}
    non_lora = {k: v for k, v in state.items() if k.endswith("rm_head.weight")}
    base_weights = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in state.items()
                    if ".lora_" not in k and k not in non_lora}
    with_weights, adapter_root = tmp_path / "qwen2vl", tmp_path / "videoreward"
    shutil.copytree(base, with_weights)
    save_file({k: v.contiguous() for k, v in base_weights.items()}, with_weights / "model.safetensors")
    (adapter_root / "checkpoint-3").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, adapter_root / "checkpoint-3" / "adapter_model.safetensors")
    torch.save(non_lora, adapter_root / "checkpoint-3" / "non_lora_state_dict.pth")
    (adapter_root / "model_config.json").write_text(json.dumps(cfg))
    videos = torch.rand(2, 6, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    prompts = ["a dog runs on the beach", "snow falls"]
    full = rewards.REWARDS["videoalign_mq"]("cpu", path=root, base=base)(videos, prompts)
    adapter = rewards.REWARDS["videoalign_mq"]("cpu", path=str(adapter_root), base=str(with_weights))(videos, prompts)
    torch.testing.assert_close(adapter, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="base Qwen2-VL weights"):  # the config-only base folder
        rewards.REWARDS["videoalign_mq"]("cpu", path=str(adapter_root), base=base)(videos, prompts)


def test_videoalign_samples_frames_by_the_videos_fps(videoalign_dirs, monkeypatch):
    """The official scripts save each video at --fps and VideoAlign resamples it to 2 frames a second: the
    frame rate the train script passes changes which frames are scored."""
    base, root, *_ = videoalign_dirs
    videos = torch.rand(1, 17, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("DANCEGRPO_VIDEOALIGN_PATH", root)
    monkeypatch.setenv("DANCEGRPO_QWEN2VL_PATH", base)
    spec = rewards.parse_reward_spec("videoalign_vq")
    at = {fps: rewards.build_scorers(spec, "cpu", video_fps=fps)[0](videos, ["waves"]) for fps in (8, 2)}
    direct = rewards.REWARDS["videoalign_vq"]("cpu", path=root, base=base, fps=2.0)
    torch.testing.assert_close(at[2], direct(videos, ["waves"]))
    assert not torch.allclose(at[8], at[2])


# ---------------------------------------------------------------- HPSv3 on a tiny Qwen2-VL

@pytest.fixture(scope="module")
def hpsv3_dirs(tmp_path_factory):
    """Base folder (Qwen2-VL config + tokenizer) and HPSv3.safetensors as hpsv3/train.py builds the model:
    <|Reward|> added to the tokenizer, embeddings resized to it, the ranknet rm_head (written out here)."""
    from safetensors.torch import save_file
    base, root = tmp_path_factory.mktemp("qwen2vl_7b"), tmp_path_factory.mktemp("hpsv3")
    tok, model = tiny_qwen2vl(base, extra_vocab=5)
    tok.add_tokens(["<|Reward|>"], special_tokens=True)
    model.resize_token_embeddings(len(tok))  # shrinks the padded vocabulary, as for the 7B model
    model.rm_head = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                                        torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model.eval()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # model.visual.*, model.language_model.*
    save_file(state, root / "HPSv3.safetensors")
    return str(base), str(root), model, tok, state


def hpsv3_reference(model, tok, images_u8, prompts):
    """hpsv3/inference.py, written out: the chat text by hand, transformers' Qwen2-VL image processor for
    the pixels (uint8 in, rescaled and normalised there), then Qwen2VLRewardModelBT.forward (image features scattered into the
    embeddings, the text model run without input_ids, so sequential positions; rm_head at <|Reward|>)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    instruction = rewards.HPSV3_PROMPT.removesuffix("\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n")
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
             "<|vision_end|>" + instruction.format(text_prompt=p)
             + "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n"
             for p in prompts]
    batch = Qwen2VLImageProcessorPil()(images=[im.permute(1, 2, 0).numpy() for im in images_u8], return_tensors="pt")
    # what Qwen2VLProcessor does (not built here: it needs torchvision): one <|image_pad|> per 2x2 merged patches
    texts = [t.replace("<|image_pad|>", "<|image_pad|>" * (g.prod().item() // 4)) for t, g in zip(texts, batch.image_grid_thw)]
    batch.update(tok(texts, padding=True, padding_side="right", return_tensors="pt"))
    ids = batch.input_ids
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids)
        image = torch.cat(model.model.get_image_features(batch.pixel_values, batch.image_grid_thw).pooler_output)
        embeds[ids == model.config.image_token_id] = image
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.rm_head(hidden.float())  # [B, L, 2]
    return logits[ids == tok.convert_tokens_to_ids("<|Reward|>")].view(len(prompts), -1), batch


def test_hpsv3_matches_the_reference_inference(hpsv3_dirs):
    base, root, model, tok, _ = hpsv3_dirs
    images_u8 = torch.randint(0, 256, (2, 3, 448, 448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red kite over the hills", "snow {falls}"]  # different lengths: right padding in the batch
    mu_sigma, batch = hpsv3_reference(model, tok, images_u8, prompts)
    ids, mask, pixels, grid = rewards.hpsv3_inputs(images_u8 / 255, prompts, tok, model.config.vision_config)
    torch.testing.assert_close(pixels, batch.pixel_values.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, batch.input_ids) and torch.equal(grid, batch.image_grid_thw)
    assert grid.tolist() == [[1, 32, 32]] * 2  # 448 x 448 = 256 * 28 * 28 pixels: 256 image tokens
    scorer = rewards.REWARDS["hpsv3"]("cpu", path=root, base=base)
    ours = scorer(images_u8 / 255, prompts)
    assert mu_sigma.shape == (2, 2) and not torch.allclose(mu_sigma[:, 0], mu_sigma[:, 1])
    torch.testing.assert_close(ours, mu_sigma[:, 0], atol=1e-4, rtol=1e-4)  # the reward is mu
    alone = torch.cat([scorer(images_u8[i:i + 1] / 255, prompts[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)  # batching changes nothing


def test_hpsv3_resizes_to_its_pixel_budget_and_reads_both_key_layouts(hpsv3_dirs, tmp_path):
    from safetensors.torch import save_file
    base, root, model, tok, state = hpsv3_dirs
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    ids, _, _, grid = rewards.hpsv3_inputs(images, ["a", "b"], tok, model.config.vision_config)
    assert grid.tolist() == [[1, 32, 32]] * 2 and (ids == model.config.image_token_id).sum(1).tolist() == [256, 256]
    old = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in state.items()}
    save_file(old, tmp_path / "HPSv3.safetensors")  # transformers 4.4x names: visual.*, model.* (text)
    new = rewards.REWARDS["hpsv3"]("cpu", path=root, base=base)(images, ["a cat", "a dog"])
    torch.testing.assert_close(rewards.REWARDS["hpsv3"]("cpu", path=str(tmp_path / "HPSv3.safetensors"), base=base)(
        images, ["a cat", "a dog"]), new)
    assert not torch.allclose(new[0], new[1])
    with pytest.raises(FileNotFoundError, match="DANCEGRPO_HPSV3_PATH"):  # a folder without a checkpoint fails at once
        rewards.REWARDS["hpsv3"]("cpu", path=base, base=base)


def test_hpsv3_prompt_is_the_official_text():
    p = rewards.HPSV3_PROMPT  # INSTRUCTION + prompt_with_special_token; trailing spaces are model input
    assert p.startswith("\nYou are tasked with evaluating a generated image") and p.count("{text_prompt}") == 1
    assert "best. \n\n**Visual Quality:**  \n" in p and "lowest possible. \n\n**Text Alignment:**  \n" in p
    assert p.endswith("Textual prompt - {text_prompt}\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n")
    assert len(p) == 2590


def test_hpsv3_without_its_base_fails_naming_the_variable(hpsv3_dirs, monkeypatch, tmp_path):
    import huggingface_hub.constants
    _, root, *_ = hpsv3_dirs
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("DANCEGRPO_HPSV3_BASE", raising=False)
    with pytest.raises(FileNotFoundError, match="DANCEGRPO_HPSV3_BASE"):
        rewards.REWARDS["hpsv3"]("cpu", path=root)
