"""saetune rewards for TRL and verl: the reward-function contracts, and real TRL GRPOTrainer steps on the toy."""

import inspect
import math

import pytest
import torch

from saetune.errors import SaetuneError
from saetune.rl.integrations import trl as T
from saetune.rl.integrations.verl import compute_score

GOOD = "<think> 3 + 4 = 7 . wait , let me check : 3 + 4 = 7 . therefore the answer is 7 . </think> <answer> 7 </answer>"
BAD = "<think> 3 + 4 = 8 . therefore the answer is 8 . </think> <answer> 8 </answer>"


# ---------------------------------------------------------------------------------------------- TRL contract
@pytest.mark.parametrize("fn", [T.correctness_reward, T.toy_correctness_reward, T.rpr_reward])
def test_trl_reward_signature(fn):
    params = inspect.signature(fn).parameters
    assert list(params)[:3] == ["prompts", "completions", "completion_ids"]
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert fn.__name__ in ("correctness", "toy_correctness", "rpr")


def test_trl_rewards_grade_strings_and_conversations():
    prompts = ["User : compute ( 3 + 4 ) . Assistant :"] * 3
    out = T.toy_correctness_reward(prompts=prompts, completions=[GOOD, BAD, GOOD], completion_ids=None,
                                   answer=["7", "7", None], trainer_state=object())
    assert out == [1.0, 0.0, None]  # None: no gold for that sample, TRL skips it
    conv = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": BAD}]]
    assert T.toy_correctness_reward(prompts=prompts[:2], completions=conv, answer=["7", "7"]) == [1.0, 0.0]
    assert T.correctness_reward(prompts=None, completions=[r"so \boxed{\frac{1}{2}}", r"\boxed{3}"],
                                completion_ids=None, answer=["\\frac{1}{2}", "4"]) == [1.0, 0.0]
    r = T.rpr_reward(prompts=None, completions=["Wait, let me check. Therefore, hence we need to", "x"],
                     completion_ids=None)
    assert r[0] > 0 and r[1] == 0.0 and all(isinstance(v, float) for v in r)


def test_trl_toy_reward_reads_completion_ids_with_the_tags():
    from saetune.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    ids = [tok(GOOD, add_special_tokens=False)["input_ids"]]
    stripped = [tok.decode(ids[0], skip_special_tokens=True)]  # what TRL passes as text: tags gone
    assert T.toy_correctness_reward(prompts=[""], completions=stripped, completion_ids=ids, answer=["7"]) == [1.0]


def test_trl_reward_errors_are_loud():
    with pytest.raises(SaetuneError, match="no 'answer' column"):
        T.correctness_reward(prompts=[""], completions=[GOOD], completion_ids=None, solution=["7"])
    with pytest.raises(SaetuneError, match="string or a list of messages"):
        T.rpr_reward(prompts=[""], completions=[42], completion_ids=None)

    def broken(text, answer):
        raise ValueError("bad gold")
    f = T.make_reward(broken, "mine", needs_answer=True)
    with pytest.raises(SaetuneError, match="reward 'mine' failed on completion 0: ValueError: bad gold"):
        f(prompts=[""], completions=[GOOD], completion_ids=None, answer=["7"])
    g = T.make_reward(lambda text: math.nan, "nanny", needs_answer=False)
    with pytest.raises(SaetuneError, match="'nanny' returned NaN on completion 0"):
        g(prompts=[""], completions=[GOOD], completion_ids=None)


# ---------------------------------------------------------------------------------------------- verl contract
def test_verl_compute_score():
    params = list(inspect.signature(compute_score).parameters)
    assert params == ["data_source", "solution_str", "ground_truth", "extra_info"]
    good = compute_score("saetune/toy", GOOD, "7")
    assert good["score"] == 1.0 and good["correctness"] == 1.0 and good["rpr_hits"] >= 1
    assert compute_score("toy", BAD, "7")["score"] == 0.0
    w = compute_score("saetune/toy", GOOD, "7", {"rpr_weight": 0.5})
    assert w["score"] == pytest.approx(1.0 + 0.5 * w["rpr"]) and w["rpr"] > 0
    assert compute_score("math500", r"The answer is \boxed{\frac{1}{2}}.", "\\frac{1}{2}")["score"] == 1.0
    assert compute_score("math500", r"\boxed{3}", "4")["score"] == 0.0
    with pytest.raises(SaetuneError, match="solution_str must be a str"):
        compute_score("toy", None, "7")


# ---------------------------------------------------------------------------------------------- TRL for real
def test_trl_grpo_trainer_runs_on_the_toy_with_saetune_rewards(tmp_path):
    """A few real TRL GRPOTrainer steps on CPU, the toy model and saetune's reward functions."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from saetune.toy import load_toy, task
    from saetune.toy.build import generation_stop_ids
    model, tok = load_toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exs = task.examples(8, 5)
    ds = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in exs])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=48, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", bf16=False, seed=0, disable_tqdm=True,
                      generation_kwargs={"eos_token_id": generation_stop_ids(tok)})
    trainer = GRPOTrainer(model=model, reward_funcs=[T.toy_correctness_reward, T.rpr_reward], args=args,
                          train_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "rewards/toy_correctness/mean" in r]
    assert trainer.state.global_step == 2 and len(logs) == 2
    # the toy base solves about half its sampled problems: saetune's grader saw the tags TRL strips
    assert sum(r["rewards/toy_correctness/mean"] for r in logs) > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
