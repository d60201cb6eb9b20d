"""The Python front door: search a model object on the user's tensors, pick, quantize."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.config import SearchConfig, StudyConfig
from mpsearch.errors import UserError
from mpsearch.study import KNEE_WINDOW_PP, SearchResult, knee_index


class TinyNet(nn.Module):
    """A network of the user's own: two convs and a classifier, on 8x8 digits."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 16, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def tensors():
    """scikit-learn's digits as float tensors, split by hand: what a user brings."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.37
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500]), "test": (x[1500:], y[1500:])}


@pytest.fixture(scope="module")
def trained(tensors):
    torch.manual_seed(0)
    model = TinyNet()
    x, y = tensors["train"]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        for start in range(0, len(y), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 100]), y[start:start + 100]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def searched(tensors, trained):
    data = mpsearch.make_data(val=tensors["val"], test=tensors["test"], calibration=tensors["train"][0][:256])
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    result = mpsearch.search(trained, data, budget=12, workers=0, progress=False,
                             config=StudyConfig(latency=None, search=SearchConfig(population_size=6, eval_images=300,
                                                                             ilp_seeds=2)))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    return data, result


def _accuracy(model: nn.Module, split) -> float:
    x, y = split
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_search_on_a_model_object_gives_a_front_and_a_policy_quantize_applies(searched, trained, tensors, tmp_path, monkeypatch):
    data, result = searched
    assert isinstance(result, SearchResult) and len(result.trials) == 12 and len(result.front) >= 1
    assert result.out_dir is None and result.storage is None
    assert len(result.study.trials) == 12  # the in-memory Optuna study
    assert _accuracy(trained, tensors["test"]) > 0.9
    policy = result.pick("max-accuracy")
    assert policy.model == "TinyNet" and policy.dataset == "custom" and set(policy.layers) <= {"features.0", "features.2", "head"}
    row = result.front[result.front["trial"] == policy.provenance["trial"]].iloc[0]
    quantized = mpsearch.quantize(trained, policy, data)
    assert quantized is not trained and all(isinstance(m, nn.Module) for m in quantized.modules())
    n = len(tensors["test"][1])
    assert abs(_accuracy(quantized, tensors["test"]) - row["test_accuracy"]) <= 1 / n  # the model measured is the one returned
    w2 = mpsearch.quantize(trained, "w2a8:all", tensors["train"][0][:256])  # a shorthand, bare calibration images
    assert _accuracy(w2, tensors["test"]) < row["test_accuracy"]
    # validation accuracy: the answer rule's where it measured a point, else the search's
    val = result.front["val_accuracy"].fillna(result.front["search_accuracy"])
    floor = float(val.median())
    ok = result.front[val >= floor]  # the cheapest point at least that accurate
    assert result.pick(f"accuracy>={floor}").provenance["trial"] == ok.loc[ok[result.cost_column].idxmin(), "trial"]
    assert result.pick(int(result.trials["trial"].iloc[-1])).layers  # any trial, on the front or not
    figure = result.plot(tmp_path / "front.png")
    assert figure.axes and (tmp_path / "front.png").stat().st_size > 10_000


def test_nothing_is_written_without_out_or_storage(tensors, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = mpsearch.make_data(val=tensors["val"], test=tensors["test"], train=tensors["train"], calibration_size=128)
    result = mpsearch.search(trained, data, budget=4, workers=0, progress=False,
                             config=StudyConfig(latency=None, search=SearchConfig(population_size=4, sensitivity="none",
                                                                             remeasure_points=1)))
    assert len(result.trials) == 4 and list(tmp_path.iterdir()) == []
    folder = tmp_path / "out"
    again = mpsearch.search(trained, data, budget=4, workers=0, progress=False, out=folder,
                            config=StudyConfig(latency=None, search=SearchConfig(population_size=4, sensitivity="none",
                                                                            remeasure_points=1)))
    assert (folder / "pareto.csv").exists() and (folder / "config.yaml").exists()
    cols = [c for c in result.trials.columns if c.startswith(("param_", "value_"))]
    pd.testing.assert_frame_equal(result.trials[cols], again.trials[cols])  # same seed, same study
    assert mpsearch.load_result(folder).pick("knee") == again.pick("knee")


def test_a_policy_for_another_network_is_refused_even_under_the_same_name(searched, tensors):
    _, result = searched
    other = TinyNet(width=12).eval()
    with pytest.raises(UserError, match="policy.architecture"):
        mpsearch.quantize(other, result.pick("knee"), tensors["train"][0][:64])


def test_make_data_takes_datasets_and_loaders_and_says_what_is_missing(tensors):
    val = torch.utils.data.TensorDataset(*tensors["val"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors["test"]), batch_size=7)
    data = mpsearch.make_data(val=val, test=loader, calibration=tensors["train"])
    assert (len(data.val), len(data.test), data.info.num_classes, data.info.image_size) == (300, 297, 10, 8)
    x, y = next(iter(data.test.batches(5)))
    assert torch.equal(x, tensors["test"][0][:5]) and torch.equal(y, tensors["test"][1][:5])
    with pytest.raises(UserError, match="pass calibration="):
        mpsearch.make_data(val=tensors["val"], test=tensors["test"])
    with pytest.raises(UserError, match="val: expected images"):
        mpsearch.make_data(val=(tensors["val"][0][0], tensors["val"][1]), test=tensors["test"], calibration=tensors["train"])
    with pytest.raises(UserError, match="data: expected a DataSplits"):
        mpsearch.search(TinyNet(), {"val": 1})


def test_the_knee_is_taken_on_the_useful_part_of_the_front():
    """A front whose cheap end collapsed: the knee of the whole front lands in the collapse (6.7 pp
    below the best point), the knee of its useful part where accuracy starts to fall."""
    from mpsearch.algorithms.pareto import knee_point

    accuracy = np.array([0.937, 0.936, 0.934, 0.931, 0.92, 0.87, 0.40, 0.20, 0.18])
    cost = np.array([0.21, 0.16, 0.14, 0.13, 0.12, 0.07, 0.056, 0.053, 0.05])
    whole = knee_point(np.stack([1 - accuracy, cost], axis=1))
    assert whole == 5 and accuracy[whole] == 0.87  # the rule a user would not take
    knee = knee_index(accuracy, cost)
    # within 2 pp of the best: the points 0 to 4; their ends (0.937, 0.21) and (0.92, 0.12), the
    # point farthest from that line towards the ideal is (0.934, 0.14)
    assert accuracy[knee] >= accuracy.max() - KNEE_WINDOW_PP / 100 and knee == 2
    assert knee_index(accuracy, cost, window_pp=100) == whole
    assert knee_index(accuracy[:1], cost[:1]) == 0


def test_the_front_door_is_documented():
    assert callable(mpsearch.search) and callable(mpsearch.quantize)
    for doc, words in ((mpsearch.search.__doc__, ("Args:", "budget", "workers", "Returns:")),
                       (mpsearch.quantize.__doc__, ("Args:", "calibration", "Returns:"))):
        assert all(w in doc for w in words)
