"""CURE critical-token branching on verl's data: batch transforms and a branch agent loop.

A CURE step in a verl trainer, with saetune's pieces (names as registered by
:mod:`saetune.rl.integrations.verl_plugin`):

1. generate ``n1`` originals per prompt as usual (``actor_rollout_ref.rollout.n = n1``);
2. compute their per-token entropy (verl's ``compute_log_prob`` with ``calculate_entropy``
   gives ``entropys`` [B, R]);
3. :func:`cure_branch_prompts` picks each original's critical position
   (:func:`saetune.rl.cure.select_critical_position`) and returns ``n2`` branch requests per
   original, each carrying its token-level prompt (prompt + the response before the critical
   token) and ``agent_name = "saetune_cure_branch"``;
4. the agent loop :class:`CureBranchAgentLoop` generates from those tokens (verl's own
   single-turn loop would re-tokenise a chat prompt and lose the prefix);
5. :func:`cure_concat` joins originals and branches; branches keep their prompt's ``uid``, so
   ``algorithm.adv_estimator=saetune_grpo`` gives the 4 + 12 samples one GRPO advantage, and
   the reward is computed on a branch's continuation only (it is the branch's response).

Steps 1, 2 and 5's update belong to verl's trainer loop; saetune does not ship a trainer
subclass (one for verl's trainer registry could not be exercised without Ray workers and GPUs),
so a CURE run needs those calls placed in a custom ``fit`` (see ``saetune/recipes/verl/README.md``).
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import numpy as np
import torch
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput

from saetune.errors import SaetuneError
from saetune.rl.cure import branch_prompt, select_critical_position

__all__ = ["BRANCH_AGENT", "CureBranchAgentLoop", "cure_branch_prompts", "cure_concat"]

BRANCH_AGENT = "saetune_cure_branch"


def _left_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, P)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, P)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def cure_branch_prompts(batch: DataProto, entropys: torch.Tensor, tokenizer, n2: int = 3, top_k: int = 20,
                        max_prompt_len: int | None = None, seed: int = 0) -> DataProto:
    """Branch requests for every original response of a verl rollout batch.

    Args:
        batch: verl rollout output with ``prompts`` [B, P] (left-padded), ``responses`` [B, R]
            and ``attention_mask`` [B, P + R]; its non-tensor fields (``uid``, ``data_source``,
            ``reward_model``, ``extra_info``, …) are copied to each branch.
        entropys: [B, R] per-token entropy of the responses.
        tokenizer: the policy's tokenizer (special ids and ``decode`` for the validity rule).
        n2: continuations per original (CURE: 3).
        top_k: candidates kept per response (CURE: 20).
        max_prompt_len: the prompt window (default P); prompt + prefix is cut to it.
        seed: seeds the uniform draw among candidates (``torch.Generator``), so a step is reproducible.

    Returns:
        ``B · n2`` rows, the ``n2`` of one original adjacent: ``input_ids`` / ``attention_mask`` /
        ``position_ids`` [B·n2, max_prompt_len] left-padded, and non-tensor ``cure_prompt_ids``
        (token lists), ``cure_prefix_len``, ``cure_position``, ``cure_n_candidates``,
        ``cure_source`` (row of the original) and ``agent_name``.
    """
    if isinstance(n2, bool) or not isinstance(n2, int) or n2 < 1:
        raise SaetuneError(f"n2 must be an integer >= 1, got {n2!r}")
    for key in ("prompts", "responses", "attention_mask"):
        if key not in batch.batch.keys():
            raise SaetuneError(f"the batch has no {key!r}; pass a verl rollout output (keys: {sorted(batch.batch.keys())})")
    prompts, responses, attn = batch.batch["prompts"], batch.batch["responses"], batch.batch["attention_mask"]
    n, p_width = prompts.shape
    if entropys.shape != responses.shape:
        raise SaetuneError(f"entropys has shape {tuple(entropys.shape)}, expected {tuple(responses.shape)} like responses")
    window = p_width if max_prompt_len is None else int(max_prompt_len)
    gen = torch.Generator().manual_seed(int(seed))
    rows, prefix, pos, ncand = [], [], [], []
    for b in range(n):
        prompt = prompts[b][attn[b, :p_width].bool()].tolist()
        n_resp = int(attn[b, p_width:].sum())
        resp = responses[b, :n_resp]
        position, cands = select_critical_position(entropys[b, :n_resp].float(), resp, tokenizer, top_k=top_k,
                                                   generator=gen)
        ids, k = branch_prompt(prompt, resp.tolist(), position, window)
        rows.append(ids)
        prefix.append(k)
        pos.append(position)
        ncand.append(len(cands))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _left_pad(rows, window, pad)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    nt = {k: np.asarray(v) for k, v in batch.non_tensor_batch.items() if k != "agent_name"}
    nt["cure_prompt_ids"] = np.empty(n, dtype=object)
    nt["cure_prompt_ids"][:] = rows
    nt["cure_prefix_len"] = np.asarray(prefix, dtype=np.int64)
    nt["cure_position"] = np.asarray(pos, dtype=np.int64)
    nt["cure_n_candidates"] = np.asarray(ncand, dtype=np.int64)
    nt["cure_source"] = np.arange(n, dtype=np.int64)
    nt["agent_name"] = np.asarray([BRANCH_AGENT] * n, dtype=object)
    out = DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask, "position_ids": position_ids},
                              non_tensors=nt, meta_info=dict(batch.meta_info))
    return out.repeat(repeat_times=n2, interleave=True)


def cure_concat(originals: DataProto, branches: DataProto) -> DataProto:
    """One batch of originals then branches, with ``is_cure_branch`` marking the branches.

    Both must be rollout outputs of the same widths and keys (verl pads agent-loop outputs to
    the configured prompt and response lengths). Every branch's ``uid`` must be one of the
    originals', so each CURE group gets one advantage; a mismatch names the first bad key.
    """
    ka, kb = set(originals.batch.keys()), set(branches.batch.keys())
    if ka != kb:
        raise SaetuneError(f"originals and branches hold different tensors: only in originals {sorted(ka - kb)}, "
                           f"only in branches {sorted(kb - ka)}")
    for k in sorted(ka):
        if originals.batch[k].shape[1:] != branches.batch[k].shape[1:]:
            raise SaetuneError(f"{k!r} is {tuple(originals.batch[k].shape[1:])} wide in the originals but "
                               f"{tuple(branches.batch[k].shape[1:])} in the branches; pad both to the rollout widths")
    if "uid" in originals.non_tensor_batch:
        missing = set(branches.non_tensor_batch.get("uid", [])) - set(originals.non_tensor_batch["uid"])
        if missing or "uid" not in branches.non_tensor_batch:
            raise SaetuneError(f"branch uids {sorted(missing)[:3] or '(none)'} match no original: a CURE group must share its prompt's uid")
    common = set(originals.non_tensor_batch) & set(branches.non_tensor_batch)
    a = DataProto(batch=originals.batch, non_tensor_batch={k: originals.non_tensor_batch[k] for k in common},
                  meta_info=originals.meta_info)
    b = DataProto(batch=branches.batch, non_tensor_batch={k: branches.non_tensor_batch[k] for k in common},
                  meta_info=branches.meta_info)
    out = DataProto.concat([a, b])
    out.non_tensor_batch["is_cure_branch"] = np.asarray([False] * len(a) + [True] * len(b))
    return out


class CureBranchAgentLoop(AgentLoopBase):
    """verl agent loop ``saetune_cure_branch``: generate a continuation of given prompt tokens.

    Reads the sample's ``cure_prompt_ids`` (from :func:`cure_branch_prompts`) instead of
    applying the chat template to ``raw_prompt``; the whole prompt + prefix is the prompt
    (no gradient), the generated tokens are the response (truncated to the rollout's
    ``response_length``).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.response_length = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        if "cure_prompt_ids" not in kwargs:
            raise SaetuneError(f"agent loop {BRANCH_AGENT!r} needs the sample field 'cure_prompt_ids' "
                               "(build the batch with saetune.rl.integrations.verl_cure.cure_branch_prompts)")
        prompt_ids = [int(t) for t in kwargs["cure_prompt_ids"]]
        out = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                 sampling_params=sampling_params)
        response = list(out.token_ids)[: self.response_length]
        logprobs = list(out.log_probs)[: self.response_length] if out.log_probs else None
        return AgentLoopOutput(
            prompt_ids=prompt_ids, response_ids=response, response_mask=[1] * len(response),
            response_logprobs=logprobs, num_turns=2, metrics={},
            extra_fields={"cure_prefix_len": int(kwargs.get("cure_prefix_len", 0)), "turn_scores": [],
                          "tool_rewards": []})
