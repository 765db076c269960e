"""Collation, packing (incl. logit equivalence on the installed transformers) and batch planning."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtune.training.batching import (
    collate,
    collate_prefix_rows,
    pack,
    pack_plan,
    padding_fraction,
    plan_batches,
    supports_packing,
)


class Ex:
    def __init__(self, ids, w):
        self.input_ids, self.weights = list(ids), list(w)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_collate_pads_right_and_zeroes_weights():
    b = collate([Ex([5, 6, 7], [0.5, 1, 1]), Ex([8], [1.0])], pad_token_id=3, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 3], [8, 3, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["weights"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]  # t=0 and padding carry no weight
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert b["weights"].dtype == torch.float32
    assert collate([Ex([5, 6, 7], [0, 1, 1])], 0)["input_ids"].shape == (1, 3)  # dynamic: longest in batch
    with pytest.raises(ValueError):
        collate([Ex([1, 2], [0])], 0)


def test_pack_restarts_positions_and_blocks_cross_example_targets():
    b = pack([Ex([5, 6, 7], [1, 1, 1]), Ex([8], [1]), Ex([9, 10], [0.5, 0.5])], max_length=8)
    assert set(b) == {"input_ids", "position_ids", "weights", "seq_lens"}  # no attention_mask
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert b["weights"].tolist() == [[0, 1, 1, 0, 0, 0.5]]
    assert b["seq_lens"].tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="max_length"):
        pack([Ex([1, 2, 3], [0, 1, 1])] * 3, max_length=8)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request, tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation=request.param).train()


def test_packed_logits_equal_separate_runs(tiny_model):
    gen = torch.Generator().manual_seed(0)
    lens = [7, 1, 12, 4]
    exs = [Ex(torch.randint(5, tiny_model.config.vocab_size, (n,), generator=gen).tolist(), [1.0] * n) for n in lens]
    b = pack(exs, 64)
    with torch.no_grad():
        packed = tiny_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        # The pitfall packing must avoid: with a cache object, transformers skips packed-sequence detection.
        leaky = tiny_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=True).logits[0]
        alone = torch.cat([tiny_model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in exs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-2
    assert supports_packing(tiny_model)
    assert tiny_model.training  # the probe restores the mode


def test_supports_packing_false_when_packing_leaks(tiny_model, monkeypatch):
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert not supports_packing(tiny_model)


# ------------------------------------------------------------------------------------------------ planning

lengths_st = st.lists(st.integers(1, 300), min_size=0, max_size=400)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, mbs=st.integers(1, 9), seed=st.integers(0, 1000), epoch=st.integers(0, 5),
       group=st.booleans(), shuffle=st.booleans())
def test_plan_batches_is_a_deterministic_partition(lengths, mbs, seed, epoch, group, shuffle):
    kw = dict(seed=seed, epoch=epoch, group_by_length=group, shuffle=shuffle)
    plan = plan_batches(lengths, mbs, **kw)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= mbs for b in plan)
    assert plan == plan_batches(lengths, mbs, **kw)
    assert len(plan) == math.ceil(len(lengths) / mbs)


def test_plan_batches_changes_with_epoch_and_seed():
    lengths = list(range(1, 500))
    a = plan_batches(lengths, 4, seed=0, epoch=0)
    assert a != plan_batches(lengths, 4, seed=0, epoch=1)
    assert a != plan_batches(lengths, 4, seed=1, epoch=0)
    assert plan_batches(lengths, 4, seed=0, epoch=0, shuffle=False, group_by_length=False)[0] == [0, 1, 2, 3]


def test_length_grouping_cuts_padding_on_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(10, 60, 900), rng.integers(500, 2000, 100)]).tolist()
    grouped = plan_batches(lengths, 8, seed=0, epoch=0)
    random = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(random, lengths)
    cost = [len(b) * max(lengths[i] for i in b) for b in grouped]
    assert cost[0] == max(cost)  # the most expensive micro-batch runs first


def test_padding_fraction():
    assert padding_fraction([[0, 1]], [2, 4]) == pytest.approx(0.25)
    assert padding_fraction([], []) == 0.0


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200), mbs=st.integers(1, 9),
       seed=st.integers(0, 100), empty=st.booleans())
def test_padding_fraction_is_the_padded_share_of_every_batch(lengths, mbs, seed, empty):
    batches = plan_batches(lengths, mbs, seed=seed, epoch=0) + ([[]] if empty else [])
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    assert padding_fraction(batches, lengths) == pytest.approx(1 - real / padded, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), mbs=st.integers(1, 9), per_step=st.integers(1, 5), epochs=st.integers(1, 3),
       group=st.booleans())
def test_total_steps_counts_what_the_plan_makes(n, mbs, per_step, epochs, group):
    from types import SimpleNamespace

    from imtune.training.data import Plan

    class Data:  # what Plan reads of an EncodedSet
        lengths = np.arange(1, n + 1)

        def __len__(self):
            return n

    cfg = SimpleNamespace(max_steps=0, packing=False, micro_batch_size=mbs, group_by_length=group, seed=0,
                          epochs=epochs)
    plan = Plan(cfg, Data(), per_step, 1)
    assert plan.total_steps() == sum(len(plan.steps(e)) for e in range(epochs))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=0, max_size=300), max_length=st.integers(64, 200),
       seed=st.integers(0, 100), epoch=st.integers(0, 3))
def test_pack_plan_fits_and_covers(lengths, max_length, seed, epoch):
    plan = pack_plan(lengths, max_length, seed=seed, epoch=epoch)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= max_length for b in plan)
    assert plan == pack_plan(lengths, max_length, seed=seed, epoch=epoch)
    lower = math.ceil(sum(lengths) / max_length)
    assert len(plan) <= 11 / 9 * lower + 1  # first/best-fit-decreasing bound against the optimum


def test_pack_plan_rejects_too_long_and_varies_by_epoch():
    with pytest.raises(ValueError, match="max_length"):
        pack_plan([3, 9], 8, seed=0, epoch=0)
    lengths = [5] * 40 + [3] * 40
    assert pack_plan(lengths, 16, seed=0, epoch=0) != pack_plan(lengths, 16, seed=0, epoch=1)


def test_pack_plan_bins_feed_pack():
    gen = torch.Generator().manual_seed(1)
    exs = [Ex(torch.randint(5, 99, (n,), generator=gen).tolist(), [1.0] * n) for n in (30, 5, 17, 40, 2, 9)]
    plan = pack_plan([len(e.input_ids) for e in exs], 48, seed=0, epoch=0)
    rows = [pack([exs[i] for i in b], 48) for b in plan]
    assert sum(r["seq_lens"].numel() for r in rows) == len(exs)
    assert all(r["input_ids"].shape[1] <= 48 for r in rows)


def test_collate_prefix_rows_layout():
    rows = [([1, 2, 3], [[4, 5], [], [6]]), ([7], [[8, 9, 10]])]
    b = collate_prefix_rows(rows, 0, shared=True)
    assert b["seg_starts"] == [[3, 5, 5], [1]]
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    allowed = (b["attention_mask"][:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]  # [6] never sees [4, 5]
    assert allowed[1][4] == [0, 0, 0, 0, 1, 0] and allowed[1][5] == [0, 0, 0, 0, 0, 1]  # padding sees itself
    plain = collate_prefix_rows(rows, 0, shared=False)
    assert "position_ids" not in plain and plain["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
