"""``train.prompt_format``: decoder-only prompts inside the tokenizer's chat template (instruction-tuned
backbones), the same at training, evaluation and in a registered pool."""

import mlflow
import pandas as pd
import pytest
import torch
from cli_in_process import run_cli
from mlflow import MlflowClient

from sapt.backbones import load_backbone
from sapt.config import PetConfig
from sapt.data.collate import IGNORE_INDEX, Collator, uses_chat_template
from sapt.data.templates import long_sequence_prompt
from sapt.errors import SaptError
from sapt.evaluation.generate import generate_answers
from sapt.methods import build_method
from sapt.methods.base import Stage
from sapt.registry import pool_store
from sapt.registry.mlflow_connection import fluent_uris
from sapt.registry.pool_store import Generation

SMOLLM2 = "embedded:smollm2-135m"
QUESTIONS = [long_sequence_prompt("", "What is the capital of France?"),
             long_sequence_prompt("Which word comes first in this list?", "apple butter honey rice cake")]


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone(SMOLLM2)


def test_auto_picks_the_chat_template_only_where_the_tokenizer_has_one(smollm2):
    tiny_llama, tiny_t5 = load_backbone("embedded:tiny-llama"), load_backbone("embedded:tiny-t5")
    assert uses_chat_template(smollm2.tokenizer, False, "auto") and not uses_chat_template(smollm2.tokenizer, False, "raw")
    assert not uses_chat_template(tiny_llama.tokenizer, False, "auto")
    with pytest.raises(SaptError, match="train.prompt_format: chat needs a decoder-only backbone"):
        uses_chat_template(tiny_t5.tokenizer, True, "chat")


def test_a_chat_prompt_is_the_users_turn_and_the_answer_the_assistants(smollm2):
    tok = smollm2.tokenizer
    collator = Collator.for_backbone(smollm2, 64, 8, "auto")
    long = long_sequence_prompt("Which word comes first in this list?", " ".join(["apple", "pear"] * 60))
    batch = collator.train_batch([QUESTIONS[1], long], ["apple", "apple"])
    short = [int(t) for t, m in zip(batch["input_ids"][0], batch["attention_mask"][0]) if m]
    rendered = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[1]}], add_generation_prompt=True,
                                       tokenize=False)
    assert tok.decode(short) == rendered + "apple" + tok.eos_token  # the answer closes the assistant's turn
    answer = [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(answer) == "apple" + tok.eos_token
    cut = tok.decode(batch["input_ids"][1][: -len(answer)])
    assert len(batch["input_ids"][1]) - len(answer) == 64  # cut to max_source_len, template and cue kept
    assert cut.startswith(rendered.split("Which")[0]) and cut.endswith("\nOutput: <|im_end|>\n<|im_start|>assistant\n")


def test_the_untrained_model_answers_a_chat_prompt_exactly_where_a_raw_one_gets_a_copy_of_the_input(smollm2):
    def answers(prompt_format):
        collator = Collator.for_backbone(smollm2, 256, 8, prompt_format)
        return generate_answers(smollm2.model, collator, QUESTIONS, max_new_tokens=12, device=torch.device("cpu"))

    chat, raw = answers("auto"), answers("raw")
    assert "Paris" in chat[0] and chat[1] == "apple", chat
    assert raw[1] != "apple" and raw != chat, raw  # raw: "apple butter honey rice cake", a copy of the input


def test_a_registered_pool_answers_in_the_format_it_was_trained_in(smollm2, tmp_path):
    method = build_method("seq-lora", {}, PetConfig())
    stage = Stage(0, (0,), (0,))
    model = method.build(smollm2, None, stage)  # a fresh LoRA: B is zero, so it answers as the bare model
    state = tmp_path / "state"
    method.save(model, state)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("chat", artifact_location=(tmp_path / "artifacts").as_uri())
    files = method.finished_files(state, 0)
    version = pool_store.register_task(
        uri, pool_name="chat-pool", state_dir=state, blocks=files.blocks, shared=files.shared, task_index=0,
        task_names=["capitals"], method="seq-lora", method_args=method.args.model_dump(mode="json"),
        pet=PetConfig().model_dump(), backbone_spec=SMOLLM2, backbone_identity=smollm2.identity,
        benchmark="own", metrics={}, source_run_id=client.create_run(experiment).info.run_id,
        generation=Generation(max_source_len=256, max_target_len=8, max_new_tokens=12, batch_size=2,
                              prompt_format="auto"))
    with fluent_uris(uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.pool}")
    answered = loaded.predict(pd.DataFrame({"input": QUESTIONS}))["answer"].tolist()
    expected = generate_answers(model, Collator.for_backbone(smollm2, 256, 8, "auto"), QUESTIONS, max_new_tokens=12,
                                device=torch.device("cpu"))
    assert answered == expected and expected[1] == "apple"


def test_sapt_run_refuses_chat_on_a_backbone_without_a_template_before_anything_starts(tmp_path):
    out = run_cli("run", "demo", "--set", "backbone=embedded:tiny-llama", "--set", "train.prompt_format=chat",
                  "--set", f"output_dir={tmp_path / 'out'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.prompt_format: chat needs a decoder-only backbone" in lines[0], out.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()
