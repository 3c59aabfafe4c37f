"""models.py: the tiny presets go through the real diffusers pipelines, predict() matches what those pipelines do,
and the conventions (layouts, timestep scaling, CFG, DDIM schedule) hold. All offline, CPU, seconds."""
import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import models
import sde

# Tiny models: one intra-op thread. With two threads on a 2-core machine that is busy elsewhere, OpenMP spinning
# makes these ~1 ms ops 10-100x slower (the whole file: ~5 s with one thread, >60 s with two under load).

H = W = 32
FRAMES = 9
PROMPTS = ["a photo of a cat", "a red car on a wet road, at night", "Zebra! 日本"]
REAL = {"tiny-flux": "flux", "tiny-sd": "sd14", "tiny-hunyuan": "hunyuan", "tiny-skyreels": "skyreels",
        "tiny-sd35": "sd35", "tiny-wan": "wan", "tiny-qwenimage": "qwenimage"}


@pytest.fixture(scope="module", params=models.TINY)
def tiny(request):
    """(name, pipeline, prompt conditioning, extra) for one tiny preset, built once per module."""
    name = request.param
    pipe = models.load_pipeline(name)
    cond = models.encode_prompts(pipe, PROMPTS, "cpu")
    extra = None
    if name == "tiny-skyreels":
        extra = models.encode_image_condition(pipe, torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(1)),
                                              FRAMES, torch.Generator().manual_seed(2))
    return name, pipe, cond, extra


def frames(name):
    return FRAMES if models.FAMILY[name] in ("hunyuan", "skyreels", "wan") else None


def timesteps(name, n, value=0.7):
    """t: Tensor[n], a sigma for flow models, an integer DDPM timestep for SD."""
    if models.FAMILY[name] == "sd":
        return torch.full([n], int(value * 1000), dtype=torch.long)
    return torch.full([n], value)


def noise(pipe, name, n, seed=0):
    return models.initial_noise(pipe, n, H, W, frames(name), torch.Generator().manual_seed(seed))


def test_tiny_weights_are_seeded_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a, b = models.load_pipeline("tiny-flux"), models.load_pipeline("tiny-flux")
    assert torch.equal(state, torch.get_rng_state())
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = models.load_pipeline("tiny-flux", seed=1)
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


def test_encode_prompts_is_batch_first(tiny):
    name, pipe, cond, _ = tiny
    assert cond, name
    for key, value in cond.items():
        assert value.shape[0] == len(PROMPTS), key
    idx = torch.tensor([2, 2, 0])  # the train scripts index the conditioning with sample indices
    assert all(v[idx].shape[0] == 3 for v in cond.values())
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    if models.FAMILY[name] in ("sd", "skyreels", "sd35", "wan"):  # unconditional branch: the empty prompt, same for every sample
        neg = cond["negative_prompt_embeds"]
        assert neg.shape == cond["prompt_embeds"].shape and torch.equal(neg[0], neg[2])


def test_initial_noise_layout_and_reproducibility(tiny):
    name, pipe, _, _ = tiny
    x = noise(pipe, name, 2)
    expected = {"flux": (2, (H // 2 // 2) * (W // 2 // 2), 64), "sd": (2, 4, H // 4, W // 4),
                "hunyuan": (2, 4, 3, H // 4, W // 4), "skyreels": (2, 4, 3, H // 4, W // 4),
                "sd35": (2, 16, H // 2, W // 2), "wan": (2, 4, 3, H // 4, W // 4),
                "qwenimage": (2, (H // 2 // 2) * (W // 2 // 2), 16)}[models.FAMILY[name]]
    assert x.shape == expected and x.dtype == torch.float32
    assert torch.equal(x, noise(pipe, name, 2))
    assert not torch.equal(x, noise(pipe, name, 2, seed=1))


def test_predict_shape_finite_and_prompt_dependent(tiny):
    name, pipe, cond, extra = tiny
    x = noise(pipe, name, 1).repeat(3, *[1] * (noise(pipe, name, 1).dim() - 1))  # same latents for all prompts
    with torch.no_grad():
        g = models.model_defaults(name)["guidance_scale"]
        out = models.predict(pipe, x, timesteps(name, 3), cond, guidance_scale=g, height=H, width=W,
                             extra=extra)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_predict_gradients_flow_and_match_no_grad(tiny):
    name, pipe, cond, extra = tiny
    x, t, g = noise(pipe, name, 3), timesteps(name, 3), models.model_defaults(name)["guidance_scale"]
    net = models.trained_module(pipe)
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = models.predict(pipe, x, t, cond, guidance_scale=g, height=H, width=W, extra=extra)
    out = models.predict(pipe, x, t, cond, guidance_scale=g, height=H, width=W, extra=extra)
    assert torch.equal(out, ref)  # rollout (no_grad) and training recompute give the same numbers: ratio = 1
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(gr.abs().sum() for gr in grads) > 0
    frozen = [m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module) and m is not net]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())
    net.zero_grad(set_to_none=True)


def test_decode_gives_pictures_in_unit_range(tiny):
    name, pipe, _, _ = tiny
    x = noise(pipe, name, 2)
    pictures = models.decode(pipe, x, H, W)
    shape = (2, FRAMES, 3, H, W) if frames(name) else (2, 3, H, W)
    assert pictures.shape == shape and pictures.min() >= 0 and pictures.max() <= 1


def test_save_pretrained_round_trip_through_real_loading_path(tiny, tmp_path):
    name, pipe, cond, extra = tiny
    pipe.save_pretrained(tmp_path)
    loaded = models.load_pipeline(REAL[name], model_path=str(tmp_path))
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
    cond2 = models.encode_prompts(loaded, PROMPTS, "cpu")
    assert all(torch.equal(cond[k], cond2[k]) for k in cond)
    x, t, g = noise(pipe, name, 3), timesteps(name, 3), models.model_defaults(name)["guidance_scale"]
    with torch.no_grad():
        assert torch.equal(models.predict(pipe, x, t, cond, guidance_scale=g, height=H, width=W, extra=extra),
                           models.predict(loaded, x, t, cond2, guidance_scale=g, height=H, width=W, extra=extra))


def test_real_name_without_weights_fails_fast():
    start = time.time()
    with pytest.raises(RuntimeError) as err:
        models.load_pipeline("flux")
    assert time.time() - start < 10
    assert "--model_path" in str(err.value) and "tiny-flux" in str(err.value)
    for name in ("sd14", "sd35", "wan", "qwenimage"):
        with pytest.raises(RuntimeError, match="--model_path"):
            models.load_pipeline(name, model_path="/nonexistent/weights")
    with pytest.raises(ValueError):
        models.load_pipeline("flux2")


def _euler_velocity(out_latents, x):
    """One Euler step from sigma = 1 to 0: out = x + (0 - 1) * v, so v = x - out."""
    return x - out_latents


def test_flux_predict_matches_flux_pipeline():
    """Independent reference: FluxPipeline.__call__ with one step from sigma 1 (timestep / 1000, guidance embed)."""
    pipe = models.load_pipeline("tiny-flux")
    cond = models.encode_prompts(pipe, PROMPTS[:2], "cpu")
    x = noise(pipe, "tiny-flux", 2)
    out = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], latents=x,
               height=H, width=W, num_inference_steps=1, sigmas=[1.0], guidance_scale=3.5, output_type="latent").images
    v = models.predict(pipe, x, torch.ones(2), cond, guidance_scale=3.5, height=H, width=W)
    torch.testing.assert_close(v, _euler_velocity(out, x), atol=1e-5, rtol=1e-5)
    packed, _ = pipe.prepare_latents(2, 16, H, W, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(packed, x)  # the pipeline's own noise draw


def test_hunyuan_predict_matches_hunyuan_pipeline():
    pipe = models.load_pipeline("tiny-hunyuan")
    cond = models.encode_prompts(pipe, PROMPTS[:2], "cpu")
    x = noise(pipe, "tiny-hunyuan", 2)
    out = pipe(prompt=PROMPTS[:2], latents=x, height=H, width=W, num_frames=FRAMES, num_inference_steps=1,
               sigmas=[1.0], guidance_scale=6.0, output_type="latent",
               prompt_template=models._hunyuan_template(pipe.tokenizer)).frames
    v = models.predict(pipe, x, torch.ones(2), cond, guidance_scale=6.0, height=H, width=W)
    torch.testing.assert_close(v, _euler_velocity(out, x), atol=1e-5, rtol=1e-5)


def test_skyreels_predict_matches_pipeline_and_depends_on_image():
    """HunyuanSkyreelsImageToVideoPipeline with true CFG against the empty prompt and embedded guidance 1."""
    pipe = models.load_pipeline("tiny-skyreels")
    cond = models.encode_prompts(pipe, PROMPTS[:2], "cpu")
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3))
    extra = models.encode_image_condition(pipe, image, FRAMES, torch.Generator().manual_seed(4))
    lat = extra["image_latents"]  # [B, C, f, h, w]: the first frame's latent, zeros after it
    assert lat.shape == (2, 4, 3, H // 4, W // 4) and lat[:, :, 1:].abs().max() == 0 and lat[:, :, 0].abs().max() > 0
    x = noise(pipe, "tiny-skyreels", 2)
    out = pipe(image=image, prompt=PROMPTS[:2], negative_prompt=["", ""], latents=x, height=H, width=W,
               num_frames=FRAMES, num_inference_steps=1, sigmas=[1.0], true_cfg_scale=5.0, guidance_scale=1.0,
               output_type="latent", generator=torch.Generator().manual_seed(4),
               prompt_template=models._hunyuan_template(pipe.tokenizer)).frames
    v = models.predict(pipe, x, torch.ones(2), cond, guidance_scale=5.0, height=H, width=W, extra=extra)
    torch.testing.assert_close(v, _euler_velocity(out, x), atol=1e-4, rtol=1e-4)
    other = models.encode_image_condition(pipe, 1 - image, FRAMES, torch.Generator().manual_seed(4))
    other_v = models.predict(pipe, x, torch.ones(2), cond, guidance_scale=5.0, height=H, width=W, extra=other)
    assert not torch.allclose(v, other_v)


def _pipeline_call(pipe, name, x, steps, guidance):
    """The pipeline's own __call__ from latents x along linspace(1, 0, T + 1) (the scheduler applies its shift)."""
    sigmas = torch.linspace(1, 0, steps + 1)[:-1].tolist()
    common = dict(latents=x, height=H, width=W, num_inference_steps=steps, sigmas=sigmas, guidance_scale=guidance,
                  output_type="latent")
    if name == "tiny-sd35":
        return pipe(prompt=PROMPTS[:2], max_sequence_length=models.TINY_TEXT_LEN, **common).images
    if name == "tiny-qwenimage":  # no negative prompt: no CFG, as the official Qwen-Image GRPO
        return pipe(prompt=PROMPTS[:2], **common).images
    if name == "tiny-wan":  # WanPipeline.__call__ takes no sigmas: its scheduler is handed them instead
        set_timesteps = pipe.scheduler.set_timesteps
        pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas, device=device)
        del common["sigmas"]
        try:
            return pipe(prompt=PROMPTS[:2], num_frames=FRAMES, max_sequence_length=models.TINY_TEXT_LEN, **common).frames
        finally:
            pipe.scheduler.set_timesteps = set_timesteps


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-wan", "tiny-qwenimage"])
def test_eta0_sampling_equals_the_pipelines_own_call(name):
    """sde.rollout with eta = 0 along sde.flow_sigmas (the model's shift) and models.predict is the pipeline's own
    sampler (FlowMatchEulerDiscreteScheduler, same noise, schedule and guidance) over several steps."""
    pipe = models.load_pipeline(name)
    d = models.model_defaults(name)
    assert pipe.scheduler.config.shift == d["shift"]  # the pipeline shifts the sigmas it is given by its own shift
    cond = models.encode_prompts(pipe, PROMPTS[:2], "cpu")
    x, steps = noise(pipe, name, 2), 4
    sigmas = sde.flow_sigmas(steps, d["shift"])
    with torch.no_grad():
        call = dict(guidance_scale=d["guidance_scale"], height=H, width=W)
        _, _, final = sde.rollout(lambda z, i: models.predict(pipe, z, sigmas[i].expand(2), cond, **call),
                                  x, sigmas, 0.0, "flow", None)
        reference = _pipeline_call(pipe, name, x, steps, d["guidance_scale"])
    torch.testing.assert_close(final, reference, atol=1e-5, rtol=1e-5)
    assert (final - x).abs().mean() > 0.1  # it did move


def test_qwenimage_template_prefix_is_dropped_and_padding_is_masked():
    """QwenImagePipeline keeps the text encoder's states after the prompt template's prefix; shorter prompts of a
    batch are zero-padded and masked, and the mask reaches the transformer (padding cannot change the prediction)."""
    pipe = models.load_pipeline("tiny-qwenimage")
    cond = models.encode_prompts(pipe, ["zebra", "a much longer prompt about a zebra"], "cpu")
    mask = cond["prompt_embeds_mask"]
    assert mask[1].all() and mask[0].sum() == len(pipe.tokenizer("zebra<|im_end|>\n<|im_start|>assistant\n").input_ids)
    assert cond["prompt_embeds"][0, mask[0].sum():].abs().max() == 0
    alone = models.encode_prompts(pipe, ["zebra"], "cpu")
    x = noise(pipe, "tiny-qwenimage", 1)
    with torch.no_grad():
        padded = models.predict(pipe, x, torch.full([1], 0.7), {k: v[:1] for k, v in cond.items()}, guidance_scale=1.0,
                                height=H, width=W)
        single = models.predict(pipe, x, torch.full([1], 0.7), alone, guidance_scale=1.0, height=H, width=W)
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)


def test_hunyuan_prompt_template_crop_keeps_only_the_prompt():
    pipe = models.load_pipeline("tiny-hunyuan")
    template = models._hunyuan_template(pipe.tokenizer)
    ids = pipe.tokenizer(template["template"].format("zebra")).input_ids
    kept = pipe.tokenizer.convert_ids_to_tokens(ids[template["crop_start"]:])
    assert "".join(kept).startswith("zebra")
    mask = models.encode_prompts(pipe, ["zebra", ""], "cpu")["prompt_attention_mask"]  # [B, 256], right padded
    assert mask.shape == (2, models.HUNYUAN_TEXT_LEN) and mask[0, :5].all() and mask[1].sum() < mask[0].sum()


def test_sd_ddim_schedule_matches_ddim_scheduler():
    pipe = models.load_pipeline("tiny-sd")
    timesteps, alpha_bars = models.ddim_schedule(pipe, 50)
    acp = pipe.scheduler.alphas_cumprod
    assert timesteps.dtype == torch.long and timesteps.shape == (50,) and alpha_bars.shape == (51,)
    assert timesteps[0] == 981 and timesteps[-1] == 1  # SD v1.4: steps_offset = 1
    assert alpha_bars[0] == acp[981] and alpha_bars[-1] == acp[0]  # set_alpha_to_one = False
    assert (alpha_bars[1:] > alpha_bars[:-1]).all()
    # independent reference: DDIMScheduler.step with eta = 0 goes from alpha_bars[i] to alpha_bars[i + 1]
    sched = pipe.scheduler
    sched.set_timesteps(50)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i in (0, 17, 49):
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        mine = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(mine, sched.step(eps, timesteps[i], x, eta=0.0).prev_sample)


def test_tiny_sd35_scheduler_is_sd35_mediums():
    """stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler with
    num_train_timesteps 1000 and shift 3.0, nothing else set (every other key at the class default)."""
    hub = FlowMatchEulerDiscreteScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                       "num_train_timesteps": 1000, "shift": 3.0})
    scheduler = models.load_pipeline("tiny-sd35").scheduler
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(scheduler.config) == public(hub.config)


def test_flow_schedule_is_the_sd35_pipelines_own():
    """models.flow_schedule against the sigmas StableDiffusion3Pipeline.__call__ really samples with (its scheduler after
    the call, and the timesteps its transformer receives), and against a hand computation from diffusers' formulas."""
    pipe = models.load_pipeline("tiny-sd35")
    sigmas = models.flow_schedule(pipe, 10)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()),
                                                      with_kwargs=True)
    try:
        pipe(prompt=PROMPTS[:1], height=H, width=W, num_inference_steps=10, guidance_scale=4.5, output_type="latent",
             max_sequence_length=models.TINY_TEXT_LEN, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    torch.testing.assert_close(torch.tensor(seen) / 1000, sigmas[:-1])  # predict passes sigma * 1000 the same way
    shift = lambda t: 3 * t / (1 + 2 * t)  # shift 3
    t = torch.linspace(1, shift(torch.tensor(1 / 1000, dtype=torch.float64)), 10, dtype=torch.float64)
    hand = torch.cat([shift(t), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sigmas.double(), hand, rtol=1e-6, atol=1e-7)
    assert (sigmas - sde.flow_sigmas(10, 3.0)).abs().max() > 0.2  # not DanceGRPO's schedule: 0.0089 vs 0.25 at step 9


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd"])
def test_flow_schedule_refuses_resolution_shifted_or_ddim_schedulers(name):
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        models.flow_schedule(models.load_pipeline(name), 10)


def _grads(net, scalar):
    net.zero_grad(set_to_none=True)
    scalar().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-wan"])
def test_cfg_training_gradient_flows_as_the_official_code(name):
    """SD3.5 (Flow-GRPO train_sd3.py:190, noise_pred_uncond.detach()): the gradient of the guided prediction is
    s times the conditional branch's. Wan (DanceGRPO train_grpo_wan_2_1.py:238-248, no detach): s cond + (1 - s) uncond.
    Each branch is called here on its own, as predict calls the transformer for it. float64 weights: batched and
    single float32 calls differ by ~1e-6, more than the effect of predict's float32 guidance arithmetic (~1e-7)."""
    pipe, s = models.load_pipeline(name, dtype=torch.float64), 4.5
    cond, net = models.encode_prompts(pipe, PROMPTS[:2], "cpu"), pipe.transformer
    x, t = noise(pipe, name, 2), torch.tensor([0.9, 0.4])
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # any scalar of the output
    extra = {"pooled_projections": cond["pooled_prompt_embeds"]} if name == "tiny-sd35" else {}
    neg = {"pooled_projections": cond["negative_pooled_prompt_embeds"]} if name == "tiny-sd35" else {}
    branch = lambda embeds, kw: net(hidden_states=x.double(), timestep=t * 1000, encoder_hidden_states=embeds, **kw,
                                    return_dict=False)[0].float()
    guided = _grads(net, lambda: (models.predict(pipe, x, t, cond, guidance_scale=s, height=H, width=W) * w).sum())
    text = _grads(net, lambda: (branch(cond["prompt_embeds"], extra) * w).sum())
    uncond = _grads(net, lambda: (branch(cond["negative_prompt_embeds"], neg) * w).sum())
    assert len(guided) == len(text) == len(uncond) > 0
    for g, gt, gu in zip(guided, text, uncond):
        expected = s * gt if name == "tiny-sd35" else s * gt + (1 - s) * gu
        # predict's float32 guidance: each parameter's gradient is right to ~1e-7 of its largest element
        torch.testing.assert_close(g, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_sd_cfg_equals_two_separate_unet_calls():
    pipe = models.load_pipeline("tiny-sd")
    cond = models.encode_prompts(pipe, PROMPTS, "cpu")
    x, t = noise(pipe, "tiny-sd", 3), torch.tensor([981, 501, 21])
    with torch.no_grad():
        guided = models.predict(pipe, x, t, cond, guidance_scale=5.0, height=H, width=W)
        uncond = pipe.unet(x, t, encoder_hidden_states=cond["negative_prompt_embeds"]).sample
        text = pipe.unet(x, t, encoder_hidden_states=cond["prompt_embeds"]).sample
        plain = models.predict(pipe, x, t, cond, guidance_scale=1.0, height=H, width=W)
    torch.testing.assert_close(guided, uncond + 5.0 * (text - uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, text)


@pytest.mark.parametrize("name", models.TINY)
def test_bf16_pipeline_returns_float32_prediction(name):
    pipe = models.load_pipeline(name, dtype=torch.bfloat16)
    cond = models.encode_prompts(pipe, PROMPTS[:2], "cpu")
    assert cond["prompt_embeds"].dtype == torch.bfloat16
    extra = None
    if name == "tiny-skyreels":
        extra = models.encode_image_condition(pipe, torch.rand(2, 3, H, W), FRAMES)
    x, g = noise(pipe, name, 2), models.model_defaults(name)["guidance_scale"]
    out = models.predict(pipe, x, timesteps(name, 2), cond, guidance_scale=g, height=H, width=W, extra=extra)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert torch.isfinite(models.decode(pipe, x, H, W)).all()


def test_model_defaults():
    flux, sd, hunyuan, sky = (models.model_defaults(m) for m in ("flux", "sd14", "hunyuan", "skyreels"))
    assert (flux["num_steps"], flux["shift"], flux["eta"], flux["group_size"], flux["timestep_fraction"]) == \
        (16, 3.0, 0.3, 12, 0.6)
    assert (sd["num_steps"], sd["eta"], sd["guidance_scale"], sd["timestep_fraction"]) == (50, 1.0, 5.0, 1.0)
    assert (hunyuan["shift"], hunyuan["eta"], hunyuan["group_size"], hunyuan["keep"]) == (5.0, 0.25, 24, 8)
    assert (sky["shift"], sky["height"], sky["width"], sky["num_frames"], sky["guidance_scale"]) == \
        (7.0, 400, 640, 53, 5.0)
    for d in (flux, sd, hunyuan, sky):
        assert d["lr"] == 1e-5 and d.get("lora_rank", 0) == 0
    sd35 = models.model_defaults("sd35", lora=None)  # Flow-GRPO's pickscore_sd3 (config/grpo.py)
    assert (sd35["num_steps"], sd35["guidance_scale"], sd35["height"], sd35["group_size"], sd35["lora_rank"]) == \
        (10, 4.5, 512, 24, 32)
    wan = models.model_defaults("wan")  # finetune_wan_2_1_grpo.sh
    assert (wan["num_frames"], wan["height"], wan["num_steps"], wan["guidance_scale"], wan["group_size"]) == \
        (1, 512, 20, 5.0, 12)
    qwen = models.model_defaults("qwenimage")  # finetune_qwenimage_grpo.sh
    assert (qwen["height"], qwen["num_steps"], qwen["shift"], qwen["guidance_scale"], qwen["iterations"]) == \
        (720, 20, 3.0, 1.0, 300)
    for name in models.TINY:
        d = models.model_defaults(name)
        assert d["height"] == H and d["width"] == W and d["num_steps"] <= 10 and d["lr"] >= 1e-4
        assert d.get("num_frames") == (1 if name == "tiny-wan" else frames(name))  # Wan: single frames by default
