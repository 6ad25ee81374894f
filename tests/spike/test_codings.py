"""Spike codings: encode -> decode is the identity on random integers; trains, spike counts and
time steps match hand-written examples; unrepresentable counts are errors naming the fix."""

from __future__ import annotations

import pytest
import torch

from sbtrain.spike.codings import (
    CODINGS,
    SIGNED_CODINGS,
    CodingError,
    decode,
    encode,
    num_spikes,
    spikes_per_element,
    time_steps,
    twos_complement_width,
)

# (coding, count, steps or None, hand-written train, spikes) — trains are MSB first for bitwise.
HAND_EXAMPLES = [
    ("binary", 3, None, [1, 1, 1], 3),
    ("binary", 2, 4, [1, 1, 0, 0], 2),
    ("binary", 0, None, [0], 0),
    ("ternary", -3, None, [-1, -1, -1], 3),
    ("ternary", 2, 3, [1, 1, 0], 2),
    ("bitwise_pure", 5, None, [1, 0, 1], 2),
    ("bitwise_pure", 6, None, [1, 1, 0], 2),
    ("bitwise_pure", 7, 4, [0, 1, 1, 1], 3),
    ("bitwise_pure", 8, None, [1, 0, 0, 0], 1),
    ("bitwise_bidirectional", -5, None, [-1, 0, -1], 2),
    ("bitwise_bidirectional", 6, None, [1, 1, 0], 2),
    ("twos_complement", -5, 4, [1, 0, 1, 1], 3),  # -8 + 2 + 1
    ("twos_complement", 5, 4, [0, 1, 0, 1], 2),
    ("twos_complement", -1, None, [1], 1),  # width 1 holds [-1, 0]
    ("twos_complement", 3, None, [0, 1, 1], 2),  # width 3 holds [-4, 3]
    ("twos_complement", -4, None, [1, 0, 0], 1),
]


@pytest.mark.parametrize("coding, count, steps, train, spikes", HAND_EXAMPLES)
def test_hand_examples(coding, count, steps, train, spikes):
    got = encode(torch.tensor([count]), coding, steps=steps)
    assert got.dtype == torch.int8
    assert got[:, 0].tolist() == train
    assert time_steps(got) == len(train)
    assert num_spikes(got) == spikes
    assert decode(got, coding).tolist() == [count]


def test_multi_element_train_shape_and_per_element_spikes():
    counts = torch.tensor([[5, 0], [2, 7]])
    train = encode(counts, "bitwise_pure")
    assert train.shape == (3, 2, 2)  # T = bits of the largest count (7 -> 3 bits)
    assert spikes_per_element(train).tolist() == [[2, 0], [1, 3]]
    assert num_spikes(train) == 6
    ternary = encode(torch.tensor([-2, 0, 3]), "ternary")
    assert ternary.T.tolist() == [[-1, -1, 0], [0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("coding", list(CODINGS))
def test_encode_decode_identity_on_random_integers(coding):
    gen = torch.Generator().manual_seed(1)
    low = -40 if coding in SIGNED_CODINGS else 0
    counts = torch.randint(low, 41, (7, 5), generator=gen)
    counts[0, 0] = 40  # the range edges are included
    if low:
        counts[0, 1] = low
    train = encode(counts, coding)
    assert torch.equal(decode(train, coding), counts)
    # a float tensor of integral values (what spike_counts returns) encodes the same
    assert torch.equal(encode(counts.float(), coding), train)


def test_spike_totals_match_their_definitions():
    counts = torch.arange(-20, 21)
    magnitude = counts.abs()
    popcount = torch.tensor([int(m).bit_count() for m in magnitude])
    assert torch.equal(spikes_per_element(encode(counts, "ternary")), magnitude)
    assert torch.equal(spikes_per_element(encode(counts, "bitwise_bidirectional")), popcount)
    assert torch.equal(spikes_per_element(encode(magnitude, "binary")), magnitude)
    assert torch.equal(spikes_per_element(encode(magnitude, "bitwise_pure")), popcount)
    width = twos_complement_width(counts)
    assert width == 6  # [-32, 31] holds [-20, 20], [-16, 15] does not
    patterns = torch.tensor([(int(c) & (2**width - 1)).bit_count() for c in counts])
    assert torch.equal(spikes_per_element(encode(counts, "twos_complement")), patterns)


@pytest.mark.parametrize("coding", ["binary", "bitwise_pure"])
def test_signed_input_to_unsigned_coding_names_the_alternatives(coding):
    with pytest.raises(CodingError, match="non-negative.*-2.*ternary.*bitwise_bidirectional"):
        encode(torch.tensor([1, -2]), coding)


def test_too_few_steps_and_bad_inputs_are_errors():
    with pytest.raises(CodingError, match="steps=2 is too few, the counts need 3"):
        encode(torch.tensor([5]), "bitwise_pure", steps=2)
    with pytest.raises(CodingError, match=r"4 bits hold \[-8, 7\].*steps >= 5"):
        encode(torch.tensor([8]), "twos_complement", steps=4)
    with pytest.raises(CodingError, match="fractional"):
        encode(torch.tensor([0.5]), "ternary")
    with pytest.raises(CodingError, match="unknown"):
        encode(torch.tensor([1]), "unary")
