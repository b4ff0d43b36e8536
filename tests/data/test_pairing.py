"""Exemplar pairing (spec 3.1): thresholds, CoCosNet lists, similarity-built lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midms_cli.data.pairing import (
    OFFICIAL_PAIRING,
    PairingProbabilities,
    appearance_feature,
    build_reference_list,
    choose_pairing,
    pick_reference,
    read_reference_list,
)
from midms_cli.errors import MidmsError


def test_choose_pairing_follows_the_official_thresholds():
    # u < 0.2 hard, 0.2 <= u < 0.7 easy, u >= 0.7 self (spec 3.1).
    assert [choose_pairing(u) for u in (0.0, 0.199, 0.2, 0.699, 0.7, 0.999)] == [
        "hard", "hard", "easy", "easy", "self", "self",
    ]  # fmt: skip
    draws = np.random.default_rng(0).random(20000)
    kinds = [choose_pairing(u, OFFICIAL_PAIRING) for u in draws]
    shares = {k: kinds.count(k) / len(kinds) for k in ("hard", "easy", "self")}
    assert shares == pytest.approx({"hard": 0.2, "easy": 0.5, "self": 0.3}, abs=0.015)


def test_probabilities_must_sum_to_one():
    with pytest.raises(MidmsError, match="sum to 1"):
        PairingProbabilities(hard=0.5, easy=0.5, self=0.3)


def test_read_reference_list_in_cocosnet_format(tmp_path):
    path = tmp_path / "celebahq_ref.txt"
    path.write_text("0.jpg,12.jpg,7.jpg,3.jpg\n1.jpg, 5.jpg, 9.jpg\n\n")
    assert read_reference_list(path) == {"0.jpg": ["12.jpg", "7.jpg", "3.jpg"], "1.jpg": ["5.jpg", "9.jpg"]}
    path.write_text("0.jpg,12.jpg\n1.jpg\n")
    with pytest.raises(MidmsError, match=r"celebahq_ref.txt:2: expected"):
        read_reference_list(path)


def test_pick_reference_easy_hard_self_per_dataset_convention():
    rng = np.random.default_rng(0)
    candidates = ["a", "b", "c"]
    assert pick_reference("k", "easy", candidates, [], rng) == "a"  # CelebA / LSUN: first
    assert pick_reference("k", "hard", candidates, [], rng) == "c"  # last
    assert pick_reference("k", "self", candidates, [], rng) == "k"
    assert pick_reference("k", "easy", candidates, [], rng, easy="last") == "c"  # DeepFashion
    pool = ["p", "q", "r"]
    assert pick_reference("k", "hard", candidates, pool, np.random.default_rng(1), hard="random") in pool


def test_build_reference_list_ranks_by_cosine_similarity():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]])
    refs = build_reference_list(["a", "b", "c", "d"], features, top_k=3, chunk=2)
    # Hand computation of cosines: a-b 0.994, a-d 0.6, a-c 0; c-d 0.8, c-b 0.110.
    assert refs["a"] == ["b", "d", "c"]
    assert refs["c"] == ["d", "b", "a"]
    assert all(key not in cands for key, cands in refs.items())


def test_appearance_feature_prefers_the_same_colours():
    red = torch.zeros(3, 16, 16)
    red[0] = 0.8
    reddish, blue = red.clone(), torch.zeros(3, 16, 16)
    reddish[0, :, :8] = 0.6
    blue[2] = 0.8
    features = torch.stack([appearance_feature(x) for x in (red, reddish, blue)])
    assert features.shape == (3, 3 * 64 + 24)
    assert build_reference_list(["red", "reddish", "blue"], features, top_k=1)["red"] == ["reddish"]
