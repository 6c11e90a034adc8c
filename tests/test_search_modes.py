"""Search modes over a real memory store and index, against numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.backends import RetrievalError, make_index
from retrieval.memory_store import MemoryStore, MemoryWriter
from retrieval.search import RECO_MODES, SearchMode, gather_rows, neighbours


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """300 pairs, shuffled non-contiguous ids, written as 4 shards (shard_size 80)."""
    rng = np.random.default_rng(0)
    n, dim = 300, 16
    ids = rng.permutation(np.arange(1000, 1000 + 3 * n, 3)).astype(np.int64)
    image, text = unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((n, dim)))
    directory = tmp_path_factory.mktemp("memory")
    writer = MemoryWriter(directory, encoder_fingerprint="test", dim=dim, shard_size=80)
    for start in range(0, n, 50):
        sl = slice(start, start + 50)
        writer.add(ids[sl], {"image": image[sl], "text": text[sl]})
    writer.close()
    store = MemoryStore.open(directory)
    indexes = {m: make_index("exact").build(store.embeddings(m), store.ids()) for m in ("image", "text")}
    return store, indexes, {"ids": ids, "image": image, "text": text}


def brute_force(searched: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ searched.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("variant", sorted(RECO_MODES))
@pytest.mark.parametrize("query_modality", ["image", "text"])
def test_modes_return_the_payload_of_the_nearest_in_the_searched_modality(memory, variant, query_modality):
    store, indexes, raw = memory
    mode = RECO_MODES[variant][query_modality]
    queries = unit(np.random.default_rng(1).standard_normal((7, store.dim)))
    got = neighbours(indexes[mode.searched], store, queries, 5, mode)
    want_ids, want_scores, rows = brute_force(raw[mode.searched], raw["ids"], queries, 5)
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(got.embeddings, raw[mode.payload][rows])  # the matched pairs' payload
    assert got.embeddings.shape == (7, 5, store.dim)


def test_reco_uni_modal_search_is_cross_modal_payload():
    assert RECO_MODES["uni_modal_search"]["image"] == SearchMode("image", "image", "text")
    assert RECO_MODES["uni_modal_search"]["text"] == SearchMode("text", "text", "image")


def test_training_retrieval_excludes_own_pair_and_near_duplicates(memory):
    store, indexes, raw = memory
    mode = RECO_MODES["uni_modal_search"]["image"]
    queries = raw["image"][:6]  # memory items queried with themselves: their own id scores 1.0
    got = neighbours(indexes["image"], store, queries, 4, mode, exclude_ids=raw["ids"][:6])
    assert not np.any(got.ids == raw["ids"][:6, None])
    sims = queries @ raw["image"].T
    sims[np.arange(6), np.arange(6)] = -np.inf  # the oracle: everything but the query itself
    np.testing.assert_array_equal(got.ids, raw["ids"][np.argsort(-sims, axis=1, kind="stable")[:, :4]])
    # A near-duplicate threshold below the best remaining scores drops those too.
    threshold = float(np.sort(sims, axis=1)[:, -2].min()) - 1e-6
    got = neighbours(indexes["image"], store, queries, 4, mode, exclude_ids=raw["ids"][:6],
                     duplicate_threshold=threshold)
    assert np.all(got.scores <= threshold) and got.ids.shape == (6, 4)


def test_gather_rows_reads_across_shards(memory):
    store, _, raw = memory
    ids = raw["ids"][[299, 0, 150, 80, 79]].reshape(5, 1)
    np.testing.assert_array_equal(gather_rows(store, "text", ids)[:, 0], raw["text"][[299, 0, 150, 80, 79]])
    with pytest.raises(RetrievalError, match="not in the memory"):
        gather_rows(store, "text", np.array([[5]]))


def test_mismatched_index_or_modality_is_refused(memory):
    store, indexes, raw = memory
    small = make_index("exact").build(raw["image"][:10], raw["ids"][:10])
    with pytest.raises(RetrievalError, match="index holds 10 entries but the memory 300"):
        neighbours(small, store, raw["image"][:2], 3, RECO_MODES["uni_modal_search"]["image"])
    with pytest.raises(RetrievalError, match="no 'audio' embeddings"):
        neighbours(indexes["image"], store, raw["image"][:2], 3, SearchMode("image", "image", "audio"))
