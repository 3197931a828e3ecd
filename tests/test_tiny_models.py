"""The tiny test tokenizers (align.builtin.testing) give the same token ids under transformers 4.x,
which builds them from files or a tokenizers backend, as under 5.x, which builds them from memory."""

import pytest

from align.builtin.testing import t5_word_tokenizer, word_tokenizer

PROMPTS = ["a red circle", "A Blue  square on a dark background", "zebra!"]


@pytest.mark.floor
def test_word_tokenizers_give_the_same_ids_on_every_transformers_version():
    clip = word_tokenizer()(PROMPTS, padding="max_length", max_length=10, truncation=True).input_ids
    t5 = t5_word_tokenizer()(PROMPTS, padding="max_length", max_length=10, truncation=True).input_ids
    # computed with transformers 5.24; 4.48 gives the same
    assert clip == [
        [215, 1, 173, 84, 216, 216, 216, 216, 216, 216],
        [215, 1, 69, 193, 142, 1, 100, 59, 216, 216],
        [215, 216, 8, 70, 1, 216, 216, 216, 216, 216],
    ]
    assert t5 == [
        [3, 39, 15, 1, 0, 0, 0, 0, 0, 0],
        [2, 2, 61, 70, 54, 44, 32, 3, 19, 1],
        [2, 75, 54, 51, 67, 50, 2, 1, 0, 0],
    ]
