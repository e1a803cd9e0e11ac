"""CURE stage 1: critical-token selection and branching (re-concatenation) data.

CURE ("critical-token re-concatenation", see SPEC_RL.md) keeps exploration alive by branching
from the response's high-entropy tokens:

1. sample n1 responses per prompt and their per-position entropy;
2. sort the response positions by entropy, descending and stable, and keep the first ``top_k``
   *valid* ones (position ≠ 0, not a special token, ``decode([id]).strip()`` longer than one
   character — digits, punctuation and single letters carry no decision);
3. draw one of them uniformly (no threshold); with none valid, branch at position 0;
4. new prompt = prompt + the response tokens *before* the critical token (the critical token
   itself is re-sampled), cut to the first ``max_prompt_len`` tokens;
5. sample n2 continuations per new prompt;
6. the n1 originals and n1·n2 branches form ONE GRPO group: one advantage over all of them.
   A branch's prefix counts as prompt (no gradient) and its reward is computed on its
   continuation only.

Everything here is a pure function of its inputs (the random draw takes an explicit
``torch.Generator``); the rollout and the trainer are the stateful shells around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from saetune.errors import SaetuneError
from saetune.rl.advantages import grpo_advantages

__all__ = [
    "CureBranch",
    "CureGroup",
    "assemble_group",
    "branch_prompt",
    "critical_candidates",
    "critical_trace",
    "select_critical_position",
]


def _as_1d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise SaetuneError(
            f"{name} must be 1-D over the response positions, got shape {tuple(t.shape)}."
        )
    return t


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SaetuneError(f"top_k must be an integer >= 1, got {top_k!r}.")


def critical_candidates(entropy, token_ids, tokenizer, top_k: int = 20) -> list[int]:
    """The CURE candidate positions of one response, highest entropy first.

    Walks the positions in descending entropy order (stable: equal entropies keep their
    position order) and keeps the first ``top_k`` valid ones, where valid means
    ``position != 0``, ``id not in tokenizer.all_special_ids`` and
    ``len(tokenizer.decode([id]).strip()) > 1``. Each distinct id is decoded once per call.

    Args:
        entropy: [T] per-position entropy of the response (tensor or sequence of floats).
        token_ids: [T] the response's token ids.
        tokenizer: anything with ``all_special_ids`` and ``decode(list[int]) -> str``.
        top_k: how many candidates to keep at most (CURE: 20).

    Returns:
        Up to ``top_k`` distinct response positions (plain ints); empty when none is valid.
    """
    _check_top_k(top_k)
    ent = _as_1d(entropy, "entropy")
    ids = _as_1d(token_ids, "token_ids")
    if ent.shape != ids.shape:
        raise SaetuneError(
            f"entropy and token_ids must have the same length, got shapes {tuple(ent.shape)} "
            f"and {tuple(ids.shape)}."
        )
    if ent.is_floating_point() and bool(torch.isnan(ent).any()):
        # torch sorts NaN first: a NaN would silently become the "most uncertain" token.
        raise SaetuneError(
            f"entropy contains NaN at positions {torch.nonzero(torch.isnan(ent)).flatten().tolist()}; "
            "check the logits that produced it."
        )
    order = torch.sort(ent, descending=True, stable=True).indices.tolist()  # [T]
    id_list = ids.tolist()
    special = set(tokenizer.all_special_ids)
    valid_id: dict[int, bool] = {}  # decode each distinct id once
    out: list[int] = []
    for pos in order:
        if pos == 0:
            continue
        tid = id_list[pos]
        ok = valid_id.get(tid)
        if ok is None:
            ok = tid not in special and len(tokenizer.decode([tid]).strip()) > 1
            valid_id[tid] = ok
        if ok:
            out.append(pos)
            if len(out) == top_k:
                break
    return out


def select_critical_position(
    entropy, token_ids, tokenizer, top_k: int = 20, generator: torch.Generator | None = None
) -> tuple[int, list[int]]:
    """CURE's critical position: one of :func:`critical_candidates`, drawn uniformly.

    The draw is ``torch.randint(len(candidates), (1,), generator=generator)`` (the global
    torch RNG when ``generator`` is None), so a seeded generator reproduces it. With no valid
    position the branch starts at position 0 and the candidate list is empty: ``(0, [])``.

    Returns:
        ``(critical_position, candidates)`` — positions index the response, not prompt + response.
    """
    cands = critical_candidates(entropy, token_ids, tokenizer, top_k=top_k)
    if not cands:
        return 0, []
    i = int(torch.randint(len(cands), (1,), generator=generator).item())
    return cands[i], cands


def critical_trace(
    entropies: Sequence,
    token_ids: Sequence,
    tokenizer,
    top_k: int = 20,
    generator: torch.Generator | None = None,
) -> list[dict[str, int | list[int]]]:
    """Per-response ``critical_candidates`` / ``critical_position`` fields of the trace schema.

    One :func:`select_critical_position` per response, in order, with the same generator
    (so the same seed gives the same positions as selecting one by one). The values are plain
    ints, ready for ``traces/*.jsonl``.
    """
    if len(entropies) != len(token_ids):
        raise SaetuneError(
            f"got {len(entropies)} entropy vectors for {len(token_ids)} responses; "
            "pass one per response."
        )
    out = []
    for ent, ids in zip(entropies, token_ids):
        pos, cands = select_critical_position(ent, ids, tokenizer, top_k=top_k, generator=generator)
        out.append({"critical_candidates": cands, "critical_position": pos})
    return out


def _ids(x, name: str) -> list[int]:
    return [int(i) for i in _as_1d(x, name).tolist()]


def branch_prompt(prompt_ids, response_ids, position: int, max_prompt_len: int) -> tuple[list[int], int]:
    """The branch prompt: prompt + the response tokens before the critical position.

    The critical token itself is not kept — the branch re-samples it. When prompt + prefix is
    longer than ``max_prompt_len`` the first ``max_prompt_len`` tokens are kept (CURE: "keep the
    first prompt-window tokens"), i.e. the prefix is cut from its end.

    Args:
        prompt_ids: [P] the original prompt (must fit the window itself, P <= max_prompt_len).
        response_ids: [T] the original response.
        position: the critical position in the response, 0 <= position < T (0 also for T = 0).
        max_prompt_len: the prompt window.

    Returns:
        ``(new_prompt_ids, prefix_len)`` with ``new_prompt_ids == prompt + response[:prefix_len]``.
    """
    prompt = _ids(prompt_ids, "prompt_ids")
    response = _ids(response_ids, "response_ids")
    if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise SaetuneError(f"max_prompt_len must be an integer >= 1, got {max_prompt_len!r}.")
    if len(prompt) > max_prompt_len:
        raise SaetuneError(
            f"the prompt has {len(prompt)} tokens, more than max_prompt_len={max_prompt_len}; "
            "truncate prompts before the rollout."
        )
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < max(1, len(response)):
        raise SaetuneError(
            f"position must index the response (0 <= position < {max(1, len(response))}), "
            f"got {position!r}."
        )
    prefix_len = min(position, max_prompt_len - len(prompt))
    return prompt + response[:prefix_len], prefix_len


@dataclass(frozen=True)
class CureBranch:
    """One branch continuation: ``source`` indexes its original response; ``prefix_ids`` is
    that response's kept prefix (``original[:prefix_len]`` from :func:`branch_prompt`);
    ``continuation_ids`` is what the policy generated after prompt + prefix."""

    source: int
    prefix_ids: list[int]
    continuation_ids: list[int]


@dataclass
class CureGroup:
    """One CURE GRPO group: ``n1`` originals then ``n1 * n2`` branches (in the order given).

    Per sample ``g`` (all lists have ``n1 + n1 * n2`` entries):
      - ``input_ids[g]``: full sequence, prompt + response (original) or
        prompt + prefix + continuation (branch);
      - ``loss_mask[g]``: 0 on the prompt and on a branch's prefix, 1 on generated tokens;
      - ``context_lens[g]``: number of leading no-gradient tokens (prompt, + prefix);
      - ``reward_ids[g]``: the ids the reward is computed on — the whole response for an
        original, the continuation only for a branch (== ``input_ids[g][context_lens[g]:]``);
      - ``source[g]``: index of the original the sample belongs to (itself for originals);
      - ``is_branch[g]``.
    """

    n1: int
    n2: int
    input_ids: list[list[int]]
    loss_mask: list[list[int]]
    context_lens: list[int]
    reward_ids: list[list[int]]
    source: list[int]
    is_branch: list[bool] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.n1 + self.n1 * self.n2

    def group_advantages(self, rewards, eps: float = 1e-6) -> torch.Tensor:
        """One GRPO advantage per sample over the whole group: (R − mean) / (std + eps),
        std with Bessel's correction, mean and std over all ``n1 + n1·n2`` samples.

        Returns float32 [G] (broadcast it over each sample's ``loss_mask`` tokens)."""
        r = torch.as_tensor(rewards, dtype=torch.float32)
        if r.shape != (self.size,):
            raise SaetuneError(
                f"expected one reward per group sample, shape ({self.size},), got {tuple(r.shape)}."
            )
        return grpo_advantages(r, group_size=self.size, eps=eps, scale_by_std=True)

    def as_tensors(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask``, each long [G, T_max]."""
        t_max = max(len(s) for s in self.input_ids)
        g = len(self.input_ids)
        ids = torch.full((g, t_max), pad_token_id, dtype=torch.long)  # (G, T)
        attn = torch.zeros((g, t_max), dtype=torch.long)  # (G, T)
        mask = torch.zeros((g, t_max), dtype=torch.long)  # (G, T)
        for i, (s, m) in enumerate(zip(self.input_ids, self.loss_mask)):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


def assemble_group(
    prompt_ids, originals: Sequence, branches: Sequence[CureBranch], n1: int = 4, n2: int = 3
) -> CureGroup:
    """Assemble one CURE group from the n1 originals and their n1·n2 branches.

    Checks: ``len(originals) == n1``, ``len(branches) == n1 * n2``, each branch's ``source``
    indexes an original, each original has exactly ``n2`` branches, and each branch's prefix is
    a prefix of its original's response (the re-sampled critical token is not part of it).
    """
    for name, v in (("n1", n1), ("n2", n2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SaetuneError(f"{name} must be an integer >= 1, got {v!r}.")
    prompt = _ids(prompt_ids, "prompt_ids")
    origs = [_ids(o, f"originals[{i}]") for i, o in enumerate(originals)]
    if len(origs) != n1:
        raise SaetuneError(f"expected n1={n1} original responses, got {len(origs)}.")
    if len(branches) != n1 * n2:
        raise SaetuneError(
            f"expected n1*n2={n1 * n2} branches ({n2} per original), got {len(branches)}."
        )
    counts = [0] * n1
    for j, b in enumerate(branches):
        if isinstance(b.source, bool) or not isinstance(b.source, int) or not 0 <= b.source < n1:
            raise SaetuneError(
                f"branches[{j}].source must index an original (0 <= source < {n1}), got {b.source!r}."
            )
        counts[b.source] += 1
        prefix = _ids(b.prefix_ids, f"branches[{j}].prefix_ids")
        orig = origs[b.source]
        if prefix != orig[: len(prefix)] or (orig and len(prefix) >= len(orig)):
            raise SaetuneError(
                f"branches[{j}].prefix_ids ({len(prefix)} tokens) is not a prefix of original "
                f"{b.source} ({len(orig)} tokens) that stops before a critical token."
            )
    if any(c != n2 for c in counts):
        raise SaetuneError(f"each original needs exactly n2={n2} branches; counts per original: {counts}.")

    input_ids, loss_mask, context_lens, reward_ids, source, is_branch = [], [], [], [], [], []
    for i, o in enumerate(origs):
        input_ids.append(prompt + o)
        loss_mask.append([0] * len(prompt) + [1] * len(o))
        context_lens.append(len(prompt))
        reward_ids.append(list(o))
        source.append(i)
        is_branch.append(False)
    for b in branches:
        prefix = _ids(b.prefix_ids, "prefix_ids")
        cont = _ids(b.continuation_ids, "continuation_ids")
        ctx = prompt + prefix
        input_ids.append(ctx + cont)
        loss_mask.append([0] * len(ctx) + [1] * len(cont))
        context_lens.append(len(ctx))
        reward_ids.append(cont)
        source.append(b.source)
        is_branch.append(True)
    return CureGroup(n1, n2, input_ids, loss_mask, context_lens, reward_ids, source, is_branch)
