import pytest

from sapt.backbones import load_backbone
from sapt.data.collate import IGNORE_INDEX, Collator
from sapt.data.templates import ANSWER_CUE, long_sequence_prompt


@pytest.fixture(scope="module", params=["embedded:tiny-t5", "embedded:tiny-llama"])
def backbone(request):
    return load_backbone(request.param)


def test_labels_cover_the_answer_and_eos_only(backbone):
    tok = backbone.tokenizer
    collator = Collator(tok, backbone.is_encoder_decoder, max_source_len=64, max_target_len=8)
    batch = collator.train_batch(["first prompt here\nOutput: ", "a much longer second prompt here\nOutput: "],
                                 ["red", "blue"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    for row, answer in zip(batch["labels"], ["red", "blue"]):
        kept = [int(t) for t in row if t != IGNORE_INDEX]
        assert kept[-1] == collator.eos_id
        assert tok.decode(kept[:-1]).strip() == answer
    if not backbone.is_encoder_decoder:
        # Decoder-only: left padding, and the sequence ends with the answer's EOS.
        assert batch["attention_mask"][0, 0] == 0
        assert int(batch["input_ids"][1, -1]) == collator.eos_id


def test_source_is_cut_at_max_length(backbone):
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, max_source_len=10, max_target_len=4)
    batch = collator.generation_batch(["word " * 50])
    assert batch["input_ids"].shape[1] == 10


def test_generation_batch_pads_on_the_side_the_family_needs(backbone):
    collator = Collator(backbone.tokenizer, backbone.is_encoder_decoder, max_source_len=64, max_target_len=4)
    batch = collator.generation_batch(["short", "a longer prompt with more words"])
    first_pad_position = 0 if not backbone.is_encoder_decoder else -1
    assert batch["attention_mask"][0, first_pad_position] == 0


@pytest.mark.parametrize("name", ["embedded:tiny-llama", "embedded:smollm2-135m"])
def test_a_long_decoder_only_prompt_loses_the_end_of_its_input_and_keeps_the_cue(name):
    backbone = load_backbone(name)
    collator = Collator(backbone.tokenizer, False, max_source_len=24, max_target_len=4)
    instruction = "Name the first word of the input."
    source = long_sequence_prompt(instruction, " ".join(["apple", "pear", "plum"] * 40))
    cue = collator._encode([ANSWER_CUE], 24, special=False)[0]
    head = collator._encode([instruction], 24, special=False)[0]
    prompt = [int(t) for t in collator.generation_batch([source])["input_ids"][0]]
    assert len(prompt) == 24 and prompt[-len(cue):] == cue and prompt[:len(head)] == head
    trained = collator.train_batch([source], ["apple"])
    assert [int(t) for t in trained["input_ids"][0][:24]] == prompt  # the same cut at training and test
    short = long_sequence_prompt(instruction, "apple pear")
    assert collator.generation_batch([short])["input_ids"][0].tolist() == collator._encode([short], 24, False)[0]
