"""Rollouts: batched sampling with HF ``generate``, then per-token log-probs and entropies.

:func:`sample` turns prompts (token ids) into responses::

    ro = sample(model, tokenizer, prompt_ids, SampleParams(temperature=1.0, max_new_tokens=64), seed=3)
    ro.response_ids[i], ro.logprobs[i], ro.entropies[i], ro.tool_calls[i]

- Prompts are left-padded for ``generate`` (HF derives position ids from the attention mask).
- A response is cut after its first stop token (kept, EOS too: stopping is an action the policy
  takes and gets gradient for) or its first stop string (cut after the token that completes it).
- ``max_new_tokens`` caps the response, and prompt + response never exceeds ``max_total_tokens``.
- With a tool (:class:`saetune.rl.tools.Calculator`), a response that ends in a call is
  answered — the answer's tokens are appended with ``policy_mask`` 0 — and generation resumes,
  up to ``max_tool_calls`` calls per response.
- Log-probs and entropies are then computed in one teacher-forced pass over prompt + response
  (:func:`score`), at ``temperature``, from the final hidden states through the fused
  ``saetune.kernels.linear_entropy_logprob`` (logits are never materialised; Triton on CUDA,
  its torch path elsewhere), or from explicit logits with ``saetune.rl.entropy.token_entropy``
  when the model has no plain Linear LM head.

Random draws come from ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's random
state is untouched and the same seed gives the same samples (same hardware, same threads).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import Tensor

from saetune.errors import SaetuneError
from saetune.generation import SamplingParams, collect_stop_ids, hf_generate, pad_token_id
from saetune.rl.entropy import token_entropy

__all__ = ["Rollout", "SampleParams", "cut_at_stop", "fused_kernel", "sample", "score"]


@dataclass(frozen=True)
class SampleParams(SamplingParams):
    """RL's sampling settings: :class:`saetune.generation.SamplingParams` with RL's defaults (temperature 1, top_p
    1, 256 new tokens) plus stop strings and the tool-call limit. ``temperature == 0`` is greedy (log-probs are
    then taken at temperature 1); ``stop_token_ids`` come besides the tokenizer's EOS; ``max_total_tokens`` caps
    prompt + response (0: the model's max positions)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    max_tool_calls: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()  # temperature, top_p, max_new_tokens, max_total_tokens
        if self.max_tool_calls < 0:
            raise SaetuneError(f"max_tool_calls={self.max_tool_calls!r}; it must be 0 or more")
        if any(not s for s in self.stop_strings):
            raise SaetuneError("stop_strings may not contain an empty string")


@dataclass
class Rollout:
    """Sampled responses; index ``i`` is the i-th prompt given to :func:`sample`.

    ``response_ids[i]`` holds every response token (tool answers included); ``policy_mask[i]``
    is 1 where the policy produced the token and 0 where a tool inserted it; ``logprobs[i]`` and
    ``entropies[i]`` are float32 [T_i] over the response (also computed at tool tokens, which the
    loss masks out); ``truncated[i]`` is True when the response hit the length cap.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    policy_mask: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    tool_calls: list[int]
    logprobs: list[Tensor] = field(default_factory=list)
    entropies: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


# ------------------------------------------------------------------------------------------ stops
def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int], stop_strings: Sequence[str],
                decode) -> tuple[list[int], bool]:
    """``(kept ids, stopped)``: ``ids`` up to and including the first stop token or the token that
    completes the first stop string (``decode(list[int]) -> str``), whichever comes first."""
    stops = set(int(s) for s in stop_ids)
    width = max((len(s) for s in stop_strings), default=0) + 2  # tokens enough to hold any stop string
    for j, t in enumerate(ids):
        if t in stops:
            return list(ids[:j + 1]), True
        if stop_strings:
            tail = decode(list(ids[max(0, j + 1 - width):j + 1]))
            if any(s in tail for s in stop_strings):
                return list(ids[:j + 1]), True
    return list(ids), False


class _StopStrings:
    """A ``StoppingCriteria`` flagging rows whose newest tokens complete a stop string."""

    def __init__(self, stop_strings: Sequence[str], decode, start: int):
        self.stop_strings, self.decode, self.start = tuple(stop_strings), decode, start
        self.width = max(len(s) for s in stop_strings) + 2

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.start:]
        for r in range(new.shape[0]):
            tail = self.decode(new[r, -self.width:].tolist())
            done[r] = any(s in tail for s in self.stop_strings)
        return done


# ------------------------------------------------------------------------------------------ scoring
def fused_kernel():
    """``saetune.kernels.linear_entropy_logprob``, the fused entropy/log-prob of :func:`score`.

    It imports without triton (its torch path then runs; where CUDA tensors meet a missing triton,
    ``saetune.kernels.dispatch`` says so once), so there is nothing to fall back from here: an
    import error is a broken install or checkout, and propagates.
    """
    from saetune.kernels import linear_entropy_logprob
    return linear_entropy_logprob


def _backbone_and_head(model):
    """``(decoder backbone, lm head Linear)`` of a causal LM (through a peft wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "model", None)
    if not isinstance(head, torch.nn.Linear) or backbone is None or not isinstance(backbone, torch.nn.Module):
        return None
    if getattr(getattr(base, "config", None), "final_logit_softcapping", None):
        return None  # logits are transformed after the head: use the model's own logits
    return backbone, head


def score(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, temperature: float = 1.0,
          use_kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of the next token and entropy of the next-token distribution.

    Args:
        input_ids, attention_mask: long [B, T], **right-padded** (position ids follow the row).
        target_mask: [B, T] bool/0-1, True at positions t ≥ 1 whose token is scored (response
            tokens); position t's values come from the logits at t − 1.
        temperature: the sampling temperature (z = logits / temperature).
        use_kernel: True forces the fused kernel, False explicit logits, None picks the kernel
            when the model exposes a Linear LM head.

    Returns:
        ``(logprobs, entropies)`` float32 [B, T], 0 where ``target_mask`` is False. Differentiable
        (call under ``torch.no_grad()`` for rollouts).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or target_mask.shape != input_ids.shape:
        raise SaetuneError(f"input_ids, attention_mask and target_mask must share one [B, T] shape; got "
                           f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(target_mask.shape)}")
    temperature = 1.0 if temperature == 0 else float(temperature)
    B, T = input_ids.shape
    tmask = target_mask.bool().clone()
    tmask[:, 0] = False  # the first token has no prediction
    sel = tmask[:, 1:]  # (B, T-1): predict token t+1 from position t
    targets = input_ids[:, 1:][sel]  # (N,)
    lp_full = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    ent_full = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    if targets.numel() == 0:
        return lp_full, ent_full
    parts = _backbone_and_head(model) if use_kernel is not False else None
    if use_kernel and parts is None:
        raise SaetuneError(f"use_kernel=True but {type(model).__name__} has no Linear LM head after a decoder "
                           "backbone (or it soft-caps its logits); pass use_kernel=None or False")
    if parts is not None:
        kernel = fused_kernel()
        backbone, head = parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        h = hidden[:, :-1][sel]  # (N, D)
        ent, lp = kernel(h, head.weight, targets, bias=head.bias, temperature=temperature)  # (N,), (N,)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        z = logits[:, :-1][sel].float() / temperature  # (N, V)
        ent = token_entropy(z)
        lp = torch.log_softmax(z, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return lp_full.masked_scatter(tmask, lp.float()), ent_full.masked_scatter(tmask, ent.float())


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, attention)`` long [B, T_max], rows at the left, ``pad_id`` after them."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            attn[i, :len(r)] = 1
    return ids, attn


@torch.no_grad()
def score_responses(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                    temperature: float, batch_size: int = 64) -> tuple[list[Tensor], list[Tensor]]:
    """Per-response log-probs and entropies (float32 [T_i] each), ``batch_size`` rows per forward."""
    device = next(model.parameters()).device
    lps, ents = [], []
    for a in range(0, len(prompt_ids), batch_size):
        ps, rs = prompt_ids[a:a + batch_size], response_ids[a:a + batch_size]
        ids, attn = right_pad([list(p) + list(r) for p, r in zip(ps, rs)], pad_id)
        tm = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(ps, rs)):
            tm[i, len(p):len(p) + len(r)] = True
        lp, ent = score(model, ids.to(device), attn.to(device), tm.to(device), temperature)
        for i, (p, r) in enumerate(zip(ps, rs)):
            lps.append(lp[i, len(p):len(p) + len(r)].cpu())
            ents.append(ent[i, len(p):len(p) + len(r)].cpu())
    return lps, ents


# ------------------------------------------------------------------------------------------ sampling
def _generate(model, rows: list[list[int]], params: SampleParams, pad_id: int, stop_ids: list[int],
              max_new: list[int], decode, seed: int) -> list[list[int]]:
    """One ``generate`` call over left-padded ``rows`` (:func:`saetune.generation.hf_generate`, stop strings
    checked as it goes); returns the raw new tokens of each row, at most its ``max_new``."""
    from transformers import StoppingCriteriaList

    width = max(len(r) for r in rows)
    criteria = StoppingCriteriaList([_StopStrings(params.stop_strings, decode, width)]) if params.stop_strings else None
    new = hf_generate(model, rows, params, pad_id, stop_ids, seed, max_new_tokens=max(max_new),
                      stopping_criteria=criteria)  # (B, new)
    return [row[:m] for row, m in zip(new, max_new)]


def _stop_ids(model, tokenizer, params: SampleParams) -> list[int]:
    """Token ids that end a response: the model's generation EOS, the tokenizer's, then ``params.stop_token_ids``
    (first occurrence order, no repeats; :func:`saetune.generation.collect_stop_ids`)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return collect_stop_ids(tokenizer, gen_eos, params.stop_token_ids)


class _Sampler:
    """One :func:`sample` call: its fixed settings and, per prompt, the response so far (``responses``,
    ``pmask``, ``calls``, ``truncated``). A round generates for the active rows; a row whose response ends in a tool
    call gets the tool's answer and goes on in the next round."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], params: SampleParams, tool):
        self.model, self.tokenizer, self.prompts, self.params, self.tool = model, tokenizer, prompts, params, tool
        self.pad_id = pad_token_id(tokenizer, model)
        self.stop_ids = _stop_ids(model, tokenizer, params)
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.limit = params.max_total_tokens or max_positions
        self.stop_strings = tuple(params.stop_strings) + ((tool.stop_string(),) if tool is not None else ())
        self.run_params = replace(params, stop_strings=self.stop_strings)  # the tool's stop string added
        n = len(prompts)
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.pmask: list[list[int]] = [[] for _ in range(n)]
        self.calls = [0] * n
        self.truncated = [False] * n

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _room(self, chunk: list[int], rows: list[list[int]]) -> list[int]:
        """New tokens each row of ``chunk`` may still take (length cap and context cap); a first-round prompt
        that leaves none is an error."""
        room = [self.params.max_new_tokens - len(self.responses[i]) for i in chunk]
        if self.limit:
            room = [min(r, int(self.limit) - len(row)) for r, row in zip(room, rows)]
        if any(r < 1 for r in room) and not any(self.responses[i] for i in chunk):
            raise SaetuneError(f"a prompt of {max(len(r) for r in rows)} tokens leaves {min(room)} tokens of room in "
                               f"a context of {self.limit}; shorten prompts or raise context_size")
        return room

    def generate_chunk(self, chunk: list[int], seed: int) -> list[int]:
        """Generate for the rows of ``chunk`` (indices into the prompts) at ``seed``; the rows that go on."""
        rows = [self.prompts[i] + self.responses[i] for i in chunk]
        room = self._room(chunk, rows)
        go = [k for k, r in enumerate(room) if r >= 1]
        for k, r in enumerate(room):
            if r < 1:
                self.truncated[chunk[k]] = True
        if not go:
            return []
        new_rows = _generate(self.model, [rows[k] for k in go], self.run_params, self.pad_id, self.stop_ids,
                             [room[k] for k in go], self.decode, seed)
        return [chunk[k] for k, new in zip(go, new_rows) if self.take(chunk[k], new)]

    def take(self, i: int, new: list[int]) -> bool:
        """Append row ``i``'s new tokens up to its first stop; answer a pending tool call. Whether it goes on."""
        kept, stopped = cut_at_stop(new, self.stop_ids, self.stop_strings, self.decode)
        self.responses[i] += kept
        self.pmask[i] += [1] * len(kept)
        expr = self.tool.pending_call(self.decode(self.responses[i])) if (self.tool is not None and stopped) else None
        if expr is not None and self.calls[i] < self.params.max_tool_calls and (kept and kept[-1] not in self.stop_ids):
            self.calls[i] += 1
            ans = self.tokenizer(self.tool.answer(expr), add_special_tokens=False)["input_ids"]
            self.responses[i] += ans
            self.pmask[i] += [0] * len(ans)
            room_left = not self.limit or len(self.prompts[i]) + len(self.responses[i]) < self.limit
            if len(self.responses[i]) < self.params.max_new_tokens and room_left:
                return True
            self.truncated[i] = True
        elif not stopped:
            self.truncated[i] = True
        return False

    def texts(self) -> list[str]:
        """Each response decoded without EOS and padding (other special tokens kept)."""
        skip = {i for i in (self.tokenizer.eos_token_id, self.pad_id) if i is not None}
        return [self.decode([t for t in r if t not in skip]) for r in self.responses]


def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], params: SampleParams, seed: int,
           tool=None, batch_size: int = 256, compute_scores: bool = True) -> Rollout:
    """Sample one response per prompt (repeat a prompt for a group), then score it (module docs).

    ``tool``: an object with ``stop_string()``, ``pending_call(text) -> str | None`` and
    ``answer(expr) -> str`` (e.g. :class:`saetune.rl.tools.Calculator`), or None. Round ``r``'s chunk starting
    at active row ``a`` samples with seed ``seed + 7919·r + a``.
    """
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts:
        return Rollout([], [], [], [], [], [])
    smp = _Sampler(model, tokenizer, prompts, params, tool)
    active = list(range(len(prompts)))
    round_ = 0
    while active:
        nxt = []
        for a in range(0, len(active), batch_size):
            nxt += smp.generate_chunk(active[a:a + batch_size], seed + 7919 * round_ + a)
        active = nxt
        round_ += 1
    ro = Rollout(prompts, smp.responses, smp.pmask, smp.texts(), smp.truncated, smp.calls)
    if compute_scores:
        ro.logprobs, ro.entropies = score_responses(model, prompts, smp.responses, smp.pad_id, params.temperature)
    return ro
