"""The VLM judge against a fake OpenAI-compatible server on loopback, started by the test."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from align.core.errors import ConfigError, RewardError, RewardUnavailable
from rewards import build_reward
from rewards.zoo.vlm import VLMJudge


class FakeJudge:
    """Answers 'Final Score: 1 + 4 * mean pixel' unless told to fail, hang or ramble."""

    def __init__(self):
        self.mode = "score"
        self.fail_first = 0  # fail this many requests with HTTP 500 before answering
        self.hang_s = 2.0
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()

    def answer(self, body: dict) -> tuple[int, str]:
        with self.lock:
            self.requests.append(body)
            n = len(self.requests)
        if n <= self.fail_first or self.mode == "fail":
            return 500, json.dumps({"error": {"message": "model overloaded"}})
        if self.mode == "unauthorized":
            return 401, json.dumps({"error": {"message": "invalid api key"}})
        if self.mode == "hang":
            time.sleep(self.hang_s)
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        mean = pixels.mean() / 255
        if self.mode == "malformed" or (self.mode == "dark_malformed" and mean < 0.1):
            text = "What a lovely picture. I would rate it highly."
        else:
            text = f"The image is fine.\nFinal Score: {1 + 4 * mean:.6f}"
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


@pytest.fixture
def server():
    judge = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            judge.headers.append(dict(self.headers))
            assert self.path == "/v1/chat/completions"
            status, text = judge.answer(body)
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    judge.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield judge
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def unused_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images_with_means(means, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(len(means), 3, size, size, generator=g) - 0.5) * 0.1
    images = (torch.tensor(means).view(-1, 1, 1, 1) + noise).clamp(0, 1)
    return images.mul(255).round().div(255)  # what the PNG carries exactly


def make(server, **kwargs):
    defaults = dict(model="judge-1", timeout=5.0, retries=0, retry_backoff=0.01)
    return VLMJudge(server.url, **{**defaults, **kwargs})


def test_scores_parsed_and_scaled(server):
    images = images_with_means([0.2, 0.5, 0.9])
    judge = build_reward("vlm_judge", endpoint=server.url, model="judge-1", concurrency=3)
    assert not judge.differentiable
    scores = judge(images, ["a cat", "a dog", "a bird"])
    torch.testing.assert_close(scores, (1 + 4 * images.mean((1, 2, 3))) / 5, atol=1e-5, rtol=0)
    body = server.requests[0]
    assert body["model"] == "judge-1" and body["messages"][0]["role"] == "user"
    texts = [p["text"] for r in server.requests for p in r["messages"][0]["content"] if p["type"] == "text"]
    assert len(texts) == 3 and all("Final Score" in t for t in texts)
    assert sorted(q for t in texts for q in ("a cat", "a dog", "a bird") if f"Prompt: {q}\n" in t) == [
        "a bird", "a cat", "a dog"]


def test_cache_by_image_prompt_rubric(server, tmp_path):
    images = images_with_means([0.3, 0.6])
    judge = make(server, cache_dir=tmp_path / "cache")
    first = judge(images, "a cat")
    assert len(server.requests) == 2
    torch.testing.assert_close(judge(images, "a cat"), first)
    assert len(server.requests) == 2  # cached
    judge(images, "a dog")
    assert len(server.requests) == 4  # a new prompt is a new question
    fresh = make(server, cache_dir=tmp_path / "cache")  # a new process reads the disk cache
    torch.testing.assert_close(fresh(images, "a cat"), first)
    assert len(server.requests) == 4
    make(server, rubric="Rate it. {prompt} Final Score: x", cache_dir=tmp_path / "cache")(images, "a cat")
    assert len(server.requests) == 6


def test_retries_with_backoff_recover(server):
    server.fail_first = 2
    judge = make(server, retries=2)
    scores = judge(images_with_means([0.5]), "a cat")
    assert torch.isfinite(scores).all() and len(server.requests) == 3


def test_persistent_failure_names_the_endpoint(server):
    server.mode = "fail"
    with pytest.raises(RewardUnavailable) as info:
        make(server, retries=2)(images_with_means([0.5]), "a cat")
    message = str(info.value)
    assert "vlm_judge" in message and server.url + "/chat/completions" in message
    assert "HTTP 500" in message and "model overloaded" in message and "after 3 attempts" in message
    assert len(server.requests) == 3


@pytest.mark.parametrize("on_invalid", ["raise", "drop"])
def test_client_errors_are_not_retried_or_dropped_and_key_is_sent(server, monkeypatch, on_invalid):
    server.mode = "unauthorized"
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    judge = make(server, retries=3, api_key_env="JUDGE_KEY", on_invalid=on_invalid)
    with pytest.raises(RewardError, match=r"HTTP 401.*invalid api key") as info:
        judge(images_with_means([0.5]), "a cat")
    assert not isinstance(info.value, RewardUnavailable)  # a wrong key is not a fault that passes
    assert len(server.requests) == 1 and judge.dropped == 0
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_timeout(server):
    server.mode = "hang"
    start = time.monotonic()
    with pytest.raises(RewardUnavailable, match=r"after 2 attempts: no answer within timeout=0.2s") as info:
        make(server, timeout=0.2, retries=1)(images_with_means([0.5]), "a cat")
    assert time.monotonic() - start < 1.5
    assert isinstance(info.value.__cause__, TimeoutError)


def test_refused_connection_is_transient(unused_port):
    judge = VLMJudge(f"http://127.0.0.1:{unused_port}/v1", timeout=1.0, retries=2, retry_backoff=0.0)
    assert judge.is_transient(urllib.error.URLError(ConnectionRefusedError()))
    with pytest.raises(RewardUnavailable, match=r"failed after 3 attempts: cannot connect: .*refused"):
        judge(images_with_means([0.5]), "a cat")
    assert judge.requests_sent == 3
    dropping = VLMJudge(f"http://127.0.0.1:{unused_port}/v1", timeout=1.0, retries=1, retry_backoff=0.0, on_invalid="drop")
    out = dropping.score(images_with_means([0.5, 0.6]), "a cat")
    assert not out.valid.any() and dropping.dropped == 2 and dropping.requests_sent == 4


def test_malformed_answer(server):
    server.mode = "malformed"
    with pytest.raises(RewardError, match=r"malformed answer, no score matching"):
        make(server, retries=1)(images_with_means([0.5]), "a cat")
    assert len(server.requests) == 2  # a rambling answer is asked again


def test_drop_mode_drops_and_counts_only_the_failed_sample(server):
    server.mode = "dark_malformed"
    judge = make(server, on_invalid="drop", concurrency=2)
    images = images_with_means([0.5, 0.02, 0.8])
    out = judge.score(images, "a cat")
    assert out.valid.tolist() == [True, False, True] and judge.dropped == 1
    assert torch.isnan(out.scores[1])
    torch.testing.assert_close(out.scores[[0, 2]], (1 + 4 * images[[0, 2]].mean((1, 2, 3))) / 5, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"endpoint": "localhost:8000"}, "endpoint"), ({"score_pattern": "("}, "score_pattern"),
     ({"score_pattern": "Score"}, "score_pattern"), ({"concurrency": 0}, "concurrency"),
     ({"scale_max": 0}, "scale_max")],
)
def test_bad_configuration(kwargs, field, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match=field):
        VLMJudge(**{"endpoint": "http://127.0.0.1:1/v1", **kwargs})
