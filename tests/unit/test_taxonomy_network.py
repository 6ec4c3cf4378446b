from __future__ import annotations

import pytest
import torch

from bmcell.network import CellClassifier, WithSoftmax
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy


def test_default_taxonomy_merges_bn_art() -> None:
    t = DEFAULT_TAXONOMY
    assert t.num_classes == 17
    assert len(t.eval_codes) == 16
    m = t.eval_index_map()
    assert m[t.index("BN")] == m[t.index("ART")]
    assert Taxonomy.from_json(t.to_json()) == t


def test_taxonomy_rejects_duplicates_and_unknown() -> None:
    with pytest.raises(KeyError, match="unknown class 'XX'"):
        DEFAULT_TAXONOMY.index("XX")
    with pytest.raises(ValueError, match="repeats"):
        Taxonomy("bad", DEFAULT_TAXONOMY.classes[:2] * 2)


def test_network_is_the_papers_shape() -> None:
    model = CellClassifier(num_classes=5)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 8
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 8
    model.eval()
    probs = WithSoftmax(model)(torch.rand(3, 3, 64, 64))
    assert probs.shape == (3, 5)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
