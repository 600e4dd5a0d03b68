import faiss
import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset

from retro_lit.index import auto_factory, check_factory, search_excluding
from retro_lit.workspace import RetroError


def _recall(index, ds, k):
    _, found = index.search(ds.get_queries(), k)
    truth = ds.get_groundtruth(k)
    return np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])


def test_flat_recall_is_exact():
    ds = SyntheticDataset(32, 0, 4000, 200)
    index = faiss.index_factory(ds.d, "Flat")
    index.add(ds.get_database())
    assert _recall(index, ds, 10) == 1.0


def test_ivf_recall_at_10():
    ds = SyntheticDataset(32, 4000, 8000, 200, seed=1)
    index = faiss.index_factory(ds.d, "IVF64,Flat")
    index.train(ds.get_train())
    index.add(ds.get_database())
    faiss.extract_index_ivf(index).nprobe = 24  # 3 / 8 of the lists
    assert _recall(index, ds, 10) >= 0.9


def test_auto_factory_by_size():
    assert auto_factory(1000) == "Flat"
    assert auto_factory(60_000) == "IVF1024,Flat"
    assert auto_factory(2_000_000).endswith(",PQ32") and "IVF" in auto_factory(2_000_000)


def test_invalid_factory_is_refused():
    check_factory("IVF16,Flat", 8)
    with pytest.raises(RetroError, match="invalid faiss index factory"):
        check_factory("NotAnIndex,,", 8)


def test_search_excluding_pads_instead_of_crashing():
    xb = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    index = faiss.IndexFlatL2(4)
    index.add(xb)
    ids, dist = search_excluding(index, xb[:3], 4, lambda rows, i: i < 8)  # only ids 8 and 9 survive
    assert (np.sort(ids[:, :2], axis=1) == [8, 9]).all()
    assert (ids[:, 2:] == -1).all() and np.isinf(dist[:, 2:]).all()
    ids, _ = search_excluding(index, xb[:2], 2, lambda rows, i: i == rows[:, None])  # drop self only
    assert (ids != np.arange(2)[:, None]).all() and (ids >= 0).all()
