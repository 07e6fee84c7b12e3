"""RNG capture/restore and the tensor/skeleton split used for every saved state."""

import json
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from so8t.checkpoint.state import capture_rng, flatten_state, restore_rng, unflatten_state


def _trained_adam():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _json_round_trip(skeleton):
    return json.loads(json.dumps(skeleton))


def test_optimizer_state_round_trips_bit_exact_through_json_and_tensors():
    model, opt = _trained_adam()
    tensors, skeleton = flatten_state(opt.state_dict(), prefix="opt")
    assert all(name.startswith("opt.state.") for name in tensors)
    restored = unflatten_state(_json_round_trip(skeleton), tensors)

    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert set(restored["state"]) == {0, 1}  # int keys survive JSON
    for index, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value)

    # and it loads into a fresh optimizer
    fresh = torch.optim.Adam(model.parameters(), lr=1.0)
    fresh.load_state_dict(restored)
    assert fresh.state_dict()["param_groups"][0]["lr"] == 1e-2


def test_flatten_is_a_deep_snapshot():
    model, _ = _trained_adam()
    tensors, _ = flatten_state(model.state_dict())
    before = tensors["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(tensors["weight"], before)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())


def test_module_state_dict_keeps_its_metadata():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    tensors, skeleton = flatten_state(model.state_dict())
    restored = unflatten_state(_json_round_trip(skeleton), tensors)
    assert isinstance(restored, OrderedDict)
    assert restored._metadata == model.state_dict()._metadata
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).load_state_dict(restored)


def test_awkward_containers_round_trip():
    value = {
        "tuple": (1, 2.5, None, "x"),
        "int_keys": {3: "a", 1: "b"},
        "marker_lookalike": {"__tensor__": "not a tensor"},
        "nested": [[torch.arange(3), {"t": torch.ones(2, dtype=torch.bfloat16)}]],
        "array": np.arange(4, dtype=np.int64),
        "np_scalar": np.float32(1.5),
        "floats": [0.1, -0.0, 1e308],
        "bool": True,
    }
    tensors, skeleton = flatten_state(value)
    back = unflatten_state(_json_round_trip(skeleton), tensors)
    assert back["tuple"] == value["tuple"]
    assert list(back["int_keys"]) == [3, 1]
    assert back["marker_lookalike"] == {"__tensor__": "not a tensor"}
    assert torch.equal(back["nested"][0][0], torch.arange(3))
    assert back["nested"][0][1]["t"].dtype == torch.bfloat16
    assert np.array_equal(back["array"], value["array"])
    assert back["np_scalar"] == np.float32(1.5) and back["np_scalar"].dtype == np.float32
    assert back["floats"] == value["floats"] and str(back["floats"][1]) == "-0.0"
    assert back["bool"] is True


def test_runs_of_plain_numbers_encode_as_they_are_and_numpy_scalars_keep_their_dtype():
    """Lists and tuples of plain numbers (the RNG states) take a short path; one NumPy scalar
    among them must still come back as that NumPy type, a tuple still as a tuple."""
    value = {"plain": (1, 2, 3), "words": [7] * 624, "mixed": [1, np.float64(2.0), 3], "in_tuple": (np.int64(5), 6)}
    tensors, skeleton = flatten_state(value)
    assert skeleton["plain"] == {"__tuple__": [1, 2, 3]} and skeleton["words"] == [7] * 624
    back = unflatten_state(_json_round_trip(skeleton), tensors)
    assert back["plain"] == (1, 2, 3) and isinstance(back["plain"], tuple) and back["words"] == [7] * 624
    assert type(back["mixed"][1]) is np.float64 and type(back["mixed"][0]) is int
    assert type(back["in_tuple"][0]) is np.int64 and isinstance(back["in_tuple"], tuple)


def test_unsupported_objects_are_named():
    with pytest.raises(TypeError, match="set at 'a.b'"):
        flatten_state({"a": {"b": {1, 2}}})


def test_rng_restore_gives_the_same_random_numbers():
    def draw():
        return (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    tensors, skeleton = flatten_state(capture_rng())
    first = draw()
    draw()
    restore_rng(unflatten_state(_json_round_trip(skeleton), tensors))
    second = draw()
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_restore_gives_the_same_random_numbers():
    torch.cuda.manual_seed_all(4)
    torch.rand(1, device="cuda")  # initialise CUDA so capture_rng includes it
    tensors, skeleton = flatten_state(capture_rng())
    assert len(skeleton["cuda"]) == torch.cuda.device_count()
    first = [torch.rand(3, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    restore_rng(unflatten_state(_json_round_trip(skeleton), tensors))
    second = [torch.rand(3, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
