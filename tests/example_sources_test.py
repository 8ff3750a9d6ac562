"""Tests of `example_sources.GeneratedSource`: the code layout and the stateless draws behind the
generated tasks built on the worker (sinusoid, synthetic). Their distributions are tested in
tests/sinusoid_on_workers_test.py and tests/synthetic_on_workers_test.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.data import example_sources

POPULATIONS = {"train": (5, 200), "eval": (3, 7)}


class _Draws(example_sources.GeneratedSource):
    """x = (the client's uniform draw, the example's normal draw); y = the slot."""

    label_spec = (np.float32, (0,))

    def __init__(self, seed=0, populations=POPULATIONS):
        super().__init__("test", seed, populations)

    def build_flat(self, codes):
        kind, number, slot = self.decode(codes)
        client = self.per_client(
            kind, number, lambda s: s.uniform(0, []), tf.TensorSpec([], tf.float64)
        )
        example = self.per_example(
            kind, number, slot, lambda s: s.normal(0, [self.BLOCK]), tf.TensorSpec([64], tf.float64)
        )
        return tf.stack([client, example], axis=-1), tf.cast(slot, tf.float32)


def test_codes_name_population_client_and_slot():
    source = _Draws()
    train = source.encode("train/00004", [0, 199])
    held_out = source.encode("eval/2", [0, 6])
    np.testing.assert_array_equal(train, [4 * 200, 4 * 200 + 199])
    np.testing.assert_array_equal(held_out, [1000 + 2 * 7, 1000 + 2 * 7 + 6])
    assert train.dtype == held_out.dtype == np.int32
    kind, number, slot = (v.numpy() for v in source.decode(np.concatenate([train, held_out])))
    np.testing.assert_array_equal(kind, [0, 0, 1, 1])
    np.testing.assert_array_equal(number, [4, 4, 2, 2])
    np.testing.assert_array_equal(slot, [0, 199, 0, 6])
    for client_id, slots in (("train/00005", [0]), ("eval/0", [7]), ("train/0", [-1])):
        with pytest.raises(ValueError, match="outside the code layout"):
            source.encode(client_id, slots)


def test_more_codes_than_int32_holds_are_refused():
    _Draws(populations={"train": (2**31 // 64, 64)})  # exactly 2^31 codes: 0 .. 2^31 - 1
    with pytest.raises(ValueError, match="exceed 2\\^31") as error:
        _Draws(populations={"train": (2**31 // 64, 64), "eval": (1, 1)})
    assert "1 eval clients x 1" in str(error.value) and "\n" not in str(error.value)


def test_an_example_is_a_function_of_its_code_only():
    source = _Draws()
    codes = source.encode("train/00002", np.arange(200))
    alone = source.build_flat(codes)[0].numpy()
    # The client's value is one draw for all its examples; the examples' draws differ.
    assert len(set(alone[:, 0])) == 1 and len(set(alone[:, 1])) == 200
    # With other clients' codes, in another order, across block boundaries: the same values.
    rng = np.random.default_rng(0)
    some = rng.permutation(200)[:70]
    mixed = np.concatenate(
        [codes[some], source.encode("train/00003", [5, 64]), source.encode("eval/2", [1])]
    )
    together = source.build_flat(mixed)[0].numpy()
    np.testing.assert_array_equal(together[:70], alone[some])
    # Other clients, a held-out client of the same number, another seed: other draws.
    other_client = source.build_flat(source.encode("train/00003", [5]))[0].numpy()
    same_number = source.build_flat(source.encode("eval/2", [5]))[0].numpy()
    other_seed = _Draws(seed=1).build_flat(codes[:1])[0].numpy()
    for values, slot in ((other_client, 5), (same_number, 5), (other_seed, 0)):
        assert values[0, 0] != alone[slot, 0] and values[0, 1] != alone[slot, 1]
    # The draws are standard normal (200 of them: mean within 4 / sqrt(200) of 0).
    assert abs(alone[:, 1].mean()) < 4 / np.sqrt(200)


def test_build_on_worker_builds_every_part_in_one_call_with_padding_zeroed():
    source = _Draws()
    codes = np.stack(
        [source.encode("train/00001", np.arange(8)), source.encode("train/00004", np.arange(8))]
    )
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8], np.float32)
    data = collections.OrderedDict(
        support=collections.OrderedDict(
            x=codes[:, :3].reshape(2, 1, 3),
            y=np.zeros((2, 1, 3, 0), np.float32),
            mask=mask[:, :3].reshape(2, 1, 3),
        ),
        query=collections.OrderedDict(
            x=codes[:, 3:].reshape(2, 1, 5),
            y=np.zeros((2, 1, 5, 0), np.float32),
            mask=mask[:, 3:].reshape(2, 1, 5),
        ),
    )
    built = example_sources.build_on_worker(data, source)
    for name, part in built.items():
        assert list(part) == ["x", "y", "mask"]
        assert part["x"].shape == data[name]["x"].shape + (2,)
        assert part["y"].shape == data[name]["x"].shape
        # Each part as `build` makes it alone, padding zeroed.
        x, y = source.build(data[name]["x"], data[name]["y"])
        real = data[name]["mask"] > 0
        np.testing.assert_array_equal(part["x"].numpy()[real], x.numpy()[real])
        np.testing.assert_array_equal(part["y"].numpy()[real], y.numpy()[real])
        assert np.all(part["x"].numpy()[~real] == 0.0) and np.all(part["y"].numpy()[~real] == 0.0)


def test_a_client_has_16_streams():
    streams = example_sources.Streams(tf.constant([1], tf.uint64), tf.constant(0, tf.int64), 0)
    assert streams.uniform(15, [2]).shape == (2,)
    with pytest.raises(ValueError, match="16 streams"):
        streams.normal(16, [2])
