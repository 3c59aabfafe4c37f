"""SDE sampling with Gaussian log-probabilities: the policy of DanceGRPO.

DanceGRPO (Xue et al. 2025, arXiv 2505.07818) turns a deterministic sampler into a
stochastic policy so GRPO has a likelihood to optimise. Each denoising step is a
Gaussian transition x_t -> x_{t-1} ~ N(mean, std^2); its log-density is what the
clipped GRPO objective (grpo.py) compares before and after an update.

  flow_sigmas     the rectified-flow noise schedule with the SD3 time shift
  flow_grpo_etas  per-step etas that make flow_sde_step Flow-GRPO's SDE (SD3.5-M)    arXiv 2505.05470
  flow_sde_step   one step of the rectified-flow SDE (FLUX, HunyuanVideo, SkyReels)   Sec. 3.2
  ddim_sde_step   one step of the DDIM SDE (Stable Diffusion), as in DDPO            Sec. 3.2
  rollout         a whole batched trajectory, keeping every latent and log-prob; an eta per step
                  mixes SDE and ODE steps (MixGRPO's sliding window, arXiv 2507.21802)
  window_etas     eta inside a window of steps, 0 (an ODE step) outside it                 MixGRPO
  window_plan     the schedule and etas of a windowed rollout
  tree_rollout    BranchGRPO's tree: one root per group splitting into b children at branch steps, each shared
                  prefix computed once; returns the leaves' paths in rollout's layout           arXiv 2509.06040
  flash_sigmas    the flow schedule with the steps after the window done in fewer ODE steps  MixGRPO-Flash
  flash_tail_steps  how many steps that tail has for MixGRPO's --dpm_post_compress_ratio     MixGRPO-Flash
  dpm_solver_step one DPM-Solver++ step (2nd-order multistep, data prediction) for rectified flow,
                  the ODE solver of Flash's tail                                        arXiv 2211.01095

Every function depends on torch and math only and may be copied on its own.
"""

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Noise levels for `num_steps` rectified-flow steps, from 1 (noise) to 0 (data).

    t = linspace(1, 0, T + 1), then the SD3 time shift  sigma = s t / (1 + (s - 1) t)
    (Esser et al. 2024, Eq. 23), which spends more steps at high noise for s > 1.
    Returns a float32 Tensor[num_steps + 1]; step i goes from sigmas[i] to sigmas[i + 1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def flow_grpo_etas(schedule: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-step eta for flow_sde_step that gives Flow-GRPO's SDE (Liu et al. 2025, arXiv 2505.05470), whose
    noise per unit time grows with the noise level (yifan123/flow_grpo at ac4c86e,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:44, 47):

      eta_i = a * sqrt(sigma_i / (1 - s_i)),   s_i = schedule[1] where sigma_i == 1, else sigma_i

    Only the denominator's sigma is replaced (1 - 1 would divide by 0); the numerator stays 1, so the
    first step of a schedule from 1 gets eta_0 = a / sqrt(1 - schedule[1]).
    Why eta_i is all it takes: with dt = sigma_next - sigma = -delta their mean (:50) is
      x (1 - eta^2 delta / (2 sigma)) - v delta (1 + eta^2 (1 - sigma) / (2 sigma)),
    and flow_sde_step's  x - delta v + eta^2 / 2 delta score  with  score = -(x + (1 - sigma) v) / sigma
    (x - (1 - sigma)(x - sigma v) = sigma x + sigma (1 - sigma) v) expands to the same. Their step std
    std_dev_t sqrt(-dt) (:59) is flow_sde_step's eta sqrt(delta), and their log_prob (:61-68) is the same
    Gaussian density averaged over non-batch dims. They return std_dev_t itself (eta_i, per unit time)
    where flow_sde_step returns the step's std eta_i sqrt(delta).

    schedule: the sigmas Tensor[T + 1], 1 -> 0 (e.g. models.flow_schedule). noise_level: a (0.7 in Flow-GRPO).
    Returns float32 Tensor[T]; step i goes from schedule[i] to schedule[i + 1] with eta_i.
    """
    if schedule.ndim != 1 or len(schedule) < 2 or noise_level < 0:
        raise ValueError(f"need a 1-D schedule of T + 1 >= 2 sigmas and noise_level >= 0, got shape "
                         f"{tuple(schedule.shape)} and {noise_level}")
    sigma = schedule[:-1].float()  # [T], where each step starts
    denominator = 1 - torch.where(sigma == 1, schedule[1].float(), sigma)  # [T]
    return (sigma / denominator).sqrt() * noise_level  # [T]


def _per_sample(value, like: torch.Tensor, name: str, dtype=torch.float32) -> torch.Tensor:
    """A float or a [B] tensor -> `dtype` tensor [B, 1, ..., 1] that broadcasts against `like`."""
    value = torch.as_tensor(value, dtype=dtype, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape != (like.shape[0],):
        raise ValueError(f"{name} must be a float or a [B] tensor with B={like.shape[0]}, got shape {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def _check_inputs(model_output: torch.Tensor, latents: torch.Tensor, prev_sample, eta, names: str) -> None:
    if bool((eta < 0).any()):
        raise ValueError(f"eta must be >= 0, got {eta.flatten().tolist()}")
    if model_output.shape != latents.shape:
        raise ValueError(f"{names} must have the same shape as latents, got {tuple(model_output.shape)} and {tuple(latents.shape)}")
    if prev_sample is not None and prev_sample.shape != latents.shape:
        raise ValueError(f"prev_sample must have the shape of latents {tuple(latents.shape)}, got {tuple(prev_sample.shape)}")


def _randn(shape, generator, device) -> torch.Tensor:
    """Standard normal float32 noise. `generator` may be a list of generators, each drawing an equal
    slice of the batch: one noise stream per prompt group, however the groups are batched."""
    if isinstance(generator, (list, tuple)):
        if shape[0] % len(generator):
            raise ValueError(f"a batch of {shape[0]} cannot be split between {len(generator)} generators")
        part = (shape[0] // len(generator), *shape[1:])
        return torch.cat([torch.randn(part, generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def _gaussian_step(mean, std, prev_sample, generator):
    """Sample x_{t-1} ~ N(mean, std^2) unless given, and its log-density averaged over non-batch dims.

    The average (not the sum) over latent elements is what the official code optimises; it is
    why the clip range is as small as 1e-4. Computed in float32. Where std is 0 (eta = 0) the
    step is deterministic, has no density, and log_prob is returned as 0; no noise is drawn then.
    """
    if prev_sample is None and not bool((std > 0).any()):  # an ODE step: the generator is left untouched
        prev_sample = mean
    elif prev_sample is None:
        noise = _randn(mean.shape, generator, mean.device)
        prev_sample = mean + std * noise
    x = prev_sample.detach().float()
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_density = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))  # [B]
    log_prob = torch.where(std.flatten() > 0, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob


def flow_sde_step(velocity, latents, sigma, sigma_next, eta, *, prev_sample=None, generator=None):
    """One step of the rectified-flow SDE with the log-prob of its transition (DanceGRPO Sec. 3.2).

    The model predicts the velocity v = eps - x0 of the path x_sigma = (1 - sigma) x0 + sigma eps.
    The reverse SDE  dx = (v - eta^2/2 * score) dsigma + eta dw  (Song et al. 2021, Eq. 6, with
    diffusion coefficient eta) shares the ODE's marginals; discretised from sigma to sigma_next:

      x0_hat = x - sigma v                                    (clean-sample estimate)
      score  = -(x - (1 - sigma) x0_hat) / sigma^2            (Gaussian path, Tweedie)
      delta  = sigma - sigma_next > 0
      mean   = x - delta v + eta^2 / 2 * delta * score
      std    = eta * sqrt(delta)

    eta = 0 is exactly the Euler ODE step x + (sigma_next - sigma) v.

    Args:
      velocity, latents: [B, ...] (any layout: [B,C,H,W], packed [B,L,D], video [B,C,T,H,W]).
      sigma, sigma_next: floats or [B] tensors (one noise level per sample), sigma > sigma_next >= 0.
      eta: noise scale >= 0, a float or a [B] tensor (one per sample, e.g. flow_grpo_etas(...)[steps]).
      prev_sample: the x_{t-1} whose log-prob to compute (training); sampled when None (rollout).
      generator: torch.Generator for the sampled noise, or a list splitting the batch into equal parts.
    Returns:
      (prev_sample [B, ...] float32, log_prob [B] float32, mean [B, ...], std [B, 1, ...])
    """
    eta = _per_sample(eta, latents, "eta", torch.float64)  # float64: eta^2 / 2 rounds to float32 once, as a float's
    _check_inputs(velocity, latents, prev_sample, eta, "velocity")
    sigma = _per_sample(sigma, latents, "sigma")
    sigma_next = _per_sample(sigma_next, latents, "sigma_next")
    if not bool((sigma > sigma_next).all()) or not bool((sigma_next >= 0).all()) or not bool((sigma <= 1).all()):
        raise ValueError("need 1 >= sigma > sigma_next >= 0 (the flow runs from noise at 1 to data at 0)")
    x, v = latents.float(), velocity.float()
    delta = sigma - sigma_next
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x - delta * v + (0.5 * eta**2).float() * delta * score
    std = eta.float() * delta.sqrt()
    prev_sample, log_prob = _gaussian_step(mean, std, prev_sample, generator)
    return prev_sample, log_prob, mean, std


def ddim_sde_step(noise_pred, latents, alpha_bar, alpha_bar_prev, eta, *, prev_sample=None, generator=None):
    """One DDIM step with its Gaussian log-prob (Song et al. 2021 "DDIM", Eq. 12 and 16; as DDPO uses it).

      x0_hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
      var    = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)              (DDIM Eq. 16, sigma_t^2)
      std    = eta * sqrt(var)
      mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps          (DDIM Eq. 12)

    eta = 0 is deterministic DDIM, eta = 1 is DDPM's ancestral variance.

    Args:
      noise_pred, latents: [B, ...], epsilon prediction and x_t.
      alpha_bar, alpha_bar_prev: cumulative alphas a_t < a_prev, floats or [B] tensors.
      eta, prev_sample, generator: as in flow_sde_step (eta a float or a [B] tensor).
    Returns:
      (prev_sample [B, ...] float32, log_prob [B] float32, mean [B, ...], std [B, 1, ...])
    """
    eta = _per_sample(eta, latents, "eta", torch.float64)
    _check_inputs(noise_pred, latents, prev_sample, eta, "noise_pred")
    a_t = _per_sample(alpha_bar, latents, "alpha_bar")
    a_prev = _per_sample(alpha_bar_prev, latents, "alpha_bar_prev")
    if not bool((a_t > 0).all()) or not bool((a_prev <= 1).all()) or not bool((a_t < a_prev).all()):
        raise ValueError("need 0 < alpha_bar < alpha_bar_prev <= 1 (DDIM runs from noise towards data)")
    x, eps = latents.float(), noise_pred.float()
    x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta.float() * var.sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    prev_sample, log_prob = _gaussian_step(mean, std, prev_sample, generator)
    return prev_sample, log_prob, mean, std


def _step_and_etas(kind, eta, num_steps):
    """rollout's and tree_rollout's step function for `kind` and their eta per step (a float for every step, or one
    per step), checked."""
    if kind not in ("flow", "ddim"):
        raise ValueError(f"kind must be 'flow' or 'ddim', got {kind!r}")
    etas = [float(e) for e in eta] if isinstance(eta, (list, tuple, torch.Tensor)) else [eta] * num_steps
    if len(etas) != num_steps:
        raise ValueError(f"eta must be a float or one per step ({num_steps}), got {len(etas)}")
    return (flow_sde_step if kind == "flow" else ddim_sde_step), etas


def rollout(denoise, noise, schedule, eta, kind="flow", generator=None, *, dpm_from=None):
    """Run a whole SDE trajectory for a batch and keep what GRPO needs (DanceGRPO Alg. 1, line 4).

    Args:
      denoise: callable (latents [B, ...], step index i) -> model output [B, ...]
        (velocity for kind="flow", epsilon for kind="ddim"); the caller maps i to the model's
        timestep and conditioning. Called under torch.no_grad() by the caller if wanted.
      noise: initial latents x_T [B, ...].
      schedule: Tensor[T + 1], sigmas 1 -> 0 (flow) or cumulative alphas a_T -> a_final (ddim);
        step i goes from schedule[i] to schedule[i + 1].
      eta: SDE noise scale, one float for every step, or a sequence of T floats, one per step
        (window_etas, flow_grpo_etas). A step with eta 0 is an ODE step (Euler / deterministic DDIM): no noise is
        drawn from the generator and its log-prob is NaN, i.e. none is kept (it is not a policy step).
      kind: "flow" or "ddim".
      generator: torch.Generator for the per-step noise, or a list (one per equal slice of the batch).
      dpm_from: flow only: steps i >= dpm_from are dpm_solver_step's DPM-Solver++ ODE steps instead of Euler
        (MixGRPO-Flash's tail; their eta must be 0). Its multistep history is the clean estimate of step i - 1,
        whatever step that was, as MixGRPO's --flow_grpo_sampling path feeds it (sampling_utils.py:115-117,
        127); at dpm_from == 0 the first step has none and is first order. None: no DPM step.
    Returns:
      latents   [B, T + 1, ...]  x_T, ..., x_0 (latents[:, i] is the input of step i)
      log_probs [B, T]           log-prob of each transition (NaN for ODE steps)
      final     [B, ...]         the sample to decode: the last step's x0_hat for flow (as the
                                 official DanceGRPO code), the last x_0 for DDIM (as DDPO)
    """
    step, etas = _step_and_etas(kind, eta, len(schedule) - 1)
    if dpm_from is not None and (kind != "flow" or dpm_from < 0 or any(etas[dpm_from:])):
        raise ValueError(f"dpm_from needs kind='flow', dpm_from >= 0 and eta 0 from there on, got {kind!r}, {dpm_from}")
    dpm_from = len(etas) + 1 if dpm_from is None else dpm_from  # past the end: no step looks back
    x = noise.float()
    all_latents, all_log_probs, history = [x], [], ()
    for i in range(len(schedule) - 1):
        model_output = denoise(x, i)
        if i + 1 >= dpm_from:  # a DPM step, or the step the tail's first one looks back at
            x0_hat = x - schedule[i] * model_output.float()
        if i >= dpm_from:
            x = dpm_solver_step(x, x0_hat, schedule[i], schedule[i + 1], *history)
            log_prob = torch.full(x.shape[:1], float("nan"), device=x.device)
        else:
            x, log_prob, _, _ = step(model_output, x, schedule[i], schedule[i + 1], etas[i], generator=generator)
        if i + 1 >= dpm_from:
            history = (x0_hat, schedule[i])
        all_latents.append(x)
        all_log_probs.append(log_prob if etas[i] > 0 else torch.full_like(log_prob, float("nan")))
    if kind == "flow":
        final = all_latents[-2] - schedule[-2] * model_output.float()  # x0_hat = x - sigma v
    else:
        final = x
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1), final


def tree_rollout(denoise, noise, schedule, eta, branch_steps, branch_factor=2, *, kind="flow", generator=None):
    """BranchGRPO's tree rollout (Li et al. 2025, arXiv 2509.06040): each prompt group grows as a tree from one root.

    Every node takes the step with one network call (the nodes of a step batched together); at a branch step the
    node's mean is repeated branch_factor times and each child draws its own noise, so G = b ** len(branch_steps)
    leaves share every prefix above their split, computed once. Children of a node are consecutive, trees are
    consecutive: the node that leaf l passes at time i (after i steps, n_i nodes in all) is l // (N / n_i).

    Args:
      denoise: callable (latents [n_i, ...] of the n_i nodes at time i, step index i) -> model output [n_i, ...];
        node j of time i belongs to leaves j * N / n_i ... (j + 1) * N / n_i - 1 (its prompt: any of theirs).
      noise: the roots x_T [P, ...], one per tree (prompt group).
      schedule, eta, kind: as in rollout (eta a float or one per step; 0 an ODE step). A branch step needs eta > 0.
      branch_steps: the step indices where every node splits (sorted, distinct, in [0, T - 1]).
      branch_factor: children per split, b >= 2 (BranchGRPO's code hard-codes 2, train_branchgrpo_flux.py:405).
      generator: a torch.Generator, or a list with one per tree (each tree's noise its own stream, as _randn).
    Returns the leaves' paths in rollout's layout, N = P * b ** len(branch_steps) leaves, tree after tree:
      latents   [N, T + 1, ...]  each leaf's x_T, ..., x_0 (the shared prefix repeated in every leaf below it)
      log_probs [N, T]           the log-prob of the edge each leaf's path takes at step i (NaN for ODE steps)
      final     [N, ...]         the last step's x0_hat (flow) or the last x_0 (ddim)
    """
    num_steps = len(schedule) - 1
    step, etas = _step_and_etas(kind, eta, num_steps)
    branches = sorted(set(int(b) for b in branch_steps))
    if branch_factor < 2 or list(branch_steps) != branches or not all(
            0 <= b < num_steps and etas[b] > 0 for b in branches):
        raise ValueError(f"need branch_factor >= 2 and sorted distinct branch_steps in [0, {num_steps - 1}] with "
                         f"eta > 0; got {branch_factor}, {list(branch_steps)}")
    n = noise.shape[0] * branch_factor ** len(branches)  # leaves
    x = noise.float()
    nodes, edge_log_probs = [x], []  # nodes[i]: [n_i, ...] at time i; edge_log_probs[i]: [n_{i+1}] of step i's edges
    for i in range(num_steps):
        model_output = denoise(x, i)
        if i in branches:  # each child repeats its parent's input and velocity: the same mean, its own noise
            x, model_output = (t.repeat_interleave(branch_factor, dim=0) for t in (x, model_output))
        x_in, (x, log_prob, _, _) = x, step(model_output, x, schedule[i], schedule[i + 1], etas[i], generator=generator)
        nodes.append(x)
        edge_log_probs.append(log_prob if etas[i] > 0 else torch.full_like(log_prob, float("nan")))
    final = x_in - schedule[-2] * model_output.float() if kind == "flow" else x  # x0_hat = x - sigma v

    def leaves(t):  # node rows -> the rows of the leaves below them
        return t.repeat_interleave(n // len(t), dim=0)
    return (torch.stack([leaves(t) for t in nodes], dim=1), torch.stack([leaves(t) for t in edge_log_probs], dim=1),
            leaves(final))


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma: -inf at pure noise (sigma = 1), +inf at data (0)."""
    return math.log(1 - sigma) - math.log(sigma) if 0 < sigma < 1 else (-math.inf if sigma >= 1 else math.inf)


def dpm_solver_step(latents, x0_hat, sigma, sigma_next, previous_x0_hat=None, sigma_previous=None):
    """One DPM-Solver++ ODE step, 2nd-order multistep in data prediction (Lu et al. 2022, arXiv 2211.01095,
    Alg. 2 "DPM-Solver++(2M)", its midpoint form as diffusers' DPMSolverMultistepScheduler and MixGRPO use it),
    written for the rectified flow x_sigma = (1 - sigma) x0 + sigma eps:

      x0_hat = x - sigma v               alpha = 1 - sigma        lambda = log(alpha / sigma)
      h      = lambda_next - lambda      h_prev = lambda - lambda_previous
      D      = x0_hat + h / (2 h_prev) (x0_hat - previous_x0_hat)        (first order: D = x0_hat)
      x_next = (sigma_next / sigma) x + alpha_next (1 - exp(-h)) D

    First order (no previous_x0_hat) is DDIM, which for a rectified flow is the Euler step x - (sigma -
    sigma_next) v, up to rounding. sigma_next == 0 (the last step) is always first order, and lands on x0_hat
    (alpha_next = 1, exp(-h) = 0): diffusers' lower_order_final with final_sigmas_type="zero", MixGRPO's
    lower_order_final (sampling_utils.py:308, 328). At sigma_previous == 1 (lambda = -inf) the correction is 0.

    Args:
      latents, x0_hat: x at sigma and its clean estimate, [B, ...].
      sigma, sigma_next: floats (or 0-d tensors), 1 >= sigma > sigma_next >= 0.
      previous_x0_hat, sigma_previous: the clean estimate made one step earlier and its sigma (> sigma);
        None for a first-order step (the first step of a solve).
    Returns:
      x_next [B, ...] float32.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not 1 >= sigma > sigma_next >= 0 or x0_hat.shape != latents.shape:
        raise ValueError(f"need 1 >= sigma > sigma_next >= 0 and x0_hat shaped like latents, got {sigma}, "
                         f"{sigma_next}, {tuple(x0_hat.shape)} and {tuple(latents.shape)}")
    x, x0_hat = latents.float(), x0_hat.float()
    if sigma_next == 0:
        return x0_hat.clone()
    h = _log_snr(sigma_next) - _log_snr(sigma)
    data_weight = (1 - sigma_next) * -math.expm1(-h)  # alpha_next (1 - e^-h); alpha_next at sigma = 1
    x_next = (sigma_next / sigma) * x + data_weight * x0_hat
    if previous_x0_hat is not None:
        sigma_previous = float(sigma_previous)
        if not sigma_previous > sigma or previous_x0_hat.shape != latents.shape:
            raise ValueError(f"need sigma_previous > sigma and previous_x0_hat shaped like latents, got "
                             f"{sigma_previous} and {tuple(previous_x0_hat.shape)}")
        h_prev = _log_snr(sigma) - _log_snr(sigma_previous)  # inf at sigma_previous = 1: no correction
        x_next = x_next + (data_weight * h / (2 * h_prev)) * (x0_hat - previous_x0_hat.float())
    return x_next


def window_etas(num_steps: int, eta, window) -> list[float]:
    """MixGRPO's mixed sampling (Li et al. 2025, arXiv 2507.21802): the steps in `window` (a range
    of step indices) are SDE steps with noise scale eta, the others ODE steps (eta 0). Only the
    window's steps are random, so only they are policy steps with a log-prob to train. eta: a float, or
    one per step of the full schedule (flow_grpo_etas: Flow-GRPO's SDE inside the window)."""
    per_step = isinstance(eta, (list, tuple, torch.Tensor))
    return [float(eta[i] if per_step else eta) if i in window else 0.0 for i in range(num_steps)]


def window_plan(schedule, model_t, eta, window, shift=None, tail_steps=None):
    """What a MixGRPO rollout runs: (schedule, model_t, etas). etas: window_etas; with tail_steps (flow only,
    `shift` its time shift; None: every step of the schedule after the window) the schedule after the window is
    flash_sigmas' and model_t = sigmas[:-1]."""
    if tail_steps is not None:
        schedule = flash_sigmas(len(schedule) - 1, shift, window.stop, tail_steps)
        model_t = schedule[:-1]  # the flow network's timestep is sigma
    return schedule, model_t, window_etas(len(model_t), eta, window)


def flash_sigmas(num_steps: int, shift: float, window_end: int, tail_steps: int) -> torch.Tensor:
    """flow_sigmas(num_steps, shift) up to step `window_end` (the first step after the SDE window),
    then `tail_steps` ODE steps from there to 0, evenly spaced in unshifted time and shifted the same
    way: MixGRPO-Flash's shorter tail. MixGRPO rebuilds it the same way (Tencent-Hunyuan/MixGRPO at e5cdd6a,
    fastvideo/utils/sampling_utils.py:47-54): linspace from the unshifted time of the first step after the window
    to 0, then the SD3 shift, after the sigmas up to the window's end. tail_steps 0 ends the schedule at the
    window's end (the last window step's clean estimate is the image; flash_tail_steps gives 0 near the end).
    Steps before window_end keep their sigmas bit for bit, so training on window steps can use the
    full schedule. Returns Tensor[window_end + tail_steps + 1]; the full schedule when that is not shorter.
    """
    if not 0 <= window_end <= num_steps or tail_steps < 0:
        raise ValueError(f"need 0 <= window_end <= num_steps and tail_steps >= 0, got {window_end}, {tail_steps}")
    if tail_steps >= num_steps - window_end:
        return flow_sigmas(num_steps, shift)
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    t = torch.cat([t[:window_end], torch.linspace(t[window_end].item(), 0, tail_steps + 1, dtype=torch.float64)])
    return (shift * t / (1 + (shift - 1) * t)).float()


def flash_tail_steps(num_steps: int, window_end: int, ratio: float) -> int:
    """The number of ODE steps after the window for MixGRPO-Flash's --dpm_post_compress_ratio (0.4 Flash, 0.2
    Flash*: finetune_flux_grpo_MixGRPO_Flash.sh:77, _Flash*.sh:77). MixGRPO counts points, not steps
    (sampling_utils.py:44, 48): of the T + 1 - window_end sigmas from the first step after the window to 0, it
    keeps int(max((T + 1 - window_end) ratio, 1)) points, the last one 0, so the tail has one step fewer. One point
    (the window near the end) is no tail at all: the rollout ends where the window does.
    """
    if not 0 <= window_end <= num_steps or not 0 < ratio <= 1:
        raise ValueError(f"need 0 <= window_end <= num_steps and 0 < ratio <= 1, got {window_end}, {ratio}")
    return int(max((num_steps + 1 - window_end) * ratio, 1)) - 1


def group_noise(num_groups: int, group_size: int, shape, generator=None, same_noise=True) -> torch.Tensor:
    """Initial noise [num_groups * group_size, *shape]; with same_noise the G samples of a group
    share one draw, so their reward differences come from the SDE alone (DanceGRPO Sec. 3.3).
    `generator` may be a list with one generator per group."""
    if same_noise:
        noise = _randn((num_groups, 1, *shape), generator, "cpu")
        return noise.expand(num_groups, group_size, *shape).reshape(num_groups * group_size, *shape).clone()
    return _randn((num_groups * group_size, *shape), generator, "cpu")
