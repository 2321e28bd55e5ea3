"""Next-token choice on crafted logit vectors, and against transformers' own logits processors."""
import pytest
import torch

from lora_core.sampling import Sampling, filter_top_k, filter_top_p, next_token, penalize_repetition

NEG = float("-inf")


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = penalize_repetition(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched
    mask = torch.tensor([True, True, False, False])  # the same context as a mask over the vocabulary
    assert penalize_repetition(logits, mask, 2.0).tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]
    assert penalize_repetition(logits, torch.tensor([0]), 1.0) is logits


def test_top_k_hand_computed():
    out = filter_top_k(torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5]), 2)
    assert out.tolist() == [NEG, 3.0, NEG, NEG, 2.5]
    assert filter_top_k(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


def test_top_p_hand_computed():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert filter_top_p(logits, 0.7).isfinite().tolist() == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert filter_top_p(logits, 0.4).isfinite().tolist() == [False, True, False, False]  # the top token alone
    assert filter_top_p(logits, 0.9).isfinite().tolist() == [False, True, True, True]
    assert filter_top_p(logits, 1.0).isfinite().all()


def test_against_transformers_processors():
    tp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, 500, generator=g) * 3
        seen = torch.randint(0, 500, (1, 30), generator=g)
        ref = tp.RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
        torch.testing.assert_close(penalize_repetition(logits[0], seen[0], 1.3), ref[0])
        mask = torch.zeros(500, dtype=torch.bool)
        mask[seen[0]] = True
        torch.testing.assert_close(penalize_repetition(logits[0], mask, 1.3), ref[0])
        ref = tp.TopKLogitsWarper(17)(seen, logits.clone())
        assert torch.equal(filter_top_k(logits[0], 17).isfinite(), ref[0].isfinite())
        ref = tp.TopPLogitsWarper(0.8)(seen, logits.clone())
        assert torch.equal(filter_top_p(logits[0], 0.8).isfinite(), ref[0].isfinite())


def test_sampling_stays_inside_top_k_and_is_reproducible():
    logits = torch.tensor([1.0, 4.0, 3.9, 0.0, 3.8])
    s = Sampling(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0)
    draws = [next_token(logits, torch.tensor([], dtype=torch.long), s, torch.Generator().manual_seed(i))
             for i in range(200)]
    assert set(draws) == {1, 2}
    again = [next_token(logits, torch.tensor([], dtype=torch.long), s, torch.Generator().manual_seed(i))
             for i in range(200)]
    assert draws == again


def test_greedy_and_penalty_change_the_choice():
    logits = torch.tensor([1.0, 4.0, 3.9])
    s = Sampling(temperature=0, repetition_penalty=1.0)
    assert next_token(logits, torch.tensor([1]), s, None) == 1
    s.repetition_penalty = 1.5
    assert next_token(logits, torch.tensor([1]), s, None) == 2  # 4.0 / 1.5 < 3.9


@pytest.mark.parametrize("logits", [[1.0, 4.0, 4.0, 2.0], [1.0, float("nan"), 5.0, float("nan")],
                                    [float("-inf")] * 3, [-2.0, -1.0, -1.0]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_picks_what_torch_argmax_picks(logits, dtype):
    """Ties go to the first maximum, a NaN wins, in every dtype (numpy's argmax serves fp32 on the CPU)."""
    x = torch.tensor(logits, dtype=dtype)
    assert next_token(x, torch.zeros(len(logits), dtype=torch.bool), Sampling(temperature=0), None) == int(x.argmax())


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_k": -3}, "top-k"),
                                      ({"top_p": 0}, "top-p"), ({"top_p": 1.5}, "top-p"),
                                      ({"repetition_penalty": 0}, "repetition-penalty")])
def test_impossible_settings_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw).check()


def test_greedy_with_filters_warns():
    assert Sampling(temperature=0, top_k=40).check()
    assert not Sampling(temperature=0, top_k=0, top_p=1.0).check()
