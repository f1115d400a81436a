"""Supervised fine-tuning: JSONL reading and its errors, templates and response masks, packing,
and `llm-jax finetune` end to end (a model learns to answer in the template; a LoRA run's
checkpoint holds only its tuned parameters and composes with its base for generation)."""

import json
import random

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm_jax import cli
from llm_jax.config import ConfigError, ModelConfig
from llm_jax.data.tokenizers import CharTokenizer
from llm_jax.finetune import data as sft_data
from llm_jax.finetune.sft import finetune, finetune_config
from llm_jax.interop.convert import write_run_dir
from llm_jax.models import abstract_params
from llm_jax.models.lora import NF4_MAX_ERROR, NF4Tensor
from llm_jax.training.checkpoint import load_trained_model

TOKENIZER = CharTokenizer(sorted(set(chr(c) for c in range(32, 127)) | {"\n"}))
MODEL = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
# Distinct first letters, so a tiny model tells the questions apart within a few steps.
SOUNDS = {"cat": "meow", "dog": "woof", "hen": "cluck", "owl": "hoot", "bee": "buzz", "pig": "oink"}


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------ reading


def test_jsonl_errors_name_the_line(tmp_path):
    good = {"instruction": "say hi", "output": "hi"}
    bad_json = _write_jsonl(tmp_path / "a.jsonl", [good, good, '{"instruction": "x", "output": '])
    with pytest.raises(sft_data.DataError, match=r"a\.jsonl:3: not valid JSON"):
        sft_data.read_jsonl(bad_json)
    missing = _write_jsonl(tmp_path / "b.jsonl", [good, {"instruction": "no answer"}])
    with pytest.raises(sft_data.DataError, match=r"b\.jsonl:2: missing field 'output'"):
        sft_data.read_jsonl(missing)
    bad_role = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(sft_data.DataError, match=r"c\.jsonl:1: messages\[0\] has role 'bot'"):
        sft_data.read_jsonl(bad_role)
    (tmp_path / "d.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(sft_data.DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        sft_data.read_jsonl(tmp_path / "d.jsonl")


def test_instruction_and_chat_examples_read_as_conversations(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "add", "input": "2 3", "output": "5"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    first, second = sft_data.read_jsonl(path)
    assert first == [{"role": "user", "content": "add\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert [m["role"] for m in second] == ["system", "user", "assistant"]


# ----------------------------------------------------------------------- template, mask


def test_loss_mask_covers_only_the_assistant_turns_and_their_eos():
    template = sft_data.TEMPLATES["default"]
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    ids, mask = sft_data.encode(messages, template, TOKENIZER)
    trained = ids[mask == 1].tolist()
    eos = TOKENIZER.eos_id
    assert trained == TOKENIZER.encode("a1") + [eos] + TOKENIZER.encode("a2") + [eos]
    assert TOKENIZER.decode(ids[mask == 0].tolist()) == (
        "### System:\nsys\n\n### User:\nq1\n\n### Assistant:\n\n\n### User:\nq2\n\n### Assistant:\n\n\n")
    # The generation prompt is exactly the untrained text ahead of the last answer.
    prompt = sft_data.encode_prompt(messages[:4], template, TOKENIZER)
    assert prompt == ids[: len(prompt)].tolist() and ids[len(prompt)] == TOKENIZER.encode("a2")[0]
    assert template.prompt(messages[1:2]) == "### User:\nq1\n\n### Assistant:\n"


def test_packed_batches_keep_examples_whole_with_segments_and_positions():
    rng = random.Random(0)
    examples = [[{"role": "user", "content": "x" * rng.randint(1, 8)}, {"role": "assistant", "content": "yy"}]
                for _ in range(12)]
    batches = list(sft_data.sft_batches(examples, TOKENIZER, sft_data.TEMPLATES["default"], seq_len=128,
                                        batch_size=2, train=False))
    seen, eos = 0, TOKENIZER.eos_id
    for b in batches:
        assert all(v.shape == (2, 128) for v in b.values())
        for row in range(2):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            for s in set(seg[seg > 0].tolist()):
                here = seg == s
                assert pos[here].tolist() == list(range(here.sum()))  # restart at 0, contiguous
                # Each packed example ends with its own answer and EOS: the loss sees "yy" + EOS.
                assert b["targets"][row][here & (b["loss_mask"][row] == 1)].tolist() == TOKENIZER.encode("yy") + [eos]
                seen += 1
            assert not b["loss_mask"][row][seg == 0].any()
    assert seen == len(examples) and 2 * len(batches) < len(examples) / 2  # packed: several per row


# ------------------------------------------------------------------------ end to end


def _base_run(root):
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, x.dtype) if "scale" in jax.tree_util.keystr(path)
        else rng.normal(0.0, 0.02, x.shape).astype(x.dtype), abstract_params(MODEL))
    return write_run_dir(root / "base", params, MODEL, TOKENIZER)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    base = _base_run(root)
    rng = random.Random(0)
    animals = [rng.choice(list(SOUNDS)) for _ in range(300)]
    data = _write_jsonl(root / "train.jsonl", [{"instruction": f"sound of {a}", "output": SOUNDS[a]}
                                               for a in animals])
    common = [f"sft.train_path={data}", "train.batch_size=8", "data.seq_len=64", "train.log_every=50",
              "train.tensorboard=false", "train.progress_bar=false", "train.eval_steps=2", "optim.lr=3e-3",
              "train.sample_tokens=8"]
    full = finetune(finetune_config(base, common + [f"train.run_dir={root / 'full'}", "train.steps=100",
                                                    "train.eval_every=100", "train.checkpoint_every=100"]),
                    print_fn=lambda _: None)
    # A few QLoRA steps on a data x fsdp x tensor mesh, no evaluation or samples: this run
    # is for its checkpoint (and the sharded NF4 base).
    qlora = finetune(finetune_config(base, common + [f"train.run_dir={root / 'qlora'}", "train.steps=3",
                                                     "optim.warmup_steps=1", "model.peft.method=qlora",
                                                     "model.peft.lora_targets=all", "model.peft.qlora_group_size=32",
                                                     "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                                     "train.eval_steps=0", "train.sample_tokens=0"]),
                     print_fn=lambda _: None)
    return root, full, qlora


def test_sft_learns_to_answer_in_the_template(runs):
    _, full, _ = runs
    assert full.validation_loss < 0.5  # log(6) ~ 1.8 for a guess among the six answers
    assert full.samples and all(answer == reference for _, reference, answer in full.samples)


def test_qlora_checkpoint_holds_only_tuned_params_and_composes_with_the_base(runs, capsys):
    root, _, qlora = runs
    assert 0 < qlora.tuned_params < qlora.total_params / 5
    step_dir = sorted((root / "qlora" / "checkpoints").glob("[0-9]*"))[-1]
    saved = ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata["params"]
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(
        saved, is_leaf=lambda x: not isinstance(x, dict))[0]}
    assert names and all("['lora']" in n for n in names), sorted(names)[:5]

    cfg, params, _ = load_trained_model(root / "qlora")
    assert cfg.model.peft.method == "qlora" and cfg.train.init_from == str(root / "base")
    _, base_params, _ = load_trained_model(root / "base")
    np.testing.assert_array_equal(params["embed"]["embedding"], base_params["embed"]["embedding"])
    wo, base_wo = params["layers"]["mlp"]["wo"]["kernel"], base_params["layers"]["mlp"]["wo"]["kernel"]
    assert isinstance(wo, NF4Tensor)  # the base, quantized again on load
    np.testing.assert_allclose(wo.dequantize(), base_wo, atol=float(np.abs(base_wo).max()) * NF4_MAX_ERROR + 1e-7)
    assert np.abs(np.asarray(params["layers"]["attention"]["query"]["lora"]["b"])).max() > 0  # trained

    assert cli.main(["generate", "--checkpoint", str(root / "qlora"), "--prompt", "sound of cat", "--chat",
                     "max_new_tokens=4", "temperature=0"]) == 0
    assert "### Assistant:" in capsys.readouterr().out


def test_finetune_refuses_a_missing_data_file_and_a_bad_template(runs):
    root, _, _ = runs
    with pytest.raises(ConfigError, match="sft.template='vicuna' is not allowed"):
        finetune_config(root / "base", ["sft.template=vicuna"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        finetune(finetune_config(root / "base", [f"sft.train_path={root / 'nope.jsonl'}",
                                                 f"train.run_dir={root / 'x'}"]), print_fn=lambda _: None)


def test_finetune_refuses_what_would_lose_or_waste_a_run(runs):
    root, _, _ = runs
    data = f"sft.train_path={root / 'train.jsonl'}"
    with pytest.raises(ConfigError, match="is the base run itself"):  # its checkpoint would be set aside
        finetune(finetune_config(root / "base", [data, f"train.run_dir={root / 'base'}"]), print_fn=lambda _: None)
    # Resuming the finished run with another optimizer: refused, its checkpoints untouched.
    before = sorted(p.name for p in (root / "full" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="optim.name: 'adamw' -> 'lion'"):
        finetune(finetune_config(root / "base", [data, "train.batch_size=8", "data.seq_len=64", "optim.lr=3e-3",
                                                 "optim.name=lion", f"train.run_dir={root / 'full'}"]),
                 print_fn=lambda _: None)
    assert sorted(p.name for p in (root / "full" / "checkpoints").iterdir()) == before
    with pytest.raises(ConfigError, match="no training example has a response token within its first 5 tokens"):
        finetune(finetune_config(root / "base", [data, "data.seq_len=4", f"train.run_dir={root / 'short'}"]),
                 print_fn=lambda _: None)
