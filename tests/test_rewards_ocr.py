"""The OCR reward: Flow-GRPO's normalised edit distance, exact on given strings; GOT-OCR 2.0 loaded from a folder."""

import pytest
import torch
from _threads import one_thread  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from align.core.errors import AlignError, RewardError
from rewards import build_reward
from rewards.testing import byte_tokenizer
from rewards.zoo.ocr import OCRReward, edit_distance, ocr_distance, ocr_similarity, quoted_text


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("same", "same", 0),
     ("intention", "execution", 5), ("ab", "ba", 2)],
)
def test_edit_distance_known_answers(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


@settings(max_examples=40)
@given(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8))
def test_edit_distance_is_a_metric(a, b, c):
    assert edit_distance(a, a) == 0
    assert edit_distance(a, b) == edit_distance(b, a) >= abs(len(a) - len(b))
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)


@pytest.mark.parametrize(
    "target, read, reward",
    [
        ("Hello World", "hello world", 1.0),  # case and spaces do not count
        ("Hello World", "A sign: HELLO WORLD!!", 1.0),  # the target inside longer text: distance 0
        ("Hello World", "helo wrld", 1 - 2 / 10),  # two deletions over 10 characters (spaces removed)
        ("OPEN", "OPEM", 1 - 1 / 4),
        ("OPEN", "", 0.0),  # nothing read: d = 4 = len
        ("OPEN", "completely unrelated text", 0.0),  # d capped at len(target)
        ("café", "CAFÉ", 1.0),
    ],
)
def test_flow_grpo_similarity_known_answers(target, read, reward):
    assert ocr_similarity(target, read) == pytest.approx(reward, abs=1e-12)
    assert 0 <= ocr_distance(target, read) <= len(target.replace(" ", ""))


def test_quoted_text():
    assert quoted_text('A neon sign that says "Open 24/7" at night') == "Open 24/7"
    assert quoted_text('first "one" then "two"') == "one"
    assert quoted_text("a shop with \u201cBakery\u201d above the door") == "Bakery"
    assert quoted_text("a photo of a cat") is None
    with pytest.raises(AlignError, match="empty"):
        ocr_similarity("  ", "x")


def stub_reader(texts):
    calls = []

    def read(images):
        calls.append(images.shape[0])
        return list(texts[: images.shape[0]])

    read.calls = calls
    return read


def test_reward_scores_and_exact_flags_from_a_reader():
    reader = stub_reader(["HELLO WORLD", "helo wrld", "nothing"])
    reward = build_reward("ocr", model=reader)
    assert not reward.differentiable
    prompts = ['a sign "Hello World"', 'a sign "Hello World"', 'a mug that says "OPEN"']
    out = reward.score(torch.rand(3, 3, 16, 16), prompts)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.8, 0.0]))
    assert out.info["exact"].tolist() == [1.0, 0.0, 0.0]
    assert reward.applies_to(prompts[0]) and not reward.applies_to("a photo of a cat")


def test_prompt_without_quotes_is_a_clear_error():
    reward = OCRReward(stub_reader(["x"]))
    with pytest.raises(RewardError, match=r"quotes no text.*between double quotes"):
        reward(torch.rand(1, 3, 8, 8), "a photo of a cat")


def test_reader_returning_the_wrong_count_is_named():
    reward = OCRReward(lambda images: ["only one"])
    with pytest.raises(RewardError, match="expected 2 strings"):
        reward(torch.rand(2, 3, 8, 8), '"a"')


@pytest.fixture(scope="module")
def tiny_got_folder(tmp_path_factory):
    """A seeded GOT-OCR 2.0 at toy size with its processor, saved as a local model folder."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = byte_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"))
    # a 128 px image, 16 px patches -> 8 x 8, two stride-2 convolutions -> 2 x 2 = 4 image tokens
    processor = GotOcr2Processor(GotOcr2ImageProcessorPil(size={"height": 128, "width": 128}), tokenizer)
    config = GotOcr2Config(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                           image_size=128, patch_size=16, window_size=2, global_attn_indexes=(1,), mlp_dim=32),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"), image_seq_length=4,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("got")
    GotOcr2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_got_ocr_from_a_local_folder_offline(tiny_got_folder):
    reward = build_reward("ocr", model=str(tiny_got_folder), max_new_tokens=6, offline=True)
    assert reward.reader.processor.num_image_tokens == 4  # read off the model's geometry
    images = torch.rand(2, 3, 40, 56)
    prompts = ['a sign that says "OPEN"', 'a cake with "Happy Birthday" on it']
    texts = reward.read(images)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    out = reward.score(images, prompts)
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    expected = [ocr_similarity(quoted_text(p), t) for p, t in zip(prompts, texts)]
    torch.testing.assert_close(out.scores, torch.tensor(expected))  # greedy decoding: the same text again


def test_a_composite_applies_where_all_its_parts_do():
    from rewards import WeightedSum

    mixed = WeightedSum({"ocr": (OCRReward(stub_reader(["x"])), 1.0), "light": (build_reward("brightness"), 0.5)})
    assert mixed.applies_to('a sign "x"') and not mixed.applies_to("a photo of a cat")
    assert build_reward("brightness").applies_to("anything")
