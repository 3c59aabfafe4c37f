"""Group Relative Policy Optimization for visual generators (DanceGRPO Sec. 3.1-3.3).

  group_advantages          rewards z-scored within each prompt's group          Eq. (4)
  reward_advantages         one advantage per reward (several rewards)           Sec. 3.3
  multi_reward_advantages   their weighted sum (what best-of-N ranks by)         Sec. 3.3
  clipped_loss              the PPO-style clipped surrogate, one per reward, no KL   Eq. (3)
  select_timesteps          which denoising steps of each sample are trained     Sec. 3.3
  sde_window                MixGRPO's sliding window of SDE (and trained) steps  arXiv 2507.21802
  best_of_n                 keep the best and worst samples of each group        Sec. 3.3
  tree_values               BranchGRPO: each tree node's value from its leaves' rewards (mean, or path-weighted)
  tree_advantages           node values z-scored per depth within each tree, per (leaf, step)    arXiv 2509.06040
  tree_pairs                which (leaf, step) pairs train each SDE edge of a tree once
  slide_depths, prune_depths, prune_width   BranchGRPO's depth pruning (sliding) and width pruning (mode 2)
  trained_steps             a pair mask as per-sample steps padded with -1 (what the update reads)
  gaussian_kl               KL of one step to a reference policy, per sample (the paper has none)
  kl_penalty                Flow-GRPO's kl_loss: gaussian_kl times the step's length in sigma   arXiv 2505.05470
  groups_without_spread     fraction of groups whose rewards are equal at float32 resolution (no gradient)
  update_health             approx_kl (k3) and, per sampling step, mean |r - 1| and the clipped fraction

Every function depends on torch and math only and may be copied on its own.
"""

import torch


def _check_groups(n: int, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {group_size}")
    if n % group_size != 0:
        raise ValueError(f"the number of samples ({n}) must be a multiple of group_size ({group_size})")


def _without_spread(r: torch.Tensor) -> torch.Tensor:
    """Groups r [..., G] (float32) whose rewards do not differ at float32 resolution -> bool [...].

    Rule: max - min <= G * eps * max|r|, eps = 2^-23 (float32's machine epsilon). A float32 sum of G rewards errs
    by up to (G - 1) u sum|r_i| with u = eps / 2 (recursive summation, Higham 2002, "Accuracy and Stability of
    Numerical Algorithms", Sec. 4.2), so their float32 mean errs by up to G u max|r| = (G / 2) eps max|r|. Within
    the rule's range that error is at least half the range: the deviations r_i - mean, and their z-scores, are
    rounding, not reward: twelve float32 copies of 0.3 (range 0) have a float32 std of 3e-8 and, z-scored,
    advantages near 1 (up to the clip for other values). Equal rewards (all 0 too) are always without spread.
    """
    scale = r.abs().amax(dim=-1)  # [...]
    return r.amax(dim=-1) - r.amin(dim=-1) <= r.shape[-1] * torch.finfo(torch.float32).eps * scale


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float = 5.0) -> torch.Tensor:
    """Advantages A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-8), clipped to [-clip, clip].

    rewards: Tensor[N], N = num_prompts * group_size, the G samples of one prompt consecutive.
    The std is the unbiased one (torch.std), as in the official code. A group without spread (its
    rewards equal at float32 resolution, _without_spread) gets advantages exactly 0 (no gradient),
    neither NaN nor the z-scores of rounding noise.
    Returns Tensor[N] float32.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    _check_groups(rewards.shape[0], group_size)
    r = rewards.float().view(-1, group_size)  # [P, G]
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-8)  # Eq. (4)
    adv = torch.where(_without_spread(r)[:, None], torch.zeros_like(adv), adv)  # [P, G]
    return adv.clamp(-clip, clip).flatten()


def reward_advantages(rewards: torch.Tensor, group_size: int, clip: float = 5.0) -> torch.Tensor:
    """Several rewards: one advantage per reward, each z-scored in its group (Sec. 3.3), so a reward
    with a large scale does not drown the others. rewards: Tensor[K, N]. Returns Tensor[K, N];
    clipped_loss takes it with the rewards' weights."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [K, N], got shape {tuple(rewards.shape)}")
    return torch.stack([group_advantages(r, group_size, clip) for r in rewards])


def multi_reward_advantages(rewards: torch.Tensor, weights, group_size: int, clip: float = 5.0) -> torch.Tensor:
    """The weighted sum of the per-reward advantages, sum_k w_k A_k: Tensor[N]. What best-of-N ranks
    samples by (as the official HunyuanVideo script). rewards: Tensor[K, N], weights: K floats."""
    if rewards.ndim != 2 or rewards.shape[0] != len(weights):
        raise ValueError(f"rewards must be [K, N] with K = len(weights) = {len(weights)}, got shape {tuple(rewards.shape)}")
    return sum(w * a for w, a in zip(weights, reward_advantages(rewards, group_size, clip)))


def clipped_loss(log_prob, old_log_prob, advantages, clip_range, weights=None):
    """The clipped surrogate of DanceGRPO Eq. (3) (PPO, Schulman et al. 2017, Eq. 7), negated to minimise:

      r = exp(log_prob - old_log_prob)
      loss = mean( max(-A r, -A clamp(r, 1 - eps, 1 + eps)) )

    log_prob, old_log_prob: Tensor[M], one entry per trained (sample, timestep).
    advantages: Tensor[M]; or Tensor[K, M], one row per reward, with `weights` (K floats): then the
    loss is sum_k w_k * loss(A_k), one clipped loss per reward as the official HunyuanVideo script
    (vq_coef * L(A_vq) + mq_coef * L(A_mq)). That differs from one loss of the weighted advantage
    sum_k w_k A_k once a ratio leaves the clip range and the rewards' advantages differ in sign.
    No KL term: the paper drops it (see kl_penalty and gaussian_kl for optional ones). Returns a scalar.
    """
    rows = advantages if advantages.ndim == 2 else advantages[None]  # [K, M]
    weights = [1.0] if weights is None else list(weights)
    if not (log_prob.shape == old_log_prob.shape == rows.shape[1:]) or len(weights) != rows.shape[0]:
        raise ValueError(
            f"log_prob, old_log_prob [M] and advantages [M] or [K, M] with K weights must agree, got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, {len(weights)} weights"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_prob - old_log_prob)  # [M]
    unclipped = -rows * ratio  # [K, M]
    clipped = -rows * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_reward = torch.maximum(unclipped, clipped).mean(dim=1)  # [K]
    return sum(w * l for w, l in zip(weights, per_reward))


def select_timesteps(num_steps: int, fraction: float, num_samples: int, generator=None, window=None) -> torch.Tensor:
    """The denoising steps each sample trains on (Sec. 3.3, "timestep selection").

    The last step (index num_steps - 1) is never trained, as in the official code. Each sample
    draws its own random permutation of the other num_steps - 1 steps and keeps its first
    k = int((num_steps - 1) * fraction). Returns LongTensor[num_samples, k].

    window: a range of steps (sde_window), MixGRPO's setting: only its steps are SDE steps, and each
    sample trains all of them (but the last step), in its own random order; `fraction` is not used
    (the official MixGRPO trains every window step). A window of all steps with fraction 1 draws
    exactly what the paper's setting draws.
    """
    if window is not None:
        steps = torch.tensor([i for i in window if i < num_steps - 1], dtype=torch.long)
        if len(steps) < 1:
            raise ValueError(f"window {window} holds no trainable step of {num_steps} (the last is never trained)")
        return torch.stack([steps[torch.randperm(len(steps), generator=generator)] for _ in range(num_samples)])
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = int((num_steps - 1) * fraction)
    if k < 1:
        raise ValueError(f"num_steps={num_steps} with fraction={fraction} trains no step; use more steps or a larger fraction")
    perms = [torch.randperm(num_steps - 1, generator=generator)[:k] for _ in range(num_samples)]
    return torch.stack(perms)


def sde_window(iteration: int, num_steps: int, size: int, shift_every: int, stride: int = 1) -> range | None:
    """MixGRPO's sliding window (Li et al. 2025, arXiv 2507.21802, "sliding window"): the `size`
    consecutive steps that are SDE steps and trained in an iteration (size 0: None, no window, every
    step an SDE step: the paper's setting). It starts at step 0 (highest
    noise) and moves `stride` steps toward low noise every `shift_every` iterations (0: never moves);
    past the last position it starts again at 0 (the official scripts pass --roll_back).
    MixGRPO's defaults on 25 steps: size 4, shift_every 25, stride 1 (MixGRPO scripts/finetune/
    finetune_flux_grpo_MixGRPO.sh lines 54-60, 164-168, commit e5cdd6a).

    A window lies within the trainable steps 0 .. num_steps - 2, so every position trains `size`
    steps; a window of num_steps steps covers every step (the paper's rollout).
    deviation: the official window is clipped at step num_steps - 2 and shrinks (to nothing at its last
    position, fastvideo/utils/grpo_states.py lines 95-99, 148, and train_grpo_flux.py line 919); here it
    stays whole and starts again.
    """
    if size == 0:
        return None
    if not 1 <= size <= num_steps or shift_every < 0 or stride < 0:
        raise ValueError(f"need 1 <= size <= num_steps ({num_steps}), shift_every >= 0, stride >= 0; "
                         f"got {size}, {shift_every}, {stride}")
    positions = max(1, num_steps - size)  # starts 0 .. num_steps - 1 - size
    start = (iteration // shift_every * stride) % positions if shift_every else 0
    return range(start, start + size)


def best_of_n(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """Indices of the keep/2 highest and keep/2 lowest rewards of each group (Sec. 3.3, best-of-N).

    Training on the extremes of N samples gives the clearest signal per backward pass
    (the paper samples 24 videos per prompt and trains on 8 for HunyuanVideo).
    rewards: Tensor[N] with groups of group_size consecutive samples. Returns LongTensor[P * keep],
    sorted within each group so the kept samples stay in their original order.
    """
    _check_groups(rewards.shape[0], group_size)
    if keep < 2 or keep % 2 or keep > group_size:
        raise ValueError(f"keep must be even, >= 2 and <= group_size={group_size}, got {keep}")
    order = rewards.view(-1, group_size).argsort(dim=1, descending=True)  # [P, G]
    kept = torch.cat([order[:, : keep // 2], order[:, group_size - keep // 2 :]], dim=1)  # [P, keep]
    kept = kept.sort(dim=1).values
    offsets = torch.arange(kept.shape[0], device=kept.device)[:, None] * group_size
    return (kept + offsets).flatten()


def _tree_widths(num_steps: int, branch_steps, branch_factor: int) -> list[int]:
    """Nodes of one tree at times 0 .. T (time i: after i steps): b ** (number of branch steps before i)."""
    if branch_factor < 2 or not all(0 <= b < num_steps for b in branch_steps) or len(set(branch_steps)) != len(
            branch_steps):
        raise ValueError(f"need branch_factor >= 2 and distinct branch_steps in [0, {num_steps - 1}], got "
                         f"{branch_factor}, {list(branch_steps)}")
    return [branch_factor ** sum(b < i for b in branch_steps) for i in range(num_steps + 1)]


def _check_tree(n: int, widths) -> int:
    if n % widths[-1]:
        raise ValueError(f"{n} leaves are not whole trees of {widths[-1]} leaves")
    return widths[-1]


def tree_values(rewards, num_steps, branch_steps, branch_factor, *, log_probs=None) -> torch.Tensor:
    """The value of every node of BranchGRPO's trees (sde.tree_rollout's layout), per leaf and time: [N, T + 1],
    column i the value of the node the leaf passes at time i (after i steps); column T is the leaf's reward.

    Default: a node's value is the mean of its leaves' rewards (BranchGRPO train_branchgrpo_flux.py:643-649, its
    default): its leaves are samples of the policy from that node, so their mean estimates the node's expected reward.
    log_probs [N, T] given (their --tree_prob_weighted, :615-641): from the leaves up, a node splitting at step i
    takes the softmax over its children's step-i edge log-probs as weights of the children's values, a node with one
    child its child's value. rewards: Tensor[N], trees of G = b ** len(branch_steps) consecutive leaves.
    """
    widths = _tree_widths(num_steps, branch_steps, branch_factor)
    G = _check_tree(len(rewards), widths)
    r = rewards.float()
    P = len(r) // G
    if log_probs is None:
        return torch.stack([r.view(P * w, G // w).mean(1).repeat_interleave(G // w) for w in widths], dim=1)
    node = r  # values of the nodes at time i + 1, [P * widths[i + 1]]
    columns = [r]
    for i in reversed(range(num_steps)):
        if widths[i] != widths[i + 1]:  # a branch step: weights softmax over the children's edge log-probs
            lp = log_probs[:: G // widths[i + 1], i].float().view(-1, branch_factor)  # [P * widths[i], b]
            node = (torch.softmax(lp, dim=1) * node.view(-1, branch_factor)).sum(1)
        columns.insert(0, node.repeat_interleave(G // widths[i]))
    return torch.stack(columns, dim=1)


def tree_advantages(rewards, num_steps, branch_steps, branch_factor, clip=5.0, *, log_probs=None) -> torch.Tensor:
    """BranchGRPO's advantages per (leaf, step), Tensor[N, T]: entry (l, i) is the advantage of the node that leaf
    l's step-i edge leads to, the nodes at depth i + 1 (time i + 1) of one tree z-scored among themselves (unbiased
    std; BranchGRPO train_branchgrpo_flux.py:655-684, per tree :1149-1180): a depth with one node, or whose values
    have std < 1e-6, gets 0; else (v - mean) / (std + 1e-8). Clipped to [-clip, clip] (their :1547).
    Node values: tree_values (log_probs given: the path-probability-weighted ones)."""
    values = tree_values(rewards, num_steps, branch_steps, branch_factor, log_probs=log_probs)  # [N, T + 1]
    widths = _tree_widths(num_steps, branch_steps, branch_factor)
    G, columns = widths[-1], []
    for i in range(num_steps):
        w = widths[i + 1]
        v = values[:: G // w, i + 1].view(-1, w)  # [P, w]: one tree's nodes at depth i + 1 a row
        if w == 1:
            adv = torch.zeros_like(v)
        else:
            mean, std = v.mean(dim=1, keepdim=True), v.std(dim=1, keepdim=True)
            adv = torch.where(std < 1e-6, torch.zeros_like(v), (v - mean) / (std + 1e-8))
        columns.append(adv.flatten().repeat_interleave(G // w))
    return torch.stack(columns, dim=1).clamp(-clip, clip)


def tree_pairs(num_steps, sde_steps, branch_steps, branch_factor, num_trees) -> torch.Tensor:
    """Which (leaf, step) pairs the update trains so that each edge of the trees is trained once: bool [N, T].

    An edge of step i is trained when step i is an SDE step (in sde_steps: a policy step with a log-prob), not the
    last step (never trained, as DanceGRPO), and its depth i + 1 holds >= 2 nodes of a tree (one node: advantage 0).
    The edge is represented by the first leaf below the node it leads to (that leaf's path holds the edge's latents
    and log-prob). BranchGRPO trains every edge once (train_branchgrpo_flux.py:1199-1225; with its mix mode only the
    SDE ones, :1233-1252)."""
    widths = _tree_widths(num_steps, branch_steps, branch_factor)
    G = widths[-1]
    pairs = torch.zeros(num_trees * G, num_steps, dtype=torch.bool)
    for i in range(num_steps - 1):
        if i in sde_steps and widths[i + 1] >= 2:
            pairs[:: G // widths[i + 1], i] = True
    return pairs


def slide_depths(depths, iteration: int, interval: int = 0, stop_depth: int = 0) -> list[int]:
    """BranchGRPO's sliding depth pruning (train_branchgrpo_flux.py:1277-1294): the pruned depths move one toward
    the root every `interval` training steps (their step = iteration + 1, :1857), until the shallowest reaches
    stop_depth (their default: the last split step, :1282). interval 0: the depths as given."""
    if not depths or not interval:
        return sorted(depths)
    shift = min((iteration + 1) // interval, max(0, min(depths) - stop_depth))
    return [d - shift for d in sorted(depths)]


def prune_depths(pairs: torch.Tensor, depths) -> torch.Tensor:
    """BranchGRPO's depth pruning (--depth_pruning, train_branchgrpo_flux.py:1300-1313): the edges leading to a node
    at one of `depths` (depth d: time d, the edges of step d - 1) are not trained; sampling and rewards unchanged.
    pairs: bool [N, T] (tree_pairs). Returns a pruned copy."""
    pairs = pairs.clone()
    for d in depths:
        if 1 <= d <= pairs.shape[1]:
            pairs[:, d - 1] = False
    return pairs


def prune_width(pairs: torch.Tensor, advantages: torch.Tensor, group_size: int, ratio: float = 0.5) -> torch.Tensor:
    """BranchGRPO's width pruning, mode 2 (train_branchgrpo_flux.py:1437-1457): of the edges of the deepest trained
    step of each tree, keep the best keep // 2 and the worst keep - keep // 2 by advantage, keep = max(2, int(m *
    ratio)) of its m edges (ties in leaf order, as their stable sort); other steps unchanged.
    pairs: bool [N, T]; advantages: [N, T] (several rewards: their weighted sum). Returns a pruned copy."""
    pairs = pairs.clone()
    _check_groups(len(pairs), group_size)
    for start in range(0, len(pairs), group_size):
        tree = pairs[start:start + group_size]  # a view: pruned in place
        trained = tree.any(dim=0).nonzero().flatten()
        if not len(trained):
            continue
        s = trained[-1]
        rows = tree[:, s].nonzero().flatten()  # the layer's edges, one representative leaf each
        order = rows[advantages[start + rows, s].sort(descending=True, stable=True).indices]
        keep = max(2, int(len(rows) * ratio))
        tree[order[keep // 2: len(order) - (keep - keep // 2)], s] = False
    return pairs


def trained_steps(pairs: torch.Tensor) -> torch.Tensor:
    """A pair mask bool [N, T] as each sample's trained steps, ascending, padded with -1: LongTensor[N, k], k the
    most any sample trains (a tree's first leaf carries the edges above it, the others fewer)."""
    k = int(pairs.sum(dim=1).max()) if pairs.numel() else 0
    steps = torch.full((pairs.shape[0], k), -1, dtype=torch.long)
    for row, mask in enumerate(pairs):
        found = mask.nonzero().flatten()
        steps[row, :len(found)] = found
    return steps


def gaussian_kl(mean, ref_mean, std):
    """KL( N(mean, std^2) || N(ref_mean, std^2) ) per sample, averaged over non-batch dims like
    the log-probs: ||mean - ref_mean||^2 / (2 std^2). An optional regulariser toward a frozen
    reference policy (as Flow-GRPO adds); DanceGRPO trains without it. Returns Tensor[B]."""
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def kl_penalty(mean, ref_mean, std, sigma, sigma_next):
    """Flow-GRPO's KL loss per sample (yifan123/flow_grpo at ac4c86e, scripts/train_sd3.py:895-897, beta 0.01 in
    config/grpo.py:128 pickscore_sd3):

      kl = mean_d (mean - ref_mean)^2 / (2 std_dev_t^2),   std_dev_t = std / sqrt(sigma - sigma_next)

    std_dev_t is the noise per unit time (sd3_sde_with_logprob.py:47, which they return), not the step's std
    std_dev_t sqrt(sigma - sigma_next) (:59) that both policies share, so this is (sigma - sigma_next) times the
    step's true KL gaussian_kl(mean, ref_mean, std). They reduce with mean(dim=(1, 2, 3), keepdim=True), divide by
    std_dev_t [B, 1, 1, 1], then take torch.mean over the batch: this returns the [B] values before that mean.

    mean, ref_mean: [B, ...] the step's mean under the policy and under the reference; std: the step's std
    [B, 1, ...] (flow_sde_step's); sigma, sigma_next: floats or [B] tensors. Returns Tensor[B] float32.
    """
    if std.numel() not in (1, mean.shape[0]):
        raise ValueError(f"std must be one value per sample [B, 1, ...], B={mean.shape[0]}, got {tuple(std.shape)}")
    delta = torch.as_tensor(sigma, dtype=torch.float32, device=mean.device) - torch.as_tensor(
        sigma_next, dtype=torch.float32, device=mean.device)  # [B] or []
    std_dev_t_sq = std.float().flatten() ** 2 / delta  # [B]: std^2 = std_dev_t^2 (sigma - sigma_next)
    squared = (mean.float() - ref_mean.float()) ** 2
    return squared.mean(dim=tuple(range(1, squared.ndim))) / (2 * std_dev_t_sq)  # [B]


def groups_without_spread(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of prompt groups without spread (equal at float32 resolution, the rule group_advantages
    zeroes by) in every reward: their advantages are 0 and they give no gradient. rewards: Tensor[N] or
    [K, N]. A rising value warns of a saturated or binary reward (every sample passes, or none does) or
    of samples that no longer differ (collapse)."""
    rows = rewards if rewards.ndim == 2 else rewards[None]  # [K, N]
    _check_groups(rows.shape[1], group_size)
    r = rows.float().reshape(rows.shape[0], -1, group_size)  # [K, P, G]
    return _without_spread(r).all(dim=0).float().mean().item()


def update_health(ratios, steps, num_steps: int, clip_range: float) -> dict:
    """How far one iteration's updates moved the policy, from the ratios r = p_new / p_old of its
    trained (sample, step) pairs. ratios: Tensor[M]; steps: LongTensor[M], each pair's step index.

      approx_kl              mean((r - 1) - log r): the k3 estimator of KL(old || new) for pairs drawn
                             from the old policy (Schulman, "Approximating KL Divergence", 2020); >= 0
      ratio_by_step          [num_steps] mean |r - 1| of the pairs at each step index, None where none
      clip_fraction_by_step  [num_steps] fraction of them with |r - 1| > clip_range, None where none
    """
    ratios, steps = ratios.detach().double().flatten().cpu(), steps.flatten().cpu()
    kl = ((ratios - 1) - torch.log(ratios)).mean().item() if len(ratios) else None
    by_step, clipped = [None] * num_steps, [None] * num_steps
    for t in steps.unique().tolist():
        r = ratios[steps == t]
        by_step[t], clipped[t] = (r - 1).abs().mean().item(), ((r - 1).abs() > clip_range).double().mean().item()
    return dict(approx_kl=kl, ratio_by_step=by_step, clip_fraction_by_step=clipped)
