"""BranchGRPO's tree rollouts (opt-in, --branch_steps): sde.tree_rollout against the chain rollout, the tree
advantages and trained pairs of grpo.py against hand computations, pruning, flags, and training runs."""

import math

import pytest
import torch

import grpo
import sde

SHAPE = (3, 4)  # one sample's latent


def denoise_fn(calls):
    """A row-wise stand-in for the network (each row's output depends on that row only, bit for bit whatever the
    batch), recording how many rows each call gets."""
    def denoise(x, i):
        calls.append(len(x))
        return torch.tanh(x * (0.7 + 0.1 * i)) + 0.05 * i
    return denoise


def gens(seed, n):
    return [torch.Generator().manual_seed(seed + g) for g in range(n)]


# ----------------------------------------------------------------------------- sde.tree_rollout

@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_one_branch_at_step_0_into_g_children_is_the_chain_rollout_of_a_group_bit_for_bit(kind):
    """A tree splitting G ways at step 0 and nowhere else, SDE at every step, is the chain rollout of G samples that
    share their initial noise (sampling.sample's shared_first: the first step's output computed once, repeated)."""
    P, G, T = 2, 4, 5
    schedule = sde.flow_sigmas(T, 3.0) if kind == "flow" else torch.linspace(0.05, 0.9, T + 1)
    eta = 0.7 if kind == "flow" else 1.0
    chain_calls, tree_calls = [], []
    net = denoise_fn(chain_calls)

    def shared_first(x, i):  # what sampling.sample does with shared_first=G
        if i == 0:
            return net(x[::G], 0).repeat_interleave(G, dim=0)
        return net(x, i)
    noise = sde.group_noise(P, G, SHAPE, gens(10, P))
    chain = sde.rollout(shared_first, noise, schedule, eta, kind, gens(20, P))
    roots = sde.group_noise(P, 1, SHAPE, gens(10, P))  # the same draw as the shared one
    tree = sde.tree_rollout(denoise_fn(tree_calls), roots, schedule, eta, [0], G, kind=kind, generator=gens(20, P))
    for a, b in zip(chain, tree):
        assert a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert chain_calls == tree_calls == [P] + [P * G] * (T - 1)


def test_leaves_share_their_nodes_prefix_exactly_and_differ_after_a_split():
    P, b, T, branches = 2, 2, 6, [1, 3]
    calls = []
    eta = [0.0, 0.5, 0.5, 0.5, 0.0, 0.0]  # SDE at the branch steps and at step 2 (a window), ODE elsewhere
    latents, log_probs, final = sde.tree_rollout(denoise_fn(calls), torch.randn(P, *SHAPE), sde.flow_sigmas(T, 3.0),
                                                 eta, branches, b, generator=gens(0, P))
    N = P * b ** len(branches)
    assert latents.shape == (N, T + 1, *SHAPE) and log_probs.shape == (N, T) and final.shape == (N, *SHAPE)
    widths = [1, 1, 2, 2, 4, 4, 4]  # nodes of a tree at times 0..T
    assert calls == [P * w for w in widths[:-1]]  # one network row per node: the prefix is computed once
    for i, w in enumerate(widths):
        per_node = latents[:, i].reshape(P * w, N // (P * w), -1)  # the leaves below each node at time i
        assert all(torch.equal(rows[0], r) for rows in per_node for r in rows)
        firsts = per_node[:, 0]
        assert len({tuple(r.tolist()) for r in firsts}) == P * w  # distinct nodes hold distinct latents
    for i in range(T):  # an edge's log-prob is shared by the leaves below the node it leads to
        groups = log_probs[:, i].reshape(P * widths[i + 1], -1)
        if eta[i] == 0:
            assert groups.isnan().all()
        else:
            assert groups.isfinite().all() and (groups == groups[:, :1]).all()
    assert torch.equal(final, final.reshape(P * 4, -1, *SHAPE)[:, :1].expand(-1, N // (P * 4), *SHAPE).reshape(final.shape))


def test_tree_edges_recompute_to_their_log_prob():
    """Any (leaf, step) of the tree's layout recomputes to the stored log-prob (ratio 1) with flow_sde_step."""
    T, sigmas, calls = 4, sde.flow_sigmas(4, 3.0), []
    net = denoise_fn(calls)
    latents, log_probs, _ = sde.tree_rollout(net, torch.randn(1, *SHAPE), sigmas, 0.6, [0, 2], 2, generator=gens(3, 1))
    for leaf in range(4):
        for i in range(T):
            x = latents[leaf:leaf + 1, i]
            _, lp, _, _ = sde.flow_sde_step(net(x, i), x, sigmas[i], sigmas[i + 1], 0.6, prev_sample=latents[leaf:leaf + 1, i + 1])
            assert torch.equal(lp, log_probs[leaf:leaf + 1, i])


@pytest.mark.parametrize("branches, eta, match", [
    ([2, 0], 0.5, "sorted"), ([0, 0], 0.5, "sorted"), ([4], 0.5, "branch_steps"), ([1], [0.5, 0.0, 0.5, 0.5], "eta > 0"),
])
def test_tree_rollout_refuses_bad_branches(branches, eta, match):
    with pytest.raises(ValueError, match=match):
        sde.tree_rollout(denoise_fn([]), torch.zeros(1, *SHAPE), sde.flow_sigmas(4, 3.0), eta, branches, 2)


# ----------------------------------------------------------------------------- grpo: values, advantages, pairs

# The hand-made tree: P = 1, b = 2, branch steps {0, 2}, T = 4, leaf rewards [1, 2, 3, 6].
#   time 0: root (all four leaves)                     value (1 + 2 + 3 + 6) / 4 = 3
#   time 1, 2: nodes A = {1, 2}, B = {3, 6}            values 1.5, 4.5
#   time 3, 4: the leaves                              values 1, 2, 3, 6
# z-scores (unbiased std) per depth:
#   depths 1, 2: mean 3, std sqrt(2 * 1.5^2 / 1) = 1.5 sqrt(2)        A, B: -1/sqrt(2), +1/sqrt(2)
#   depths 3, 4: mean 3, std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3)   leaves: (r - 3) / sqrt(14/3)
R = torch.tensor([1.0, 2.0, 3.0, 6.0])


def test_tree_values_and_advantages_by_hand():
    values = grpo.tree_values(R, 4, [0, 2], 2)
    expected = torch.tensor([[3, 1.5, 1.5, 1, 1], [3, 1.5, 1.5, 2, 2], [3, 4.5, 4.5, 3, 3], [3, 4.5, 4.5, 6, 6]])
    torch.testing.assert_close(values, expected)
    s, h = math.sqrt(14 / 3), 1 / math.sqrt(2)
    leaf = [(r - 3) / s for r in (1, 2, 3, 6)]
    expected = torch.tensor([[-h, -h, leaf[0], leaf[0]], [-h, -h, leaf[1], leaf[1]],
                             [h, h, leaf[2], leaf[2]], [h, h, leaf[3], leaf[3]]])
    torch.testing.assert_close(grpo.tree_advantages(R, 4, [0, 2], 2), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grpo.tree_advantages(R, 4, [0, 2], 2, clip=0.5), expected.clamp(-0.5, 0.5))


def test_path_weighted_values_by_hand():
    """--tree_prob_weighted: at step 2, A's children have edge log-probs 0 and ln 3: weights 1/4, 3/4, so A is worth
    1/4 + 2 * 3/4 = 1.75; B's children have equal log-probs: 4.5. At step 0 A and B have log-probs ln 1, ln 3: the
    root is 1.75 / 4 + 4.5 * 3 / 4 = 3.8125. Steps 1 and 3 have one child each: the value passes up unchanged."""
    lp = torch.full((4, 4), float("nan"))
    lp[:, 0] = torch.tensor([0.0, 0.0, math.log(3), math.log(3)])
    lp[:, 2] = torch.tensor([0.0, math.log(3), -2.0, -2.0])
    values = grpo.tree_values(R, 4, [0, 2], 2, log_probs=lp)
    expected = torch.tensor([[3.8125, 1.75, 1.75, 1, 1], [3.8125, 1.75, 1.75, 2, 2],
                             [3.8125, 4.5, 4.5, 3, 3], [3.8125, 4.5, 4.5, 6, 6]])
    torch.testing.assert_close(values, expected)


def test_one_node_depths_and_equal_values_get_zero_and_trees_are_scored_apart():
    adv = grpo.tree_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), 4, [1, 2], 2)
    assert (adv[:, 0] == 0).all()  # depth 1 holds one node of each tree (the first split is at step 1)
    assert (adv[4:] == 0).all()  # the second tree's leaves are equal: std < 1e-6
    torch.testing.assert_close(adv[:4, 2:], grpo.tree_advantages(R, 4, [1, 2], 2)[:, 2:])  # not mixed with tree 2


def test_tree_pairs_train_each_sde_edge_once_by_its_first_leaf():
    pairs = grpo.tree_pairs(4, {0, 2}, [0, 2], 2, 1)  # SDE at the branch steps only
    expected = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(pairs, expected)  # edges root->A (leaf 0), root->B (leaf 2), the four at step 2
    assert torch.equal(grpo.trained_steps(pairs), torch.tensor([[0, 2], [2, -1], [0, 2], [2, -1]]))
    window = grpo.tree_pairs(4, {0, 1, 2, 3}, [0, 2], 2, 2)  # a window of every step, two trees
    assert window[:, 1].nonzero().flatten().tolist() == [0, 2, 4, 6] and not window[:, 3].any()  # last: never
    assert not grpo.tree_pairs(4, {0, 1}, [1], 2, 1)[:, 0].any()  # step 0 leads to depth 1: one node, untrained
    assert int(pairs.sum()) == 2 + 4  # every edge once: 2 at the first split, 4 at the second


def test_depth_pruning_and_its_sliding_window():
    pairs = grpo.tree_pairs(4, {0, 2}, [0, 2], 2, 1)
    pruned = grpo.prune_depths(pairs, [3])  # depth 3: the nodes after step 2, i.e. step 2's edges
    assert not pruned[:, 2].any() and torch.equal(pruned[:, 0], pairs[:, 0]) and pairs[:, 2].all()
    depths = [15, 16, 17, 18]
    assert grpo.slide_depths(depths, 28, 30, 9) == depths  # their step 29: no shift yet
    assert grpo.slide_depths(depths, 29, 30, 9) == [14, 15, 16, 17]  # their step 30: one
    assert grpo.slide_depths(depths, 10_000, 30, 9) == [9, 10, 11, 12]  # stops at depth 9
    assert grpo.slide_depths(depths, 10_000, 0, 9) == depths  # interval 0: fixed


def test_width_pruning_keeps_the_best_and_worst_of_the_deepest_trained_layer_per_tree():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 9.0, 4.0, 8.0, 1.0])
    adv = grpo.tree_advantages(rewards, 4, [0, 2], 2)
    pairs = grpo.tree_pairs(4, {0, 2}, [0, 2], 2, 2)
    pruned = grpo.prune_width(pairs, adv, 4, 0.5)  # keep max(2, int(4 * 0.5)) = 2 of 4: the best and the worst
    assert pruned[:, 2].nonzero().flatten().tolist() == [0, 3, 4, 7]  # tree 1: rewards 1, 6; tree 2: 9, 1
    assert torch.equal(pruned[:, 0], pairs[:, 0])  # shallower layers are untouched
    wide = grpo.tree_pairs(4, {0, 1, 2}, [0, 1, 2], 2, 1)  # 8 leaves: keep 4 of step 2's 8, the best 2 and worst 2
    adv8 = grpo.tree_advantages(torch.tensor([5.0, 1, 7, 3, 8, 2, 6, 4]), 4, [0, 1, 2], 2)
    assert grpo.prune_width(wide, adv8, 8, 0.5)[:, 2].nonzero().flatten().tolist() == [1, 2, 4, 5]  # 8, 7 and 1, 2


# ----------------------------------------------------------------------------- sampling and the train script

import copy  # noqa: E402  (the tests below need the pipelines)

import models  # noqa: E402
import sampling  # noqa: E402
import train_image  # noqa: E402
from conftest import read_metrics  # noqa: E402

TINY = ["--model", "tiny-flux", "--num_steps", "4"]


@pytest.mark.parametrize("rollout_batch", [None, 3])
def test_rollout_groups_one_split_into_g_is_the_chain_rollout_bit_for_bit(rollout_batch):
    """Same seeds (root noise from seeded(seed, iteration, g), SDE noise from (.., g, 1)), same network batches:
    a tree splitting G ways at step 0 with eta at every step is the chain rollout (shared_first=G) of today."""
    chain_args = train_image.parse_args([*TINY, "--group_size", "4"])
    chain_args.rollout_batch = rollout_batch
    tree_args = copy.copy(chain_args)
    tree_args.branch_steps, tree_args.branch_factor = (0,), 4
    pipe = models.load_pipeline("tiny-flux")
    schedule = sampling.schedule_for(pipe, chain_args)  # eta at every step
    cond = models.encode_prompts(pipe, ["a cat"] * 4 + ["a dog"] * 4, "cpu")
    chain = sampling.rollout_groups(pipe, cond, [0, 5], schedule, chain_args, 3)
    tree = sampling.rollout_groups(pipe, cond, [0, 5], schedule, tree_args, 3)
    for a, b in zip(chain, tree):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_for_iteration_puts_the_sde_at_branch_and_window_steps():
    args = train_image.parse_args([*TINY, "--group_size", "4", "--branch_steps", "0,2", "--sde", "flow_grpo",
                                   "--eta", "0.7"])
    schedule = sampling.schedule_for(models.load_pipeline("tiny-flux"), args)
    etas = sampling.for_iteration(schedule, 0, args).etas
    assert torch.equal(etas, torch.stack([schedule.etas[0], torch.tensor(0.0).double(), schedule.etas[2],
                                          torch.tensor(0.0).double()]))
    args.sde_window = 2  # the window of iteration 0 is steps 0, 1
    assert (sampling.for_iteration(schedule, 0, args).etas[:3] == schedule.etas[:3]).all()
    assert sampling.for_iteration(schedule, 0, args).etas[3] == 0


def test_timesteps_for_trains_each_edge_once_and_leaves_chains_alone():
    args = train_image.parse_args([*TINY, "--group_size", "4", "--branch_steps", "0,2"])
    steps = sampling.timesteps_for([0, 1], args, 0)
    assert torch.equal(steps, torch.tensor([[0, 2], [2, -1], [0, 2], [2, -1]] * 2))
    args.width_pruning_mode = 2  # keep the best and worst of step 2's four edges per tree
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.1, 0.2, 0.3, 0.4])[None, :, None].expand(2, 8, 4)  # two rewards
    pruned = sampling.timesteps_for([0, 1], args, 0, adv, [1.0, 0.5])
    assert torch.equal(pruned, torch.tensor([[0, -1], [2, -1], [0, -1], [2, -1], [0, 2], [-1, -1], [0, -1], [2, -1]]))
    chain = train_image.parse_args([*TINY, "--group_size", "4"])
    assert torch.equal(sampling.timesteps_for([0, 1], chain, 3), sampling.timesteps_for([0, 1], chain, 3, adv, [1.0]))


@pytest.mark.parametrize("flags, match", [
    (["--branch_steps", "0,2", "--group_size", "8"], "--group_size 8 must equal"),
    (["--branch_steps", "0,3", "--group_size", "4"], r"--branch_steps must be increasing steps in \[0, 2\]"),
    (["--branch_steps", "2,0", "--group_size", "4"], "increasing"),
    (["--branch_steps", "0,x"], "invalid step_list value"),
    (["--width_pruning_mode", "2"], "need --branch_steps"),
    (["--depth_pruning", "3"], "need --branch_steps"),
    (["--branch_steps", "0,2", "--group_size", "4", "--no-same_noise"], "one root noise"),
    (["--branch_steps", "0,2", "--group_size", "4", "--sde_window", "1", "--ode_steps_after", "1"], "ode_steps_after"),
    (["--branch_steps", "0,2", "--group_size", "4", "--width_pruning_ratio", "0"], "width_pruning_ratio"),
])
def test_check_args_refuses_bad_tree_flags_in_one_line(flags, match, capsys):
    with pytest.raises(SystemExit):
        train_image.parse_args([*TINY, *flags])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and __import__("re").search(match, err), err


def test_update_indexes_tree_advantages_by_leaf_and_step():
    """accumulate_gradients with advantages [K, N, T] trains pair (b, j) with advantage [:, b, j]: the same loss and
    gradient as the pairs laid out as samples of their own with those advantages as [K, M]."""
    args = train_image.parse_args([*TINY, "--group_size", "4", "--branch_steps", "0,2", "--micro_batch", "3"])
    pipe = models.load_pipeline("tiny-flux")
    schedule = sampling.for_iteration(sampling.schedule_for(pipe, args), 0, args)
    cond = models.encode_prompts(pipe, ["a cat"] * 4, "cpu")
    latents, log_probs, _ = sampling.rollout_groups(pipe, cond, [0], schedule, args, 0)
    adv = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = sampling.timesteps_for([0], args, 0)
    keep = steps.flatten() >= 0
    b, j = torch.arange(4).repeat_interleave(steps.shape[1])[keep], steps.flatten()[keep]
    common = dict(weights=[1.0, 0.3], schedule=schedule, extra=None, reference=None)
    tree = dict(latents=latents, log_probs=log_probs, advantages=adv, cond=cond, **common)
    flat = dict(latents=latents[b], log_probs=log_probs[b], advantages=adv[:, b, j],
                cond={k: v[b] for k, v in cond.items()}, **common)
    results = []
    for batch, samples in ((tree, b), (flat, torch.arange(len(b)))):
        pipe.transformer.zero_grad(set_to_none=True)
        loss, ratios, _ = train_image.accumulate_gradients(pipe, batch, samples, j, args, torch.device("cpu"))
        results.append((loss, ratios, [p.grad.clone() for p in pipe.transformer.parameters() if p.grad is not None]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6) and results[0][0] != 0
    assert torch.equal(results[0][1], results[1][1]) and ((results[0][1] - 1).abs() < 1e-5).all()
    for g1, g2 in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("flags, pairs", [
    ([], 2 * (2 + 4)),  # per tree: the two edges of the split at step 0, the four at step 2
    (["--sde_window", "2"], 2 * (2 + 2 + 4)),  # the window (steps 0, 1) adds step 1's two edges
    (["--width_pruning_mode", "2", "--tree_prob_weighted"], 2 * (2 + 2)),  # 2 of step 2's 4 edges
])
def test_tiny_training_runs_on_trees_with_ratio_one_before_the_first_step(flags, pairs, tmp_path):
    initial = {k: v.clone() for k, v in models.trained_module(models.load_pipeline("tiny-flux")).state_dict().items()}
    _, net = train_image.main([*TINY, "--branch_steps", "0,2", "--group_size", "4", "--iterations", "2",
                               "--prompts_per_rank", "2", "--output_dir", str(tmp_path), *flags])
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["first_ratio_error"] < 1e-6 and r["trained_pairs"] == pairs and r["skipped_updates"] == 0
               for r in rows)
    assert any(not torch.equal(initial[k], v) for k, v in net.state_dict().items())


def test_train_video_refuses_trees_in_one_line(capsys):
    import train_video
    with pytest.raises(SystemExit):
        train_video.parse_args(["--model", "tiny-wan", "--branch_steps", "0", "--group_size", "2"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("is for train_image.py only")
