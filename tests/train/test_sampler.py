import random

from dstune.train.sampler import ShuffledLengthGroupedSampler


def make(n=400, batch_size=8, seed=0):
    rng = random.Random(1)
    lengths = [rng.randint(5, 200) for _ in range(n)]
    return lengths, ShuffledLengthGroupedSampler(lengths, batch_size, seed=seed, megabatch_batches=10)


def test_every_sample_once_per_epoch():
    lengths, sampler = make()
    assert sorted(sampler) == list(range(len(lengths)))
    assert len(sampler) == len(lengths)


def test_batches_group_similar_lengths():
    lengths, sampler = make()
    padded = sum(len(b) * max(lengths[i] for i in b) for b in sampler.batches())
    random_batches = [list(range(i, i + 8)) for i in range(0, 400, 8)]
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.8 * padded_random


def test_batch_order_is_shuffled_not_long_to_short():
    lengths, sampler = make()
    means = [sum(lengths[i] for i in b) / len(b) for b in sampler.batches()]
    descending_runs = sum(a >= b for a, b in zip(means, means[1:]))
    assert 0.3 < descending_runs / (len(means) - 1) < 0.7


def test_epochs_differ_and_are_reproducible():
    _, sampler = make()
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
