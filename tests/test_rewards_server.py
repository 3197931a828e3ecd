"""The reward server on loopback (uvicorn on a thread, a free port): scores and gradients equal to the
in-process reward's, a load test that loses and duplicates nothing, every bad request a 4xx with a message
while the server keeps serving, faults and crashes as the reward protocol says, and the CLI end to end."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from _threads import one_thread  # noqa: F401
from safetensors.torch import save

pytest.importorskip("starlette", reason="the reward server needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="the reward server needs the 'serve' extra")

from align.core.errors import AlignError, ConfigError, RewardCrash, RewardError, RewardUnavailable
from rewards import Reward, build_reward
from rewards.remote import RemoteReward, decode_request, encode_request
from rewards.server import ServeConfig, ServerThread, create_app, load_test
from rewards.testing import tiny_rewards
from rewards.zoo.ocr import OCRReward

TOKEN_ENV = "TEST_ALIGN_REWARD_TOKEN"
TOKEN = "s3cret-token"


class Crashing(Reward):
    """A reward with a bug."""

    def _score(self, images, prompts):
        raise ValueError("boom: a bug in the reward")


class Unavailable(Reward):
    """A reward whose backend is down."""

    differentiable = False

    def _score(self, images, prompts):
        raise RewardUnavailable("backend down")


class Slow(Reward):
    differentiable = False

    def _score(self, images, prompts):
        time.sleep(0.8)
        return images.mean((1, 2, 3))


@pytest.fixture(scope="module")
def served():
    """A server holding real zoo rewards and faulty ones, with a token and small limits."""
    os.environ[TOKEN_ENV] = TOKEN
    rewards = {
        "brightness": build_reward("brightness"),
        "jpeg_compressibility": build_reward("jpeg_compressibility"),
        "clipscore": tiny_rewards(0)["clipscore"],
        "ocr": OCRReward(lambda images: ["OPEN"] * images.shape[0]),
        "crashing": Crashing(),
        "unavailable": Unavailable(),
        "slow": Slow(),
    }
    config = ServeConfig(rewards=list(rewards), token_env=TOKEN_ENV, max_batch_size=8, max_delay_ms=20,
                         max_images_per_request=8, max_request_mb=1, request_timeout=0.4)
    with ServerThread(create_app(rewards, config), timeout_keep_alive=1) as server:
        server.rewards = rewards
        yield server
    os.environ.pop(TOKEN_ENV, None)


def remote(server, name, **kwargs):
    return RemoteReward(server.url, reward=name, token_env=TOKEN_ENV, **{"retries": 0, **kwargs})


def post(server, path, body, token=TOKEN, headers=None):
    """(status, JSON or bytes) of a raw request."""
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("POST", path, body=body, headers={**sent, **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


def test_wire_format_is_lossless():
    images = torch.rand(3, 3, 5, 7, dtype=torch.float64).to(torch.bfloat16)
    decoded, prompts = decode_request(encode_request(images, ["a", "é \"quoted\"", ""]))
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, images) and prompts == ["a", "é \"quoted\"", ""]


def test_scores_equal_the_in_process_reward(served):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 24, 24)
    prompts = ["a red cat", "a blue dog", "a bird", "a photo", "a cat"]
    for name, exact in (("brightness", True), ("jpeg_compressibility", True), ("clipscore", False)):
        reward, local = remote(served, name), served.rewards[name]
        out, expected = reward.score(images, prompts), local.score(images, prompts)
        if exact:
            assert torch.equal(out.scores, expected.scores), name
        else:  # a batch shaped differently may reorder the matrix kernels' sums
            torch.testing.assert_close(out.scores, expected.scores, rtol=1e-6, atol=1e-6)
        assert out.info.keys() == expected.info.keys()
    half = images.half()  # float16 travels as is and converts exactly to the server's float32
    assert torch.equal(remote(served, "brightness")(half), served.rewards["brightness"](half.float()))


def test_gradients_come_back_for_differentiable_rewards(served):
    reward = remote(served, "brightness", differentiable=None)  # asks /health
    assert reward.differentiable and not remote(served, "jpeg_compressibility", differentiable=None).differentiable
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    (reward(x) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    y = x.detach().clone().requires_grad_()
    (served.rewards["brightness"](y) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert torch.equal(x.grad, y.grad)
    clip = remote(served, "clipscore", differentiable=None)
    z = torch.rand(2, 3, 32, 32, requires_grad=True)
    clip(z, ["a cat", "a dog"]).sum().backward()
    w = z.detach().clone().requires_grad_()
    served.rewards["clipscore"](w, ["a cat", "a dog"]).sum().backward()
    torch.testing.assert_close(z.grad, w.grad, rtol=1e-5, atol=1e-7)


def test_load_test_loses_and_duplicates_nothing(served, monkeypatch):
    monkeypatch.setenv("ALIGN_REWARD_TOKEN", TOKEN)  # what load_test's clients send
    result = load_test(served.url, "brightness", clients=6, requests=8, images_per_request=3,
                       reference=served.rewards["brightness"])
    summary = result.summary()
    assert (summary["mismatched"], summary["lost"], summary["duplicated"]) == (0, 0, 0)
    assert summary["max_difference"] == 0.0  # bitwise the in-process scores
    assert summary["requests"] == 48 and summary["images"] == 144 and summary["images_per_second"] > 0
    assert 0 < summary["latency_p50_ms"] <= summary["latency_p99_ms"] < 10_000
    assert 0 < summary["batches"] < 48  # requests from concurrent clients were scored together
    assert served_health(served)["rewards"]["brightness"]["queued_images"] == 0


def served_health(server):
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    connection.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    data = json.loads(connection.getresponse().read())
    connection.close()
    return data


def good_body(n=2, size=8):
    return encode_request(torch.rand(n, 3, size, size), ["a cat"] * n)


@pytest.mark.parametrize(
    "path, body, token, status, message",
    [
        ("/v1/score/brightness", good_body(), "wrong", 401, "bearer token"),
        ("/v1/score/brightness", good_body(), None, 401, "bearer token"),
        ("/v1/score/nosuch", good_body(), TOKEN, 404, "no reward named 'nosuch'"),
        ("/v1/score/brightness", b"\x00\x01 definitely not safetensors", TOKEN, 400, "not safetensors"),
        ("/v1/score/brightness", save({"pixels": torch.rand(1, 3, 4, 4)}, metadata={"prompts": "[\"a\"]"}), TOKEN, 400,
         "one tensor named 'images'"),
        ("/v1/score/brightness", save({"images": torch.rand(2, 3, 4, 4)}, metadata={"prompts": "[\"a\"]"}), TOKEN, 400,
         "2 images but 1 prompts"),
        ("/v1/score/brightness", save({"images": torch.rand(1, 3, 4, 4)}, metadata={"prompts": "{oops"}), TOKEN, 400,
         "not JSON"),
        ("/v1/score/brightness", encode_request(torch.full((1, 3, 4, 4), 2.0), ["a"]), TOKEN, 400, r"values in \[0, 1\]"),
        ("/v1/score/brightness", encode_request(torch.rand(1, 4, 4, 4), ["a"]), TOKEN, 400, r"\[B, 3, H, W\]"),
        ("/v1/score/brightness", good_body(9), TOKEN, 413, "max_images_per_request=8"),
        ("/v1/score/brightness", good_body(2, 300), TOKEN, 413, "max_request_mb=1"),
        ("/v1/score/jpeg_compressibility?grad=1", good_body(), TOKEN, 400, "not differentiable"),
        ("/v1/score/ocr", good_body(), TOKEN, 422, "quotes no text"),
        ("/v1/score/crashing", good_body(), TOKEN, 500, r"reward 'crashing' raised.*ValueError: boom"),
        ("/v1/score/unavailable", good_body(), TOKEN, 503, "backend down"),
        ("/v1/score/slow", good_body(), TOKEN, 503, "no score within request_timeout=0.4s"),
    ],
)
def test_bad_requests_get_a_status_and_a_message_and_the_server_keeps_serving(served, path, body, token, status,
                                                                           message):
    import re

    got, answer = post(served, path, body, token)
    assert got == status and re.search(message, answer["error"]), answer
    assert remote(served, "brightness")(torch.rand(1, 3, 8, 8)).shape == (1,)  # still serving


def test_idle_connections_closed_by_the_server_are_reopened_and_the_client_pickles(served):
    import pickle

    reward = remote(served, "brightness")  # no retries: a stale connection must not count as a fault
    x = torch.rand(2, 3, 8, 8)
    first = reward(x)
    time.sleep(1.3)  # past the server's keep-alive (1 s here): it has closed the connection
    assert torch.equal(reward(x), first)
    copy = pickle.loads(pickle.dumps(reward))  # e.g. into a data-loader worker
    assert torch.equal(copy(x), first)


def test_client_maps_statuses_to_the_reward_protocol(served, unused_port):
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardCrash, match=r"remote reward 'crashing' .* raised on the server .*ValueError: boom"):
        remote(served, "crashing")(x)
    with pytest.raises(RewardError, match="HTTP 401") as info:
        RemoteReward(served.url, reward="brightness", token_env="NO_SUCH_TOKEN_VARIABLE", retries=3,
                     differentiable=False)(x)
    assert not isinstance(info.value, RewardUnavailable)  # a wrong token is a setting, not a passing fault
    with pytest.raises(RewardError, match="HTTP 422.*quotes no text"):
        remote(served, "ocr")(x, "no quotes here")
    assert remote(served, "ocr")(x, 'a sign "open"').tolist() == [1.0, 1.0]
    flaky = remote(served, "unavailable", retries=2, retry_backoff=0.0)
    with pytest.raises(RewardUnavailable, match="after 3 attempts.*HTTP 503.*backend down"):
        flaky(x)
    dropping = remote(served, "unavailable", on_invalid="drop", retry_backoff=0.0)
    out = dropping.score(x)
    assert not out.valid.any() and dropping.dropped == 2
    with pytest.raises(RewardUnavailable, match="no answer within timeout=0.1s"):
        remote(served, "slow", timeout=0.1)(x)
    down = RemoteReward(f"http://127.0.0.1:{unused_port}", reward="brightness", differentiable=True, retries=1,
                        retry_backoff=0.0)
    with pytest.raises(RewardUnavailable, match="after 2 attempts.*cannot reach the server"):
        down(x)
    with pytest.raises(AlignError, match="start it first"):
        RemoteReward(f"http://127.0.0.1:{unused_port}", reward="brightness")
    with pytest.raises(AlignError, match="does not serve 'hpsv3'"):
        RemoteReward(served.url, reward="hpsv3", token_env=TOKEN_ENV)
    with pytest.raises(ConfigError, match="url="):
        RemoteReward("localhost:8700", reward="brightness", differentiable=False)


@pytest.fixture
def unused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_config_validates():
    with pytest.raises(ConfigError, match="rewards is empty"):
        ServeConfig()
    with pytest.raises(ConfigError, match="names a reward twice"):
        ServeConfig(rewards=["brightness", "brightness"])
    with pytest.raises(ConfigError, match="dtype="):
        ServeConfig(rewards=["brightness"], dtype="float8")
    from align.commands.serve_reward import split_names

    assert split_names(["hpsv3", "port=1", "aesthetic"]) == ["port=1", "rewards=[hpsv3,aesthetic]"]
    with pytest.raises(ConfigError, match="not both"):
        split_names(["hpsv3", "rewards=[aesthetic]"])


def test_cli_serves_a_composed_reward_until_interrupted(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("rewards:\n  bright: brightness\n  mix: {brightness: 1.0, saturation: 0.5}\nport: 0\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", TOKEN_ENV: ""}
    process = subprocess.Popen([sys.executable, "-m", "align", "serve-reward", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving bright (differentiable), mix (differentiable) at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        images = torch.rand(2, 3, 8, 8)
        mix = RemoteReward(url, reward="mix")
        expected = build_reward({"brightness": 1.0, "saturation": 0.5})(images)
        assert mix.differentiable and torch.equal(mix(images), expected)
    finally:
        process.send_signal(2)  # SIGINT, as Ctrl-C
        assert process.wait(timeout=30) == 0, process.stderr.read()
