"""The digits demo: the tiny-digits preset through the ordinary FLUX paths, its pretraining, the digit rewards and
the diversity figure, and GRPO raising the judged fraction of the target digit. CPU, offline."""

import json

import torch

import digits
import models
import rewards
import sampling
import sde
import train_image

H = W = 8


def test_shipped_weights_load_without_randomness():
    state = torch.get_rng_state()
    a, b = models.load_pipeline("tiny-digits"), models.load_pipeline("tiny-digits", seed=1)  # seed: not used
    assert torch.equal(state, torch.get_rng_state())
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(a.prompt_embedding[k], b.prompt_embedding[k]) for k in a.prompt_embedding)
    assert sum(p.numel() for p in a.transformer.parameters()) == 84228
    assert a.vae is None and a.text_encoder is None and a.text_encoder_2 is None
    assert models.DIGITS_WEIGHTS.stat().st_size < 400_000
    from safetensors import safe_open
    with safe_open(models.DIGITS_WEIGHTS, "pt") as f:  # the file says how it was made
        assert f.metadata() == {"command": "python digits.py --pretrain --seed 0 --steps 4000"}


def test_tiny_digits_goes_through_the_flux_paths():
    pipe = models.load_pipeline("tiny-digits")
    x = models.initial_noise(pipe, 2, H, W, None, torch.Generator().manual_seed(0))
    assert x.shape == (2, 16, 4)  # 8x8 grey pixels packed 2x2 into 16 tokens, as FluxPipeline packs latents
    cond = models.encode_prompts(pipe, ["a", "another prompt", ""], "cpu")
    assert cond["prompt_embeds"].shape == (3, 1, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    assert all(torch.equal(v[0], v[2]) for v in cond.values())  # a constant: the prompt does not matter
    images = digits.to_images(digits.split()[2][:5])  # real digits [5, 3, 8, 8] in [0, 1]
    packed = pipe._pack_latents(images[:, :1] * 2 - 1, 5, 1, H, W)
    torch.testing.assert_close(models.decode(pipe, packed, H, W), images)
    out = models.predict(pipe, x, torch.tensor([1.0, 0.3]), {k: v[:2] for k, v in cond.items()}, guidance_scale=1.0,
                         height=H, width=W)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    d = models.model_defaults("tiny-digits")
    assert (d["height"], d["num_steps"], d["eta"], d["shift"], d["reward"]) == (8, 10, 0.7, 3.0, "digit")


def test_eta0_sampling_equals_the_pipelines_own_call():
    """sde.rollout at eta 0 with models.predict is FluxPipeline's own sampler, given the constant embedding."""
    pipe = models.load_pipeline("tiny-digits")
    x = models.initial_noise(pipe, 2, H, W, None, torch.Generator().manual_seed(0))
    cond = models.encode_prompts(pipe, ["", ""], "cpu")
    steps, sigmas = 4, sde.flow_sigmas(4, 3.0)
    with torch.no_grad():
        _, _, final = sde.rollout(lambda z, i: models.predict(pipe, z, sigmas[i].expand(2), cond, guidance_scale=1.0,
                                                               height=H, width=W),
                                  x, sigmas, 0.0, "flow", None)
        reference = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                         latents=x, height=H, width=W, num_inference_steps=steps,
                         sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist(), output_type="latent").images
    torch.testing.assert_close(final, reference, atol=1e-5, rtol=1e-5)


def test_pretraining_loss_falls_and_is_deterministic():
    a, losses = digits.pretrain(steps=40, batch_size=32, log_every=0)
    b, _ = digits.pretrain(steps=40, batch_size=32, log_every=0)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(a.prompt_embedding[k], b.prompt_embedding[k]) for k in a.prompt_embedding)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_classifiers_held_out_accuracy():
    _, _, x_test, y_test = digits.split()
    images = digits.to_images(x_test)  # through the images-to-features mapping the rewards use
    assert x_test.shape == (450, 64)
    assert (digits.probabilities(images).argmax(1) == y_test).mean() > 0.96  # 0.969
    assert (digits.judged(images) == y_test).mean() > 0.985  # 0.993


def test_digit_rewards_score_the_target_digit():
    _, _, x_test, y_test = digits.split()
    images, prompts = digits.to_images(x_test[:100]), [""] * 100
    threes = torch.from_numpy(y_test[:100] == 3)
    p = rewards.REWARDS["digit"]("cpu")(images, prompts)
    assert p.shape == (100,) and p[threes].mean() > 0.8 and p[~threes].mean() < 0.1
    judged = rewards.REWARDS["digit_judge"]("cpu")(images, prompts)
    assert set(judged.tolist()) <= {0.0, 1.0}
    assert judged.mean() == (torch.from_numpy(digits.judged(images)) == 3).float().mean()  # the fraction of 3s
    sevens = torch.from_numpy(y_test[:100] == 7)
    digit, binary = rewards.build_scorers(rewards.parse_reward_spec("digit,digit@0.5"), "cpu", target_digit=7)
    assert digit(images, prompts)[sevens].mean() > 0.8
    assert torch.equal(binary(images, prompts), (digit(images, prompts) > 0.5).float())
    big = images.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 32x32: area-averaged back to 8x8
    torch.testing.assert_close(rewards.REWARDS["digit"]("cpu")(big, prompts), p)
    try:
        rewards.REWARDS["digit"]("cpu", target=10)
        raise AssertionError("target 10 accepted")
    except ValueError:
        pass


def test_diversity_separates_real_digits_noise_and_one_image():
    x_test = digits.split()[2]
    real = digits.diversity(digits.to_images(x_test[:200]))
    noise = digits.diversity(torch.rand(200, 3, H, W, generator=torch.Generator().manual_seed(0)))
    same = digits.diversity(digits.to_images(x_test[:1]).repeat(200, 1, 1, 1))
    assert real["distinct_neighbours"] > 150 and real["nn_distance"] < 0.15
    assert noise["nn_distance"] > 2 * real["nn_distance"]
    assert same["distinct_neighbours"] == 1 and same["neighbour_fraction"] == 1 / 200


def judged_fraction(pipe, args, n=64):
    """The judge's fraction of 3s on n samples from fixed noise, sampled deterministically (eta 0)."""
    schedule = sampling.schedule_for(pipe, args).with_eta(0.0)
    noise = models.initial_noise(pipe, n, H, W, None, torch.Generator().manual_seed(1234))
    cond = models.encode_prompts(pipe, [""] * n, "cpu")
    _, _, final = sampling.sample(pipe, cond, noise, schedule, args, None)
    return rewards.REWARDS["digit_judge"]("cpu")(models.decode(pipe, final, H, W), [""] * n).mean().item()


def test_grpo_on_digits_raises_the_judged_fraction_of_threes(tmp_path):
    """A few dozen iterations of the demo move the judged fraction of 3s far above the base model's: a policy loss
    multiplied by 0 (only the KL left) would keep it near the base, a flipped advantage sign would lower it."""
    argv = ["--model", "tiny-digits", "--reward", "digit", "--iterations", "30", "--seed", "0",
            "--output_dir", str(tmp_path)]  # the default KL, 0.8 (Flow-GRPO's kl_loss scale)
    args = train_image.parse_args(argv)
    base = judged_fraction(models.load_pipeline("tiny-digits"), args)
    pipe, _ = train_image.main(argv)
    after = judged_fraction(pipe, args)
    assert base < 0.25 and after > 0.6, (base, after)
    # the held-out rows (every 10 iterations, the judge as their reward) carry the diversity figure, and the
    # judge's fraction there rises too
    held = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_" in line]
    assert [r["iteration"] for r in held] == [0, 10, 20, 30]
    assert held[-1]["eval_reward_digit_judge"] > held[0]["eval_reward_digit_judge"]
    assert all(1 <= r["eval_distinct_neighbours"] <= 16 and 0 < r["eval_nn_distance"] < 1 for r in held)
