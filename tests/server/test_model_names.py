"""Model names round-trip: the short name and the resource names that ListModels and GetModel return
(`models/NAME`, `models/NAME/versions/V`) mean the same thing in Predict, Explain, Probe and GetModel, against
the real server with the real client. Conflicting fields and non-ASCII digits are INVALID_ARGUMENT."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from serving_helpers import SIZE, config, make_repo

from conceptlens.handlers.errors import InvalidInput
from conceptlens.server import probe_validation
from conceptlens.server import validation as v
from conceptlens.server.background import BackgroundServer
from conceptlens.server.config import Limits
from conceptlens_client import Client, ServiceError
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

IMAGE = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def client(bundle_dir, tmp_path_factory):
    """A server holding small v1 and v2 (probes on a server thread: no worker process to start)."""
    repo = make_repo(tmp_path_factory.mktemp("repo"), bundle_dir, versions=(1, 2))
    with BackgroundServer(config(repo, probe_processes=0)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        yield client


def _forms(client: Client) -> list[tuple[str, int]]:
    """(model field, version it means) for every name the service itself hands out, plus `models/NAME`."""
    [listed] = client.models()
    assert (listed.model, listed.name, listed.version) == ("small", "models/small/versions/2", 2)
    older = client.get_model("small", 1)
    assert older.name == "models/small/versions/1"
    return [(listed.model, 2), (listed.name, 2), ("models/small", 2), (older.name, 1)]


def test_every_name_form_round_trips_through_every_method(client):
    for name, version in _forms(client):
        assert (client.get_model(name).name, client.get_model(name=name).name) == \
            (f"models/small/versions/{version}",) * 2, name
        predicted = client.predict([IMAGE], name)
        explained = client.explain([IMAGE], name)
        probed = client.probe([IMAGE], name, attack="fgsm", epsilon=0.01)
        for response in (predicted, explained, probed):
            assert (response.model, response.version) == ("small", version), (name, type(response).__name__)


def test_a_version_field_that_agrees_is_accepted(client):
    assert client.predict([IMAGE], "models/small/versions/1", version=1).version == 1
    assert client.get_model("small", 1, name="models/small/versions/1").version == 1
    assert client.get_model("", 1, name="models/small").version == 1


@pytest.mark.parametrize(("call", "fields"), [
    (lambda c: c.predict([IMAGE], "models/small/versions/1", version=2), ("model", "version")),
    (lambda c: c.explain([IMAGE], "models/small/versions/2", version=1), ("model", "version")),
    (lambda c: c.probe([IMAGE], "models/small/versions/1", attack="fgsm", epsilon=0.01, version=2),
     ("model", "version")),
    (lambda c: c.get_model("", 2, name="models/small/versions/1"), ("name", "version")),
    (lambda c: c.get_model("models/small/versions/2", name="models/small/versions/1"), ("name", "model")),
    (lambda c: c.get_model("other", name="models/small"), ("name", "model")),
])
def test_conflicting_fields_name_both(client, call, fields):
    with pytest.raises(ServiceError) as err:
        call(client)
    assert err.value.code == "INVALID_ARGUMENT"
    assert all(field in err.value.message for field in fields), err.value.message


@pytest.mark.parametrize("request_", [
    pb.PredictRequest(model="models/small/versions/²"),
    pb.GetModelRequest(name="models/small/versions/٣"),
    pb.GetModelRequest(model="models/small/versions/0"),
    pb.GetModelRequest(name="models/small/extra"),
    pb.ListModelsRequest(page_token="²"),
])
def test_unicode_digits_and_malformed_names_are_invalid_argument_not_internal(client, request_):
    method = type(request_).__name__.removesuffix("Request")
    with pytest.raises(ServiceError) as err:
        client._call(method, request_, None)
    assert err.value.code == "INVALID_ARGUMENT", err.value


def test_unknown_model_in_a_resource_name_is_not_found(client):
    with pytest.raises(ServiceError) as err:
        client.get_model(name="models/nosuch/versions/1")
    assert err.value.code == "NOT_FOUND" and "nosuch" in err.value.message
    with pytest.raises(ServiceError) as err:
        client.get_model(name="models/small/versions/9")
    assert err.value.code == "NOT_FOUND"


@pytest.mark.parametrize(("name", "version", "expected"), [
    ("shapes", 0, ("shapes", 0)),
    ("shapes", 3, ("shapes", 3)),
    ("models/shapes", 3, ("shapes", 3)),
    ("models/shapes/versions/12", 0, ("shapes", 12)),
    ("models/shapes/versions/12", 12, ("shapes", 12)),
])
def test_model_ref_forms(name, version, expected):
    assert v.model_ref(name, version) == expected


@pytest.mark.parametrize(("name", "version", "field"), [
    ("models/shapes/versions/²", 0, "model"),
    ("models/shapes/versions/1٣", 0, "model"),
    ("models/shapes/versions/", 0, "model"),
    ("models/shapes/versions/-1", 0, "model"),
    ("models/shapes/versions/1", 2, "model, version"),
    ("models/a/b", 0, "model"),
    ("shapes\n", 0, "model"),
    ("shapes", -1, "version"),
])
def test_model_ref_refusals_name_the_field(name, version, field):
    with pytest.raises(InvalidInput) as err:
        v.model_ref(name, version)
    assert err.value.field == field


def test_page_token_takes_ascii_digits_only():
    assert v.page(1, "3") == (3, 1)
    for token in ("²", "٣", "1.0", " 1"):
        with pytest.raises(InvalidInput, match="page_token"):
            v.page(1, token)


def test_ensemble_members_take_every_name_form():
    """AttackSpec.ensemble_models names models too: each form resolves to (short name, version)."""
    resolved = []

    def member(name: str, version: int):
        resolved.append((name, version))
        return SimpleNamespace(classes=["a", "b"], input_size=SIZE)

    spec = pb.AttackSpec(kind=pb.AttackSpec.GHOST_ENSEMBLE, epsilon=0.03,
                         ensemble_models=["x", "models/y", "models/z/versions/2"])
    probe_validation.attack(spec, ["a", "b"], SIZE, Limits(), 1, member)
    assert resolved == [("x", 0), ("y", 0), ("z", 2)]
    with pytest.raises(InvalidInput) as err:
        probe_validation.attack(pb.AttackSpec(kind=pb.AttackSpec.GHOST_ENSEMBLE, epsilon=0.03,
                                              ensemble_models=["models/z/versions/²"]), ["a", "b"], SIZE, Limits(), 1,
                                member)
    assert err.value.field == "attack.ensemble_models"
