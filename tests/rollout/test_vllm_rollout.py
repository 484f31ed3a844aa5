"""VLLMRollout: batch layout, log-prob kind, version gate, settings errors (no vLLM needed),
and the colocated engine for real (marked `vllm`: runs where vllm imports, i.e. the vLLM venv)."""

from __future__ import annotations

import logging

import pytest
import torch

from opd_sdk.config.settings import RolloutSettings, settings_from_kwargs
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.rollout.build import build_rollout_engine
from opd_sdk.rollout.engine import RolloutEngine, TransformersRollout, render_prompts
from opd_sdk.rollout.logprobs import selected_logprobs
from opd_sdk.rollout.vllm_colocated import VLLMRollout, assemble_batch, full_state_dict
from opd_sdk.rollout.vllm_support import (
    VERIFIED_VLLM,
    check_vllm_version,
    logprobs_mode_for,
)
from tests.loop_fixtures import tiny_tokenizer
from tests.vllm_fixtures import (
    fixed_ids,
    optimizer_step,
    requires_vllm,
    student,
    trainer_logprobs,
    vllm_imports,
)

PROMPTS = [PromptItem(prompt="What is 2+3?"), PromptItem(prompt="hi")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---- no vLLM needed ----------------------------------------------------------------------------


def test_assemble_batch_layout_worked_by_hand(tok):
    eos = tok.eos_token_id
    samples = [
        [([7, 8, eos, 9], [-0.1, -0.2, -0.3, -0.4]), ([5], [-1.5])],  # the first is cut after its EOS
        [([6, 6, 6], [-0.5, -0.6, -0.7]), ([eos], [-2.0])],
    ]
    batch = assemble_batch(PROMPTS, 2, [[1, 2, 3], [4]], samples, tokenizer=tok, pad_id=0, eos_ids=[eos],
                           temperature=0.7, max_new_tokens=3)
    assert batch.prompt_len == 3 and batch.input_ids_BT.shape == (4, 6) and batch.temperature == 0.7
    assert batch.input_ids_BT.tolist() == [
        [1, 2, 3, 7, 8, eos], [1, 2, 3, 5, 0, 0], [0, 0, 4, 6, 6, 6], [0, 0, 4, eos, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [
        [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert batch.completion_mask_BT.tolist() == [
        [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]
    expected = torch.tensor([[0, 0, 0, -0.1, -0.2, -0.3], [0, 0, 0, -1.5, 0, 0],
                             [0, 0, 0, -0.5, -0.6, -0.7], [0, 0, 0, -2.0, 0, 0]])
    assert torch.equal(batch.sampler_logprobs_BT, expected)
    assert [c.token_ids for c in batch.completions] == [[7, 8, eos], [5], [6, 6, 6], [eos]]
    assert batch.completions[3].text == "" and batch.completion_tokens() == 8


def test_logprobs_mode_matches_log_softmax_at_t():
    assert logprobs_mode_for(0.7, 1.0, 0) == "processed_logprobs"  # temperature applied, no filter
    assert logprobs_mode_for(1.0, 0.9, 0) == "raw_logprobs"  # unfiltered softmax at T = 1
    assert logprobs_mode_for(1.0, 1.0, 50) == "raw_logprobs"
    with pytest.raises(ConfigError, match="rollout.top_p"):
        logprobs_mode_for(0.7, 0.9, 0)


def test_version_gate_names_the_field():
    check_vllm_version("colocate", VERIFIED_VLLM)
    check_vllm_version("server-lora", "0.10.2")
    with pytest.raises(ConfigError, match=r"rollout.mode: vLLM 0.8.5 is too old for colocate"):
        check_vllm_version("colocate", "0.8.5")
    with pytest.raises(ConfigError, match=r"rollout.weight_sync: vLLM 0.13.9\+cpu is too old for server-full"):
        check_vllm_version("server-full", "0.13.9+cpu")


def test_settings_errors_name_the_field():
    with pytest.raises(ConfigError, match="rollout.base_url: mode 'server' needs"):
        settings_from_kwargs(engine="vllm", mode="server")
    with pytest.raises(ConfigError, match="rollout.base_url: only used with mode 'server'"):
        settings_from_kwargs(engine="vllm", base_url="http://127.0.0.1:8031/v1")
    with pytest.raises(ConfigError, match="rollout.engine: mode and weight_sync are vLLM settings"):
        settings_from_kwargs(mode="server", base_url="http://127.0.0.1:8031/v1")
    with pytest.raises(ConfigError, match="rollout.max_model_len"):
        settings_from_kwargs(engine="vllm", max_new_tokens=512, max_model_len=512)
    with pytest.raises(ConfigError, match="engine"):
        settings_from_kwargs(engine="sglang")


def test_full_state_dict_merges_lora_like_peft(tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(student(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer_step(model, fixed_ids(tok))  # B leaves 0: the adapter now changes the output
    merged = full_state_dict(model)
    reference = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    assert merged.keys() == reference.keys()
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) < 1e-6
    assert any(not torch.equal(merged[k], student(tok).state_dict()[k]) for k in merged if "q_proj" in k)


def test_server_down_is_a_config_error_before_training(tok):
    with pytest.raises(ConfigError, match=r"rollout.base_url: no vLLM server answers at http://127.0.0.1:8039/v1"):
        VLLMRollout(student(tok), tok, mode="server", base_url="http://127.0.0.1:8039/v1")


@pytest.mark.skipif(vllm_imports(), reason="checks the fallback where vllm does not import")
def test_auto_falls_back_to_transformers_and_says_so(tok, caplog):
    with caplog.at_level(logging.INFO, logger="opd_sdk.rollout.build"):
        engine = build_rollout_engine(RolloutSettings(engine="auto"), student(tok), tok)
    assert isinstance(engine, TransformersRollout)
    assert "rollout.engine auto -> transformers (vllm does not import here)" in caplog.text


@pytest.mark.vllm
@requires_vllm
def test_auto_picks_vllm_where_it_imports_and_says_so(tok):
    from opd_sdk.rollout.build import _auto_engine

    assert _auto_engine(RolloutSettings(engine="auto"), student(tok)) == ("vllm", "vllm imports and is built for cpu")
    # A filter at T != 1 has no matching vLLM log-prob kind: auto stays on transformers.
    engine, why = _auto_engine(RolloutSettings(engine="auto", temperature=0.7, top_p=0.9), student(tok))
    assert engine == "transformers" and "rollout.top_p" in why


# ---- colocated vLLM, for real ------------------------------------------------------------------

T = 0.7


@pytest.fixture(scope="module")
def engine(tok):
    if not vllm_imports():
        pytest.skip("vllm does not import here (run in the vLLM venv)")
    settings = RolloutSettings(engine="vllm", temperature=T, max_new_tokens=12, max_model_len=256)
    eng = build_rollout_engine(settings, student(tok), tok)  # the trainer's factory
    assert isinstance(eng, VLLMRollout) and eng.mode == "colocate"
    yield eng
    eng.close()


@pytest.mark.vllm
@requires_vllm
def test_colocated_sample_layout_and_sampler_logprobs(engine, tok):
    model = student(tok, seed=3)
    engine.sync_weights(model)
    assert isinstance(engine, RolloutEngine) and engine.exact_logprobs is False
    batch = engine.sample(PROMPTS, 4)
    assert batch.size == 8 and batch.group_size == 4 and batch.temperature == T
    rendered = tok(render_prompts(tok, PROMPTS[1:]), add_special_tokens=False)["input_ids"][0]
    row = batch.input_ids_BT[4, : batch.prompt_len][batch.attention_mask_BT[4, : batch.prompt_len].bool()]
    assert row.tolist() == rendered and batch.attention_mask_BT[4, 0] == 0  # "hi" is left-padded
    mask = batch.completion_mask_BT.bool()
    for b, comp in enumerate(batch.completions):
        n = len(comp.token_ids)
        assert 1 <= n <= 12 and int(mask[b].sum()) == n
        assert batch.input_ids_BT[b, batch.prompt_len : batch.prompt_len + n].tolist() == comp.token_ids
        assert tok.eos_token_id not in comp.token_ids[:-1]
    assert len({tuple(c.token_ids) for c in batch.completions}) > 2  # sampled, not one greedy answer
    ours = selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, temperature=T,
                             from_col=batch.prompt_len)
    at_one = selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, from_col=batch.prompt_len)
    assert (ours[mask] - batch.sampler_logprobs_BT[mask]).abs().max() < 1e-3  # log softmax(logits / T)
    assert (at_one[mask] - batch.sampler_logprobs_BT[mask]).abs().max() > 1e-2  # and not the T = 1 values
    assert (batch.sampler_logprobs_BT[~mask] == 0).all()


@pytest.mark.vllm
@requires_vllm
def test_colocated_weight_sync_is_exact(engine, tok):
    model, ids = student(tok, seed=1), fixed_ids(tok)
    engine.sync_weights(model)
    before = engine.text_logprobs(ids)
    assert (before - trainer_logprobs(model, ids)).abs().max() < 1e-3
    optimizer_step(model, ids)
    engine.sync_weights(model)
    after = engine.text_logprobs(ids)
    assert (after - trainer_logprobs(model, ids)).abs().max() < 1e-3
    assert (after - before).abs().max() > 0.05  # the step moved vLLM's weights


@pytest.mark.vllm
@requires_vllm
def test_colocated_lora_sync_is_exact(engine, tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(student(tok, seed=2), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["q_proj", "v_proj"]))
    ids = fixed_ids(tok)
    engine.sync_weights(model)
    before = engine.text_logprobs(ids)
    assert (before - trainer_logprobs(model, ids)).abs().max() < 1e-3
    optimizer_step(model, ids)  # only the adapter moves
    engine.sync_weights(model)
    after = engine.text_logprobs(ids)
    assert (after - trainer_logprobs(model, ids)).abs().max() < 1e-3
    assert (after - before).abs().max() > 0.05


@pytest.mark.vllm
@requires_vllm
def test_colocated_bad_settings_fail_before_the_engine_starts(tok):
    with pytest.raises(ConfigError, match="rollout.sleep_mode: vLLM has no sleep mode on CPU"):
        VLLMRollout(student(tok), tok, sleep_mode=True, max_model_len=256)
    with pytest.raises(ConfigError, match="rollout.weight_sync: 'lora' needs a LoRA student"):
        VLLMRollout(student(tok), tok, weight_sync="lora", max_model_len=256)


@pytest.mark.vllm
@requires_vllm
def test_trainer_steps_on_vllm_and_resume_restores_the_engine_weights(engine, tok, tmp_path):
    from opd_sdk.feedback.collector import FeedbackCollector
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.train.trainer import Trainer
    from providers.verifier import VerifierTeacher

    prompts = [PromptItem(prompt=f"What is {a}+{a}?", answer=str(2 * a)) for a in range(1, 9)]
    ids = fixed_ids(tok)

    def trainer(model, collector):
        return Trainer(model, tok, RewardWeighted(advantage="rloo"), collector, prompts, rollout=engine,
                       group_size=4, prompts_per_step=2, max_steps=2, lr=1e-2, temperature=T, precision="fp32",
                       output_dir=tmp_path, save_every=1, progress=False, tensorboard=False, shuffle=False)

    # A reward that varies within a group (longer answers score higher): the policy gradient is not 0.
    teacher = VerifierTeacher(check=lambda text, answer: len(text) / 12)
    with FeedbackCollector(teacher, progress=False) as collector:
        model = student(tok, seed=4)
        engine.sync_weights(model)
        start = engine.text_logprobs(ids)
        history = trainer(model, collector).train()
        assert [row["rollout/completion_tokens"] > 0 for row in history] == [True, True]
        trained = engine.text_logprobs(ids)
        assert (trained - trainer_logprobs(model, ids)).abs().max() < 1e-3  # synced after the last step
        assert (trained - start).abs().max() > 1e-3

        fresh = student(tok, seed=4)
        engine.sync_weights(fresh)  # the engine holds the untrained weights again
        assert (engine.text_logprobs(ids) - start).abs().max() < 1e-4
        resumed = trainer(fresh, collector)
        assert resumed.resume("latest") == 2
    # Resume loaded step 2 into the model and synced the engine: the same weights as the first run's.
    assert (engine.text_logprobs(ids) - trained).abs().max() < 1e-4


@pytest.mark.vllm
@requires_vllm
def test_trainer_with_overlapping_rollouts_keeps_the_engine_in_step(engine, tok):
    """max_staleness 1: the next batch is sampled in a worker thread while this step updates;
    the engine's lock keeps weight loads out of generations, and the last sync wins."""
    from opd_sdk.feedback.collector import FeedbackCollector
    from opd_sdk.objectives import RewardWeighted
    from opd_sdk.train.trainer import Trainer
    from providers.verifier import VerifierTeacher

    prompts = [PromptItem(prompt=f"What is {a}+{a}?", answer=str(2 * a)) for a in range(1, 9)]
    ids = fixed_ids(tok)
    model = student(tok, seed=6)
    engine.sync_weights(model)
    with FeedbackCollector(VerifierTeacher(check=lambda text, answer: len(text) / 12), progress=False) as collector:
        trainer = Trainer(model, tok, RewardWeighted(advantage="rloo"), collector, prompts, rollout=engine,
                          group_size=4, prompts_per_step=2, max_steps=3, lr=1e-2, temperature=T, precision="fp32",
                          max_staleness=1, progress=False, tensorboard=False, shuffle=False)
        history = trainer.train()
    assert len(history) == 3
    assert (engine.text_logprobs(ids) - trainer_logprobs(model, ids)).abs().max() < 1e-3


@pytest.mark.vllm
@requires_vllm
def test_two_processes_each_with_a_colocated_engine_equal_one_process(tmp_path):
    """Data parallel with vLLM: under torchrun every rank samples its share with its own colocated
    engine; the weights after 3 steps equal one process trained on the same global batch."""
    import sys

    from tests.parallel.test_distributed import SCRIPT, run, scores_by_content
    from tests.scripted_server import ScriptedServer

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    with ScriptedServer(scores_by_content) as srv:
        run(torchrun + ["record", str(tmp_path), srv.base_url, "0", "vllm"], timeout=420)
        run([sys.executable, str(SCRIPT), "replay", str(tmp_path), srv.base_url, "0", "vllm"], timeout=300)
    two = torch.load(tmp_path / "weights.pt", weights_only=True)
    one = torch.load(tmp_path / "replay_weights.pt", weights_only=True)
    start = student(tiny_tokenizer()).state_dict()
    assert max(float((two[n] - start[n]).abs().max()) for n in two) > 1e-3  # the weights moved
    # Rounding only: on the 2-core CI machine the largest gap is 1.08e-5 (gate_proj), the same
    # number to the last digit at 054b301 and after the re-layering; a rank's share lost or
    # counted twice moves weights by about one Adam step (lr 1e-2), 200x more than this bound.
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=5e-5, rtol=0, msg=name)
