"""Qwen2-VL rewards (HPSv3, VQAScore) on toy models built from config and saved as model folders, the torch
preprocessing against the processor, and the VLM judge's yes/no log-probability mode against a fake server."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from _threads import one_thread  # noqa: F401
from safetensors.torch import save_file

from align.core.errors import AlignError, ConfigError, RewardError
from rewards import build_reward
from rewards.preprocess import PARITY_TOLERANCE
from rewards.qwen_vl import QWEN_VL_CHAT, QwenVisionPreprocess, QwenVLPrompts
from rewards.testing import byte_tokenizer, tiny_qwen2_vl_config
from rewards.zoo.hpsv3 import HPSV3_INSTRUCTION, REWARD_TOKEN, HPSv3, HPSv3Head, split_hpsv3_checkpoint
from rewards.zoo.jpeg import to_uint8_images
from rewards.zoo.vlm import VLMJudge
from rewards.zoo.vqascore import VQASCORE_QUESTION, VQAScore

PIXELS = 4 * 28 * 28  # 56 x 56 for a square image: 16 patches, 4 language tokens


@pytest.mark.parametrize("size", [(40, 50), (56, 56), (100, 30), (23, 71)])
def test_vision_preprocess_matches_the_processor(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    images = (torch.rand(2, 3, *size) * 255).round() / 255  # what the processor sees exactly
    reference = Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS)(to_uint8_images(images), return_tensors="pt")
    ours = QwenVisionPreprocess(min_pixels=PIXELS, max_pixels=PIXELS)
    pixels, grid = ours(images)
    assert torch.equal(grid, reference.image_grid_thw)
    difference = (pixels - reference.pixel_values).abs().max().item()
    # no resize needed at 56 x 56: the same numbers up to float rounding, in the same patch order
    assert difference < (1e-5 if size == (56, 56) else PARITY_TOLERANCE)
    assert ours.tokens_per_image(*size) == int(grid[0].prod()) // 4


def save_base(folder, tokenizer, config):
    """A Qwen2-VL 'base model' folder: config, tokenizer and image processor (what HPSv3 reads from its base)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil().save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """(checkpoint file in HPSv3's released layout, base folder, the in-memory parts it holds)."""
    from transformers import Qwen2VLModel

    folder = tmp_path_factory.mktemp("hpsv3")
    tokenizer = byte_tokenizer()
    save_base(folder / "base", tokenizer, tiny_qwen2_vl_config(tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
    config = tiny_qwen2_vl_config(tokenizer)  # the embedding table resized to the longer tokenizer
    torch.manual_seed(0)
    model, head = Qwen2VLModel(config).eval(), HPSv3Head(config.text_config.hidden_size)
    for p in head.parameters():  # a head whose output moves with the hidden state
        p.data.normal_(0, 0.5)
    # transformers 4.45's layout, as released: visual.*, model.* (language model), lm_head.*, rm_head.*
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    state.update({f"model.{k}": v for k, v in model.language_model.state_dict().items()})
    state["lm_head.weight"] = torch.randn(len(tokenizer), config.text_config.hidden_size)
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "HPSv3.safetensors")
    preprocess = QwenVisionPreprocess(min_pixels=PIXELS, max_pixels=PIXELS)
    return folder / "HPSv3.safetensors", folder / "base", (model, head, tokenizer, preprocess)


def test_hpsv3_loads_the_released_layout_and_scores_as_built(tiny_hpsv3):
    checkpoint, base, (model, head, tokenizer, preprocess) = tiny_hpsv3
    loaded = build_reward("hpsv3", checkpoint=str(checkpoint), base=str(base), offline=True)
    assert loaded.preprocess.min_pixels == loaded.preprocess.max_pixels == 256 * 28 * 28  # HPSv3's fixed area
    loaded.preprocess = preprocess
    built = HPSv3(model=model, head=head, tokenizer=tokenizer, preprocess=preprocess)
    images = torch.rand(2, 3, 48, 64)
    prompts = ["a red cat", "a long prompt about a blue dog in the snow"]
    out = loaded.score(images, prompts)
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    torch.testing.assert_close(out.scores, built.score(images, prompts).scores, rtol=0, atol=0)
    assert out.info["uncertainty"].shape == (2,)
    # the reward token is read where HPSv3 puts it: the last hidden state at <|Reward|>
    text = loaded.prompts.chat(HPSV3_INSTRUCTION.format(text_prompt="a red cat"))
    assert text.startswith("<|im_start|>system\n") and "Textual prompt - a red cat\n" in text
    assert split_hpsv3_checkpoint({"rm_head.0.weight": torch.ones(1), "model.visual.x": torch.ones(1)})[0] == {
        "visual.x": torch.ones(1)}
    with pytest.raises(AlignError, match="unknown keys"):
        split_hpsv3_checkpoint({"rm_head.0.weight": torch.ones(1), "vision_tower.x": torch.ones(1)})


def test_hpsv3_gradient_reaches_each_image_from_its_own_score_only(tiny_hpsv3):
    """Each score's gradient lands on its own image (padding and M-RoPE positions keep samples apart).

    (Finite differences are not a usable check here: Qwen2-VL computes its norms' statistics and
    rotary tables in float32 even in a float64 model, which makes the score noisy at 1e-5.)
    """
    _, _, (model, head, tokenizer, preprocess) = tiny_hpsv3
    reward = HPSv3(model=model, head=head, tokenizer=tokenizer, preprocess=preprocess)
    torch.manual_seed(1)
    x = (0.2 + 0.6 * torch.rand(2, 3, 56, 56)).requires_grad_()
    scores = reward(x, ["a cat", "a much longer prompt: the padding differs"])
    (grad_first,) = torch.autograd.grad(scores[0], x, retain_graph=True)
    assert torch.isfinite(grad_first).all() and grad_first[0].abs().sum() > 0
    assert grad_first[1].abs().sum() == 0
    scores[1].backward()
    assert x.grad[1].abs().sum() > 0 and x.grad[0].abs().sum() == 0


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A Qwen2-VL instruct model at toy size ("Yes" one token, as in real vocabularies), saved as a folder."""
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = byte_tokenizer(words=["Yes", "No"])
    config = tiny_qwen2_vl_config(tokenizer)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    save_base(folder, tokenizer, config)
    return folder, model, tokenizer


def test_vqascore_is_the_models_own_probability_of_yes(tiny_vlm):
    folder, model, tokenizer = tiny_vlm
    reward = build_reward("vqascore", model=str(folder), min_pixels=PIXELS, max_pixels=PIXELS, offline=True)
    assert reward.differentiable
    images = torch.rand(2, 3, 40, 44)
    prompts = ["a red cat", 'a sign that says "hello there"']
    out = reward.score(images, prompts)
    assert ((out.scores > 0) & (out.scores < 1)).all()
    # independently: the full model's next-token distribution after each question
    prompter = QwenVLPrompts(tokenizer, model.config.image_token_id)
    pixels, grid = reward.preprocess(images)
    questions = [VQASCORE_QUESTION.replace("{prompt}", p) for p in prompts]
    inputs = prompter(questions, reward.preprocess.tokens_per_image(40, 44), images.device)
    with torch.no_grad():
        logits = model(**inputs, pixel_values=pixels, image_grid_thw=grid).logits
    last = inputs["attention_mask"].sum(1) - 1
    expected = logits[torch.arange(2), last].softmax(-1)[:, tokenizer.convert_tokens_to_ids("Yes")]
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.info["log_prob"], expected.log(), rtol=1e-5, atol=1e-6)
    assert QWEN_VL_CHAT.format(text=questions[0]) == prompter.chat(questions[0])  # no chat template: Qwen2-VL's


def test_vqascore_gradient_and_errors(tiny_vlm):
    _, model, tokenizer = tiny_vlm
    preprocess = QwenVisionPreprocess(min_pixels=PIXELS, max_pixels=PIXELS)
    reward = VQAScore(model, tokenizer=tokenizer, preprocess=preprocess)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(x, ["a cat", "a dog"]).sum().backward()
    assert (x.grad.abs().sum((1, 2, 3)) > 0).all()
    with pytest.raises(AlignError, match="one-token answer"):
        VQAScore(model, tokenizer=tokenizer, preprocess=preprocess, answer="Yes indeed")
    with pytest.raises(AlignError, match="must contain"):
        VQAScore(model, tokenizer=tokenizer, preprocess=preprocess, question="Is it good?")


# -- the VLM judge's yes/no mode through an OpenAI-compatible endpoint -----------------------------------
@pytest.fixture
def logprob_server():
    state = {"requests": [], "mode": "ok"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(body)
            text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
            # P(" Yes") + P("yes") = 0.5 + 0.2 when the question mentions a cat, 0.05 + 0 otherwise
            yes = (0.5, 0.2) if "cat" in text else (0.05, None)
            top = [{"token": " Yes", "logprob": math.log(yes[0])}, {"token": "No", "logprob": math.log(0.25)}]
            if yes[1]:
                top.append({"token": "yes", "logprob": math.log(yes[1])})
            logprobs = {"content": [{"token": "No", "logprob": math.log(0.25), "top_logprobs": top}]}
            choice = {"message": {"role": "assistant", "content": "No"}}
            if state["mode"] == "ok":
                choice["logprobs"] = logprobs
            data = json.dumps({"choices": [choice]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_judge_yes_no_mode_reads_the_probability_of_yes(logprob_server):
    judge = build_reward("vlm_judge", endpoint=logprob_server["url"], mode="yes_no", retries=0, top_logprobs=5)
    scores = judge(torch.rand(2, 3, 8, 8), ["a cat", "a dog"])
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.05]))
    body = logprob_server["requests"][0]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1
    texts = sorted(p["text"] for r in logprob_server["requests"] for p in r["messages"][0]["content"] if p["type"] == "text")
    assert texts == [VQASCORE_QUESTION.replace("{prompt}", p) for p in ("a cat", "a dog")]


def test_judge_yes_no_mode_needs_logprobs(logprob_server):
    logprob_server["mode"] = "no_logprobs"
    judge = VLMJudge(logprob_server["url"], mode="yes_no", retries=3, retry_backoff=0.0)
    with pytest.raises(RewardError, match="no token log-probabilities"):
        judge(torch.rand(1, 3, 8, 8), "a cat")
    assert len(logprob_server["requests"]) == 1  # a server without logprobs is a setting to fix, not retried
    with pytest.raises(ConfigError, match="mode="):
        VLMJudge(logprob_server["url"], mode="logprob")
