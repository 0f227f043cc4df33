"""One definition of the loss: the same update under every batching and mesh.

Each test runs 3 real train steps (`jaxsft.train.make_train_step`, float32, AdamW with clipping)
on explicit batch-contract batches and compares, against a reference run, the loss and the
gradient norm of every step and the parameters after the last step (relative difference
<= 1e-5). The batches are built here, by hand, so that what is compared is known exactly.
"""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest

from jaxsft import parallel
from jaxsft.config import MeshConfig, ModelConfig, OptimizerConfig
from jaxsft.stepspec import StepSpec
from jaxsft.train import decay_mask, init_state, make_train_step

SEQ = 64
OPT = OptimizerConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.01, clip_norm=1.0)
TOL = 1e-5


def make_examples(n, vocab, seed, prompt=(4, 20), completion=(2, 24)):
    """`n` shifted examples (tokens, targets, loss_mask) with random prompt/completion lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c = rng.integers(*prompt), rng.integers(*completion)
        ids = rng.integers(5, vocab, p + c + 1)
        mask = np.r_[np.zeros(p + 1), np.ones(c)].astype(np.int32)
        out.append({"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]})
    return out


def rows(groups, seq=SEQ):
    """A batch whose row r holds the examples of `groups[r]` back to back, then padding."""
    batch = {k: np.zeros((len(groups), seq), np.int32)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    for r, group in enumerate(groups):
        at = 0
        for s, ex in enumerate(group, start=1):
            n = len(ex["tokens"])
            assert at + n <= seq, "group does not fit in a row"
            for k in ("tokens", "targets", "loss_mask"):
                batch[k][r, at:at + n] = ex[k]
            batch["segment_ids"][r, at:at + n] = s
            batch["positions"][r, at:at + n] = np.arange(n)
            at += n
    return batch


def packed_groups(examples, seq=SEQ):
    """Greedy first-fit grouping of examples into rows of `seq`."""
    groups, used = [], []
    for ex in examples:
        for i, group in enumerate(groups):
            if used[i] + len(ex["tokens"]) <= seq:
                group.append(ex)
                used[i] += len(ex["tokens"])
                break
        else:
            groups.append([ex])
            used.append(len(ex["tokens"]))
    return groups


def run(model_dir, batches, devices, mesh=MeshConfig(fsdp=1), grad_accum=1, max_segment_len=0, row_trained=0):
    """3 train steps on `devices`; returns per-step (loss, grad_norm, trained tokens), the final params
    and the initial params, on the host."""
    m = parallel.make_mesh(mesh, devices)
    _, graphdef, state, tx, schedule = init_state(ModelConfig(path=str(model_dir)), OPT, 10, m)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(graphdef, tx, schedule, m, shardings,
                           StepSpec(grad_accum=grad_accum, max_segment_len=max_segment_len, row_trained=row_trained))
    initial = jax.device_get(state["params"])
    trace = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, m))
        trace.append((float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["trained_tokens"])))
    return trace, jax.device_get(state["params"]), initial


def assert_same(a, b, tol=TOL):
    """Losses, gradient norms and parameters agree to `tol`; the updates (parameters minus their
    initial values, a far smaller quantity) agree to 10 x `tol`."""
    (trace_a, params_a, _), (trace_b, params_b, initial) = a, b
    for (la, ga, na), (lb, gb, nb) in zip(trace_a, trace_b):
        assert na == nb
        assert abs(la - lb) <= tol * abs(lb), (la, lb)
        assert abs(ga - gb) <= tol * abs(gb), (ga, gb)
    for path, x in jax.tree_util.tree_leaves_with_path(params_a):
        y = _at(params_b, path)
        rel = np.linalg.norm(x - y) / np.linalg.norm(y)
        assert rel <= tol, (jax.tree_util.keystr(path), rel)
        update_rel = np.linalg.norm(x - y) / np.linalg.norm(y - _at(initial, path))
        assert update_rel <= 10 * tol, (jax.tree_util.keystr(path), update_rel)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.fixture(scope="module")
def vocab(tiny_llama):
    import json
    return json.loads((tiny_llama / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def batches(vocab):
    """3 global batches of 8 packed rows each."""
    out = []
    for s in range(3):
        groups = packed_groups(make_examples(26, vocab, seed=s))[:8]
        assert len(groups) == 8
        out.append(rows(groups))
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama, batches):
    """One device, no accumulation."""
    return run(tiny_llama, batches, jax.devices()[:1])


def test_params_move_and_loss_falls(reference):
    trace, params, initial = reference
    assert trace[-1][0] < trace[0][0]
    for x, x0 in zip(jax.tree.leaves(params), jax.tree.leaves(initial)):
        assert np.abs(x - x0).max() > 0


def test_grad_accumulation_matches_one_batch(tiny_llama, batches, reference):
    assert_same(run(tiny_llama, batches, jax.devices()[:1], grad_accum=4), reference)


@pytest.mark.parametrize("mesh", [
    MeshConfig(data=8, fsdp=1, tensor=1),
    MeshConfig(data=1, fsdp=8, tensor=1),
    MeshConfig(data=1, fsdp=4, tensor=2),
    MeshConfig(data=2, fsdp=2, tensor=2),
], ids=["data8", "fsdp8", "fsdp4xtensor2", "data2xfsdp2xtensor2"])
def test_eight_devices_match_one(tiny_llama, batches, reference, mesh):
    assert len(jax.devices()) == 8
    assert_same(run(tiny_llama, batches, jax.devices(), mesh), reference)


def test_packed_rows_match_one_example_per_row(tiny_llama, vocab):
    """The same examples packed 3-4 to a row, or one per (padded) row: same loss, same update."""
    packed, single = [], []
    for s in range(3):
        examples = make_examples(16, vocab, seed=10 + s, prompt=(3, 10), completion=(2, 12))
        groups = packed_groups(examples, seq=SEQ)
        assert len(groups) < len(examples)  # really packed
        groups += [[]] * (16 - len(groups))  # same number of rows: padding rows train nothing
        packed.append(rows(groups))
        single.append(rows([[ex] for ex in examples]))
    assert_same(run(tiny_llama, packed, jax.devices()[:1]), run(tiny_llama, single, jax.devices()[:1]))


def test_longest_example_bound_gives_the_same_steps(tiny_llama, batches, reference, monkeypatch):
    """Attention that skips keys further back than the longest packed example (as training runs
    it, `jaxsft.data.pack.longest_segment`) gives the same losses and update, also on 8 devices."""
    from jaxsft.data.pack import longest_segment
    from jaxsft.models import fused

    monkeypatch.setattr(fused, "LOOKBACK_BLOCK", 8)
    longest = max(longest_segment(b["segment_ids"]) for b in batches)
    assert 8 < longest < SEQ - 8  # blocks of 8 queries really skip keys
    assert_same(run(tiny_llama, batches, jax.devices()[:1], max_segment_len=longest), reference)
    assert_same(run(tiny_llama, batches, jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2),
                    max_segment_len=longest), reference)


def test_loss_on_trained_positions_only_gives_the_same_steps(tiny_llama, batches, reference):
    """The head and cross entropy on each row's trained positions only (gathered, `row_trained`
    as many as the row with the most, as training sets it) give the same losses and update, with
    accumulation and on 8 devices too. One position fewer drops a trained token: the test can fail."""
    from jaxsft.data.pack import most_trained

    most = max(most_trained(b["loss_mask"]) for b in batches)
    assert most < SEQ * 3 // 4  # the gather really leaves positions out
    assert_same(run(tiny_llama, batches, jax.devices()[:1], row_trained=most), reference)
    assert_same(run(tiny_llama, batches, jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2), grad_accum=2,
                    row_trained=most), reference)
    short = run(tiny_llama, batches, jax.devices()[:1], row_trained=most - 1)
    assert [n for _, _, n in short[0]] != [n for _, _, n in reference[0]]


def test_uneven_micro_batches_are_not_a_mean_of_means(tiny_llama, vocab):
    """grad_accum=2 where one micro-batch has ~40x the trained tokens of the other.

    Micro-batch a takes rows a, a+2, ...: even rows hold long completions, odd rows one trained token.
    """
    batches = []
    for s in range(3):
        long = make_examples(4, vocab, seed=20 + s, prompt=(2, 4), completion=(40, 56))
        short = make_examples(4, vocab, seed=30 + s, prompt=(30, 50), completion=(1, 2))
        batches.append(rows([[x] for pair in zip(long, short) for x in pair]))
    mb = [batches[0]["loss_mask"][0::2].sum(), batches[0]["loss_mask"][1::2].sum()]
    assert mb[0] > 30 * mb[1]
    one = run(tiny_llama, batches, jax.devices()[:1])
    accum = run(tiny_llama, batches, jax.devices()[:1], grad_accum=2)
    assert_same(accum, one)

    # The test can fail for the right reason: the mean of the two micro-batch means is a
    # different loss by far more than the tolerance.
    from jaxsft.models import from_pretrained
    from jaxsft.loss import loss_sums
    from flax import nnx
    graphdef, params = nnx.split(from_pretrained(str(tiny_llama), "float32"))
    params = nnx.to_pure_dict(params)
    sums = [loss_sums(graphdef, params, {k: v[a::2] for k, v in batches[0].items()}) for a in (0, 1)]
    mean_of_means = np.mean([float(s) / float(n) for s, (n, _) in sums])
    assert abs(mean_of_means - one[0][0][0]) > 100 * TOL * one[0][0][0]


def test_weight_decay_skips_norms_biases_and_embeddings(reference):
    _, params, _ = reference
    mask = decay_mask(params)
    decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed and all(p.endswith("['kernel']") for p in decayed)
    assert not any("norm" in p or "embed" in p for p in decayed)
    assert all(jax.tree.leaves(decay_mask(params, decay_all=True)))


def test_bfloat16_compute_keeps_float32_master_weights(tiny_llama, batches, reference):
    """compute_dtype bfloat16: parameters and Adam moments stay float32; the loss is close to float32's."""
    m = parallel.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    _, graphdef, state, tx, schedule = init_state(ModelConfig(path=str(tiny_llama), compute_dtype="bfloat16"),
                                                  OPT, 10, m)
    step = make_train_step(graphdef, tx, schedule, m, jax.tree.map(lambda x: x.sharding, state))
    state, metrics = step(state, parallel.global_batch(batches[0], m))
    floats = [x for x in jax.tree.leaves(state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and all(x.dtype == jax.numpy.float32 for x in floats)
    assert abs(float(metrics["loss"]) - reference[0][0][0]) <= 2e-2 * reference[0][0][0]


def test_fsdp_shards_adam_moments_like_their_parameters(tiny_llama):
    m = parallel.make_mesh(MeshConfig(fsdp=8), jax.devices())
    _, _, state, _, _ = init_state(ModelConfig(path=str(tiny_llama)), OPT, 10, m)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if ".mu" in jax.tree_util.keystr(p) or ".nu" in jax.tree_util.keystr(p)]
    assert len(moments) == 2 * len(specs)
    sharded = 0
    for path, x in moments:
        param = path.split(".mu")[-1].split(".nu")[-1]
        assert x.sharding.spec == specs[param], path
        sharded += "fsdp" in str(x.sharding.spec)
    assert sharded > 0
    # the output head is vocabulary-parallel (jaxsft.parallel.RULES): split along V, not along D
    assert specs["['lm_head']['kernel']"] == P(None, "fsdp")
