"""Steer and read SAE latents at every token a model generates, with the KV cache on.

An edit moves chosen SAE latents in the activation at one hook point (Templeton et al. 2024,
"Scaling Monosemanticity", feature clamping; Galichin et al. 2025, arXiv:2503.18878, steering
reasoning features of DeepSeek-R1 distills)::

    clamp f to v:  x ← x + (v − a_f(x)) · W_dec[f]        a = sae.encode(x), the current activation
    add α of f:    x ← x + α · W_dec[f]

Several edits add up: x + Σ_clamp (v_f − a_f)·W_dec[f] + Σ_add α_f·W_dec[f]. The SAE's
reconstruction error is kept (only the chosen latents' contributions move).

With HF ``model.generate`` and the KV cache on, the first forward sees the whole prompt and
each later forward only the new token, so a hook cannot know where it is from the tensor
alone. :func:`intervene` therefore reads, before every forward of the model, the cache length
(= the absolute position of the first new token) and the new token ids, and decides from the
ids so far which positions a :class:`Schedule` covers. Positions are counted per row of the
batch from the first token the model saw (left padding included; padding is never edited).

Schedule semantics ("step" s = the forward that samples generated token s): the position that
produces generated token s is ``P − 1 + s`` (P = prompt length), so step 0 is the prompt's last
position. A schedule covers position p when

    (s ≥ 0 and start ≤ s < start + length)  or  (s < 0 and prompt)          s = p − P + 1
    and, with ``think_only``, the last think tag in ids[:p + 1] is ``<think>``

(so inside = from the ``<think>`` token's position up to the position before ``</think>``: the
positions whose outputs produce the thinking, ``</think>`` included). Everything is decided
from ids already known when that position is computed, as it must be while generating.

Every position the model computes is also recorded: the top-k latents of ``sae.encode`` of the
activation as the model computed it there (before this position's own edit).

HF only. vLLM has no supported way to edit a layer's hidden state per token: its documented
extension point for steering generation is the custom logits processor (logits only), and a
PyTorch hook on its compiled, CUDA-graphed model in the engine's worker process would see a flat
batch of tokens without request or position (vllm-project/vllm#16585: "not really possible
yet"). ``VLLMBackend(steering=...)`` therefore refuses with :data:`VLLM_STEERING_REFUSAL`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from .errors import SaetuneError
from .generation import collect_stop_ids, left_pad, pad_token_id

MODES = ("record", "replace", "steer")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

VLLM_STEERING_REFUSAL = (
    "steering SAE latents is not possible with backend 'vllm': vLLM exposes no supported hook that edits a "
    "layer's hidden state per token (its extension points act on logits), so use backend 'hf' "
    "(saetune.steering.generate) for steered generation")


# ---- edits: the maths ------------------------------------------------------------------------

@dataclass(frozen=True)
class LatentEdit:
    """One latent's edit: ``clamp`` sets its activation to ``value``; ``add`` adds ``value`` · W_dec[latent]."""

    latent: int
    value: float
    mode: Literal["clamp", "add"] = "clamp"

    def __post_init__(self):
        if self.mode not in ("clamp", "add"):
            raise SaetuneError(f"unknown latent edit mode {self.mode!r}; valid: clamp, add")
        if not isinstance(self.latent, int) or self.latent < 0:
            raise SaetuneError(f"a latent index must be a non-negative integer, got {self.latent!r}")


def clamp(latent: int, value: float) -> LatentEdit:
    """Clamp ``latent`` to ``value`` (0 ablates it)."""
    return LatentEdit(int(latent), float(value), "clamp")


def add(latent: int, alpha: float) -> LatentEdit:
    """Add ``alpha`` · W_dec[latent] to the activation."""
    return LatentEdit(int(latent), float(alpha), "add")


def as_edits(edits: Any, d_sae: int | None = None) -> tuple[LatentEdit, ...]:
    """``None``, ``{latent: value}`` (clamps) or an iterable of :class:`LatentEdit` → a checked tuple.

    A latent edited twice is refused (the order would matter); with ``d_sae`` every latent must be in range.
    """
    if edits is None:
        out: tuple[LatentEdit, ...] = ()
    elif isinstance(edits, dict):
        out = tuple(clamp(f, v) for f, v in edits.items())
    elif isinstance(edits, LatentEdit):
        out = (edits,)
    else:
        out = tuple(edits)
        bad = [e for e in out if not isinstance(e, LatentEdit)]
        if bad:
            raise SaetuneError(f"edits must be LatentEdit values (saetune.steering.clamp / add) or a "
                               f"{{latent: value}} dict of clamps; got {bad[0]!r}")
    seen: set[int] = set()
    for e in out:
        if e.latent in seen:
            raise SaetuneError(f"latent {e.latent} is edited twice; give each latent one clamp or one add")
        seen.add(e.latent)
        if d_sae is not None and not 0 <= e.latent < d_sae:
            raise SaetuneError(f"steer feature {e.latent} is out of range for an SAE with {d_sae} latents "
                               f"(0…{d_sae - 1})")
    return out


def edit_delta(acts: torch.Tensor, W_dec: torch.Tensor, edits: Sequence[LatentEdit]) -> torch.Tensor:
    """Σ_clamp (v_f − a_f)·W_dec[f] + Σ_add α_f·W_dec[f] for activations ``acts`` [..., d_sae] → [..., d_in].

    ``a_f`` is the latent's current activation (``acts[..., f]``); v_f the clamp value; α_f the added amount.
    """
    if not edits:
        return torch.zeros(*acts.shape[:-1], W_dec.shape[1], dtype=W_dec.dtype, device=acts.device)
    idx = torch.tensor([e.latent for e in edits], device=acts.device)
    value = torch.tensor([e.value for e in edits], device=acts.device, dtype=acts.dtype)
    is_clamp = torch.tensor([e.mode == "clamp" for e in edits], device=acts.device)
    coef = torch.where(is_clamp, value - acts[..., idx], value.expand_as(acts[..., idx]))  # (..., F)
    return coef.to(W_dec.dtype) @ W_dec[idx]  # (..., d_in)


def steer_activation(x: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor, clamp: dict[int, float],
                     add: dict[int, float] | None = None) -> torch.Tensor:
    """x + Σ_f (v_f − a_f(x)) · W_dec[f] (+ Σ_g α_g · W_dec[g] for ``add``): each clamped feature's contribution
    moved to the value v_f, each added feature's direction added α times."""
    edits = as_edits([LatentEdit(int(f), float(v), "clamp") for f, v in (clamp or {}).items()]
                     + [LatentEdit(int(f), float(a), "add") for f, a in (add or {}).items()])
    if not edits:
        return x
    return x + edit_delta(acts, W_dec, edits).to(x.dtype)


def parse_steer(items: list[str]) -> dict[int, float]:
    """``["12=4.0", "7=0"]`` → {12: 4.0, 7: 0.0}; a malformed item is named."""
    out = {}
    for it in items:
        m = re.fullmatch(r"\s*(\d+)\s*=\s*([-+0-9.eE]+)\s*", it)
        if not m:
            raise SaetuneError(f"steer item {it!r} is not FEATURE=VALUE (e.g. 123=4.5)")
        try:
            out[int(m.group(1))] = float(m.group(2))
        except ValueError:
            raise SaetuneError(f"steer item {it!r} is not FEATURE=VALUE (e.g. 123=4.5)") from None
    return out


def edits_from_items(clamps: list[str], adds: list[str]) -> list[LatentEdit]:
    """``FEATURE=VALUE`` clamp items and ``FEATURE=ALPHA`` add items (:func:`parse_steer`) as edits, clamps first.

    ``edits_from_items(["12=0"], ["7=4"])`` → ``[clamp(12, 0.0), add(7, 4.0)]``.
    """
    return ([clamp(f, v) for f, v in parse_steer(clamps).items()]
            + [add(f, a) for f, a in parse_steer(adds).items()])


# ---- schedules ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Which positions an edit applies to (see the module docstring for the exact rule).

    ``Schedule()`` is *always*: every position, the prompt's included (what ``saetune attach`` does).
    """

    start: int = 0  # first generation step edited (step s produces generated token s)
    length: int | None = None  # steps edited from ``start`` (None: to the end)
    think_only: bool = False  # only positions inside <think> … </think>
    prompt: bool = True  # also the prompt positions before its last one (step < 0)

    def __post_init__(self):
        if not isinstance(self.start, int) or self.start < 0:
            raise SaetuneError(f"schedule start must be a generation step ≥ 0, got {self.start!r}")
        if self.length is not None and (not isinstance(self.length, int) or self.length < 1):
            raise SaetuneError(f"schedule length must be None (to the end) or ≥ 1 tokens, got {self.length!r}")

    @classmethod
    def always(cls) -> "Schedule":
        return cls()

    @classmethod
    def from_token(cls, start: int) -> "Schedule":
        """Generated tokens ``start``, ``start + 1``, … are produced under the edit (the prompt is not edited)."""
        return cls(start=start, prompt=False)

    @classmethod
    def tokens(cls, n: int, start: int = 0) -> "Schedule":
        """``n`` generated tokens from ``start`` are produced under the edit."""
        return cls(start=start, length=n, prompt=False)

    @classmethod
    def think(cls) -> "Schedule":
        """While the model thinks: positions inside <think> … </think> from the prompt's last position on."""
        return cls(think_only=True, prompt=False)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """``always`` | ``think`` | ``from:N`` | ``tokens:N`` | ``tokens:N@S``, joined with ``+``
        (e.g. ``think+tokens:200``; ``always+think``: inside think, the prompt's positions included); the CLI's
        spelling."""
        text = (text or "always").strip()
        kw: dict[str, Any] = {"prompt": False}
        for part in text.split("+"):
            part = part.strip()
            if part == "always":  # the prompt's positions too
                kw["prompt"] = True
            elif part == "think":
                kw["think_only"] = True
            elif m := re.fullmatch(r"from:(\d+)", part):
                kw["start"] = int(m.group(1))
            elif m := re.fullmatch(r"tokens:(\d+)(?:@(\d+))?", part):
                kw["length"] = int(m.group(1))
                if m.group(2) is not None:
                    kw["start"] = int(m.group(2))
            else:
                raise SaetuneError(f"schedule part {part!r} in {text!r} is not one of: always, think, from:N, "
                                   "tokens:N, tokens:N@START (join several with '+', e.g. think+tokens:200)")
        return cls(**kw)

    def covers(self, step: int, inside_think: bool) -> bool:
        """Whether the position of generation step ``step`` (< 0: an earlier prompt position) is edited."""
        if self.think_only and not inside_think:
            return False
        if step < 0:
            return self.prompt
        return step >= self.start and (self.length is None or step < self.start + self.length)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "think_only": self.think_only, "prompt": self.prompt}


@dataclass
class ThinkState:
    """Whether the ids read so far leave us inside <think> … </think> (tags as id sequences, one row)."""

    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    inside: bool = False
    tail: list[int] = field(default_factory=list)

    def feed(self, ids: Iterable[int]) -> list[bool]:
        """For each id in order: inside after reading it (a tag counts once its last id is read)."""
        keep = max(len(self.open_ids), len(self.close_ids))
        flags = []
        for t in ids:
            self.tail.append(int(t))
            del self.tail[:-keep]
            if tuple(self.tail[-len(self.close_ids):]) == self.close_ids:
                self.inside = False
            elif tuple(self.tail[-len(self.open_ids):]) == self.open_ids:
                self.inside = True
            flags.append(self.inside)
        return flags


def think_tag_ids(tokenizer, open_tag: str = THINK_OPEN,
                  close_tag: str = THINK_CLOSE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids of the think tags in ``tokenizer`` (one id each in R1 distills and the toy)."""
    out = []
    for tag in (open_tag, close_tag):
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if not ids:
            raise SaetuneError(f"the tokenizer encodes the think tag {tag!r} to no tokens; pass think_tags=(open_ids, "
                               "close_ids) explicitly")
        out.append(tuple(int(i) for i in ids))
    return out[0], out[1]


def scheduled_positions(schedule: Schedule, ids: Sequence[int], prompt_len: int,
                        think_tags: tuple[Sequence[int], Sequence[int]] | None = None) -> list[bool]:
    """For each position of one row's ``ids`` (prompt then response): is it edited? The reference rule,
    computed at once over the whole sequence (generation computes the same thing a step at a time)."""
    inside = _think_state(schedule, think_tags).feed(ids) if schedule.think_only else [False] * len(ids)
    return [schedule.covers(p - prompt_len + 1, inside[p]) for p in range(len(ids))]


def _think_state(schedule: Schedule, think_tags) -> ThinkState:
    if think_tags is None:
        raise SaetuneError("a think-only schedule needs the think tags' ids (think_tags=(open_ids, close_ids), "
                           "or pass the tokenizer to saetune.steering.generate)")
    return ThinkState(tuple(think_tags[0]), tuple(think_tags[1]))


# ---- what was seen -----------------------------------------------------------------------------

@dataclass
class SAERecorder:
    """What :func:`intervene` saw: per forward call, the top-k latents (…, T, k) of each position.

    ``offsets[i]`` is the absolute position of call i's first position (None where unknown),
    ``steered[i]`` which of its positions were edited [B, T]; ``dense`` holds the full activations
    when ``keep_acts`` was asked for.
    """

    top_k: int
    values: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int | None] = field(default_factory=list)
    steered: list[torch.Tensor] = field(default_factory=list)
    dense: list[torch.Tensor] = field(default_factory=list)
    keep_acts: bool = False

    def add(self, acts: torch.Tensor, offset: int | None = None, steered: torch.Tensor | None = None) -> None:
        v, i = acts.topk(min(self.top_k, acts.shape[-1]), dim=-1)
        self.values.append(v.detach().float().cpu())
        self.indices.append(i.detach().cpu())
        self.offsets.append(offset)
        self.steered.append(steered.detach().cpu() if steered is not None
                            else torch.zeros(acts.shape[:-1], dtype=torch.bool))
        if self.keep_acts:
            self.dense.append(acts.detach().float().cpu())

    def per_position(self, row: int = 0) -> list[list[tuple[int, float]]]:
        """For one batch row, the recorded positions in order, each as [(feature, activation), …] (active only)."""
        out = []
        for v, i in zip(self.values, self.indices):
            v2, i2 = v.reshape(-1, *v.shape[-2:])[row], i.reshape(-1, *i.shape[-2:])[row]
            for t in range(v2.shape[0]):
                out.append([(int(a), round(float(b), 4)) for a, b in zip(i2[t], v2[t]) if b > 0])
        return out

    def by_position(self, row: int = 0) -> dict[int, list[tuple[int, float]]]:
        """Absolute position → [(latent, activation), …] of its top-k (active only, largest first); a position
        computed twice keeps its last reading."""
        out: dict[int, list[tuple[int, float]]] = {}
        for v, i, off in zip(self.values, self.indices, self.offsets):
            if off is None:
                raise SaetuneError("positions are unknown for a forward call that bypassed the model's own forward; "
                                   "use per_position() or call the model passed to intervene()")
            v2, i2 = v.reshape(-1, *v.shape[-2:])[row], i.reshape(-1, *i.shape[-2:])[row]
            for t in range(v2.shape[0]):
                out[off + t] = [(int(a), float(b)) for a, b in zip(i2[t], v2[t]) if b > 0]
        return out

    def steered_positions(self, row: int = 0) -> list[int]:
        """Absolute positions of ``row`` that were edited, ascending."""
        out = set()
        for s, off in zip(self.steered, self.offsets):
            s2 = s.reshape(-1, s.shape[-1])[row]
            out.update(int(off or 0) + int(t) for t in s2.nonzero().flatten())
        return sorted(out)

    def acts(self, row: int = 0) -> torch.Tensor:
        """All recorded dense activations of ``row`` in call order, [T_total, d_sae] (needs ``keep_acts``)."""
        if not self.keep_acts:
            raise SaetuneError("dense activations were not kept; pass keep_acts=True to intervene()")
        return torch.cat([d.reshape(-1, *d.shape[-2:])[row] for d in self.dense], dim=0)


# ---- the hook ----------------------------------------------------------------------------------

def _cache_offset(kwargs: dict[str, Any]) -> int:
    """Absolute position of a forward's first token: the cache length before it (0 without a cache)."""
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    for key in ("past_key_values", "cache"):
        c = kwargs.get(key)
        if c is None:
            continue
        if hasattr(c, "get_seq_length"):
            return int(c.get_seq_length())
        if isinstance(c, (tuple, list)) and c and c[0] is not None:  # legacy ((k, v), …): k is [B, H, T, d]
            return int(c[0][0].shape[-2])
    return 0


class _Intervention:
    """State of one :func:`intervene` block: the positions seen, the think state, the current call's mask."""

    def __init__(self, sae, edits: tuple[LatentEdit, ...], schedule: Schedule, mode: str, think_tags, top_k: int,
                 keep_acts: bool, prompt_len: int | None):
        self.sae, self.edits, self.schedule, self.mode = sae, edits, schedule, mode
        self.think_tags = think_tags
        self.rec = SAERecorder(top_k, keep_acts=keep_acts)
        self.dtype = next(sae.parameters()).dtype
        self.needs_positions = schedule != Schedule()
        self.seen: int | None = None  # positions fed as input_ids so far (None: the prompt came as embeddings)
        self.pad: list[int] = []
        self.think: list[ThinkState] = []
        self.given_prompt_len = prompt_len
        self.prompt_len: int | None = None
        self.pending: tuple[int, torch.Tensor] | None = None  # (offset, mask [B, T]) for the next hook call

    # before every forward of the model
    def pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            self.pending = None
            return None
        B, T = (ids.shape if ids is not None else embeds.shape[:2])
        offset = _cache_offset(kwargs)
        if offset == 0:
            self.prompt_len = T if self.given_prompt_len is None else self.given_prompt_len
            self.seen = 0 if ids is not None else None
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (B, T):
                self.pad = [int((m.cumsum(0) == 0).sum()) for m in mask]  # leading zeros: left padding
            else:
                self.pad = [0] * B
            if self.schedule.think_only:
                self.think = [_think_state(self.schedule, self.think_tags) for _ in range(B)]
        elif self.needs_positions and (self.seen is None or self.prompt_len is None or self.seen != offset):
            seen = "no prompt" if self.seen is None else f"{self.seen} positions"
            raise SaetuneError(f"the model was called at position {offset} after {seen} were seen; steering on a "
                               "schedule needs the prompt and then each decoding step in order, all inside one "
                               "intervene() block (beam search and assisted decoding are not supported)")
        if ids is not None and self.seen is not None:
            self.seen += T
        mask = torch.ones(B, T, dtype=torch.bool)
        if self.needs_positions:
            if self.schedule.think_only and ids is None:
                raise SaetuneError("a think-only schedule reads the generated token ids; call the model with "
                                   "input_ids, not inputs_embeds")
            P = self.prompt_len
            rows = ids.tolist() if self.schedule.think_only else None  # one host copy per forward
            for r in range(B):
                inside = self.think[r].feed(rows[r]) if self.schedule.think_only else [False] * T
                for t in range(T):
                    mask[r, t] = self.schedule.covers(offset + t - P + 1, inside[t])
        for r in range(B):  # padding is never edited
            lead = self.pad[r] - offset if r < len(self.pad) else 0
            if lead > 0:
                mask[r, :lead] = False
        self.pending = (offset, mask)
        return None

    # at the hook point
    def at_hook(self, x: torch.Tensor) -> torch.Tensor | None:
        pending, self.pending = self.pending, None
        if pending is None or pending[1].shape != x.shape[:2]:
            if self.needs_positions:
                raise SaetuneError("the SAE hook ran in a forward call that did not go through the model passed to "
                                   "intervene(), so its positions are unknown; pass the model whose forward (or "
                                   "generate) you call")
            offset, mask = None, torch.ones(x.shape[:2], dtype=torch.bool)
        else:
            offset, mask = pending
        edited = bool(mask.any())  # on the host mask, before it moves to x's device
        mask = mask.to(x.device)
        with torch.no_grad():  # the SAE is read, never trained, here
            acts = self.sae.encode(x.to(self.dtype))  # (B, T, d_sae)
            self.rec.add(acts, offset, mask if self.mode != "record" else torch.zeros_like(mask))
            if self.mode == "record" or not edited:
                return None
            if self.mode == "replace":
                new = self.sae.decode(acts).to(x.dtype)  # (B, T, d)
            else:
                delta = edit_delta(acts, self.sae.W_dec, self.edits).to(x.dtype) * mask[..., None].to(x.dtype)
        # outside no_grad: gradients still flow through x (the edit itself is a constant)
        return torch.where(mask[..., None], new, x) if self.mode == "replace" else x + delta


@contextlib.contextmanager
def intervene(model: nn.Module, sae, hook: str | None = None, edits: Any = None, schedule: Schedule | None = None,
              mode: str = "steer", top_k: int = 8, think_tags: tuple[Sequence[int], Sequence[int]] | None = None,
              keep_acts: bool = False, prompt_len: int | None = None) -> Iterator[SAERecorder]:
    """Hook ``sae`` into ``model`` at ``hook`` (default: the SAE's own hook name) for the block.

    ``record``: the activation passes unchanged; ``replace``: it becomes x̂ = SAE(x) at the scheduled
    positions; ``steer``: x + Σ edits (module docstring) at the scheduled positions. Every position is
    recorded in the yielded :class:`SAERecorder`. Works with ``model.generate`` and the KV cache.

    The prompt length P is the length of the first forward call (position 0); pass ``prompt_len`` when one
    forward holds prompt and response together (re-reading a finished generation without the cache).
    """
    from .models import model_width, replace_activation, resolve_hook
    if mode not in MODES:
        raise SaetuneError(f"unknown SAE attach mode {mode!r}; valid: {', '.join(MODES)}")
    edits = as_edits(edits, sae.d_sae)
    if mode == "steer" and not edits:
        raise SaetuneError("mode 'steer' needs features to steer (steer={feature: value}, or edits=[clamp(f, v), "
                           "add(f, alpha)])")
    schedule = schedule or Schedule()
    if schedule.think_only and think_tags is None:
        raise SaetuneError("a think-only schedule needs think_tags=(open_ids, close_ids) "
                           "(saetune.steering.think_tag_ids(tokenizer) gives them)")
    hp = resolve_hook(model, hook or sae.cfg.hook_name)
    width = model_width(model, hp)
    if sae.d_in != width:
        raise SaetuneError(f"SAE width d_in={sae.d_in} does not match the model's width {width} at {hp.name}")
    if prompt_len is not None and prompt_len < 1:
        raise SaetuneError(f"prompt_len must be at least 1 token, got {prompt_len}")
    state = _Intervention(sae, edits, schedule, mode, think_tags, top_k, keep_acts, prompt_len)
    handle = model.register_forward_pre_hook(state.pre_forward, with_kwargs=True)
    try:
        with replace_activation(model, hp, state.at_hook):
            yield state.rec
    finally:
        handle.remove()


# ---- generation --------------------------------------------------------------------------------

@dataclass
class SteeredRow:
    """One prompt's generation: ids, text, and per position (in this row's own sequence, prompt first) the top
    latents; ``steered`` lists the positions that were edited."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    features: dict[int, list[tuple[int, float]]]
    steered: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def token_features(self, j: int) -> list[tuple[int, float]]:
        """Top latents of generated token ``j`` (its own position)."""
        return self.features[len(self.prompt_ids) + j]


def _cache_kwarg(model) -> str:
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_UNSUPPORTED_GENERATE_KWARGS = ("num_beams", "num_beam_groups", "assistant_model", "prompt_lookup_num_tokens")


def _encode_prompts(model: nn.Module, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
                    add_special_tokens: bool) -> tuple[list[list[int]], int, int, torch.Tensor, torch.Tensor]:
    """Phase 1 of :func:`generate`: ``(encoded, width, pad_id, input_ids, attention)``: each prompt as its token ids,
    and the batch left-padded with ``pad_id`` (pad token, else EOS) to ``width`` on the model's device
    (input_ids, attention [B, width])."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str)
               else [int(t) for t in p] for p in prompts]
    if any(not e for e in encoded):
        raise SaetuneError("a prompt encodes to no tokens; give every prompt some text")
    width = max(len(e) for e in encoded)
    pad_id = pad_token_id(tokenizer, model)
    input_ids, attention = left_pad(encoded, pad_id)  # (B, P)
    return encoded, width, pad_id, input_ids.to(device), attention.to(device)


def _generate_recorded(model: nn.Module, pad_id: int, input_ids: torch.Tensor, attention: torch.Tensor,
                       max_new_tokens: int, generate_kwargs: dict[str, Any],
                       intervention: contextlib.AbstractContextManager) -> tuple[torch.Tensor, SAERecorder]:
    """Phase 2 of :func:`generate`: run ``model.generate`` inside ``intervention`` (an :func:`intervene` context);
    returns the sequences [B, P + N] and the recording. The last generated token is fed once more through the
    returned cache so its latents are recorded too."""
    width = input_ids.shape[1]
    generate_kwargs = {**generate_kwargs, "return_dict_in_generate": True}  # the cache comes back for the last step
    with intervention as rec:
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, **generate_kwargs)
        seqs = out.sequences  # (B, P + N)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if seqs.shape[1] > width and cache is not None:  # the last token: one more step, so it is read too
            full_mask = torch.cat([attention, torch.ones_like(seqs[:, width:])], dim=1)
            pos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -1:]
            model(input_ids=seqs[:, -1:], attention_mask=full_mask, position_ids=pos, use_cache=True,
                  **{_cache_kwarg(model): cache})
    return seqs, rec


def _steered_rows(tokenizer, encoded: list[list[int]], width: int, seqs: torch.Tensor, rec,
                  stop: set[int]) -> list[SteeredRow]:
    """Phase 3 of :func:`generate`: one :class:`SteeredRow` per prompt, its response cut after the first ``stop``
    token and its recorded positions shifted from the padded batch (``width - len(prompt)`` pads) to its own."""
    rows = []
    for r, e in enumerate(encoded):
        pad = width - len(e)
        new = seqs[r, width:].tolist()
        cut = next((j + 1 for j, t in enumerate(new) if t in stop), len(new))
        response = new[:cut]
        n = len(e) + len(response)
        feats = {p - pad: f for p, f in rec.by_position(r).items() if pad <= p < pad + n}
        steered = [p - pad for p in rec.steered_positions(r) if pad <= p < pad + n]
        rows.append(SteeredRow(list(e), response, tokenizer.decode(response, skip_special_tokens=False), feats,
                               steered))
    return rows


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]], sae,
             edits: Any = None,
             schedule: Schedule | None = None, hook: str | None = None, max_new_tokens: int = 64, top_k: int = 8,
             mode: str = "steer", think_tags: tuple[Sequence[int], Sequence[int]] | None = None,
             add_special_tokens: bool = True, **generate_kwargs) -> list[SteeredRow]:
    """Generate from ``prompts`` (greedy unless ``do_sample=True`` is passed) with ``sae`` hooked in, edits applied
    on ``schedule`` at every generated token, and every position's top-``top_k`` latents recorded.

    A prompt is a string or a list of token ids; several prompts run as one left-padded batch.
    ``mode="record"`` only records (``edits`` unused). The think tags come from the tokenizer unless given.
    Returns one :class:`SteeredRow` per prompt, its response cut after the first stop token (the model's
    generation-config EOS or the tokenizer's, :func:`saetune.generation.collect_stop_ids`).
    """
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    schedule = schedule or Schedule()
    if mode == "steer" and not edits:
        mode = "record"  # nothing to steer: a plain run that records
    if schedule.think_only and think_tags is None:
        think_tags = think_tag_ids(tokenizer)
    for key in _UNSUPPORTED_GENERATE_KWARGS:
        if generate_kwargs.get(key) not in (None, 1):
            raise SaetuneError(f"{key}={generate_kwargs[key]!r} is not supported while steering: each decoding step "
                               "must extend every row by one token in order (greedy or sampling)")
    encoded, width, pad_id, input_ids, attention = _encode_prompts(model, tokenizer, prompts, add_special_tokens)
    generate_kwargs.setdefault("do_sample", False)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = set(collect_stop_ids(tokenizer, model_eos, ()))
    intervention = intervene(model, sae, hook, edits if mode == "steer" else None, schedule, mode, top_k, think_tags)
    seqs, rec = _generate_recorded(model, pad_id, input_ids, attention, max_new_tokens,
                                   generate_kwargs, intervention)
    return _steered_rows(tokenizer, encoded, width, seqs, rec, stop)
