"""Special-token and entropy masks (opd_exp/objectives/masks.py)."""

from __future__ import annotations

import torch

from opd_exp.objectives.masks import entropy_BT, entropy_top_q_mask, special_token_mask_BT

TOKENS = torch.tensor([[5, 7, 5, 9, 7, 5, 0, 0],
                       [1, 2, 3, 4, 5, 6, 7, 8],
                       [7, 7, 7, 5, 5, 0, 7, 5]])
COMPLETION = torch.tensor([[True] * 6 + [False] * 2,
                           [True] * 8,
                           [False, True, True, True, True, True, False, False]])  # row 2: prompt at t=0


def test_first_masks_exactly_one_occurrence_of_each_id_inside_the_completion():
    remove = special_token_mask_BT(TOKENS, COMPLETION, [5, 7], mode="first")
    expected = torch.zeros_like(COMPLETION)
    expected[0, 0] = expected[0, 1] = True  # first 5, first 7
    expected[1, 4] = expected[1, 6] = True
    expected[2, 1] = expected[2, 3] = True  # t=0 is not completion; t=6, 7 are padding
    assert torch.equal(remove, expected)
    for token_id in (5, 7):
        per_row = ((TOKENS == token_id) & remove).sum(1)
        has = ((TOKENS == token_id) & COMPLETION).any(1)
        assert torch.equal(per_row, has.long())


def test_all_masks_every_occurrence():
    remove = special_token_mask_BT(TOKENS, COMPLETION, [5], mode="all")
    assert torch.equal(remove, (TOKENS == 5) & COMPLETION)
    assert int(remove[0].sum()) == 3


def test_no_ids_masks_nothing_and_masks_compose():
    assert not special_token_mask_BT(TOKENS, COMPLETION, [], mode="all").any()
    loss_mask = COMPLETION & ~special_token_mask_BT(TOKENS, COMPLETION, [9], mode="first")
    assert int(loss_mask.sum()) == int(COMPLETION.sum()) - 1 and not loss_mask[0, 3]


def test_entropy_top_q_keeps_the_highest_entropy_fraction_per_row():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 5.0],
                        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, True, True, True, False],   # masked-out 5.0 is never kept
                         [True] * 6])
    keep = entropy_top_q_mask(ent, mask, 0.4)
    assert torch.equal(keep[0], torch.tensor([False, True, False, True, False, False]))  # ceil(0.4 * 5) = 2
    assert torch.equal(keep[1], torch.tensor([False, False, False, True, True, True]))  # ceil(0.4 * 6) = 3
    assert torch.equal(entropy_top_q_mask(ent, mask, 1.0), mask)
    tiny = entropy_top_q_mask(ent, mask, 0.01)
    assert torch.equal(tiny.sum(1), torch.tensor([1, 1]))  # at least one per non-empty row
    assert not entropy_top_q_mask(ent, torch.zeros_like(mask), 0.5).any()


def test_entropy_from_logits_matches_definition_and_mask():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(entropy_BT(logits, chunk_size=3), -(logp.exp() * logp).sum(-1), atol=1e-6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(entropy_top_q_mask(logits, mask, 0.2), entropy_top_q_mask(entropy_BT(logits), mask, 0.2))
