"""Generation backends for evaluation: Hugging Face ``generate`` and vLLM, behind one interface.

A backend turns a list of prompt strings into one :class:`Completion` per prompt::

    backend = HFBackend(model, tokenizer, batch_size=32)
    outs = backend.generate(prompts, SamplingParams(temperature=0.6, top_p=0.95), seeds)

Several samples of one problem are several entries of ``prompts`` (the caller repeats the
prompt), so a backend never has to know about problems or samples, and an evaluation can be cut
into batches and resumed at any prompt. ``seeds`` holds one integer per prompt: vLLM seeds each
request with its own; HF ``generate`` draws a whole batch from one random stream, seeded with the
batch's first seed (so the same batches give the same samples, on the same hardware).

Defaults follow Resa's evaluation (SPEC_RESA.md): temperature 0.6, top-p 0.95, up to 32,768 new
tokens; ``temperature=0`` means greedy decoding. A response is the text of the new tokens up to
and including the first stop token, with the tokenizer's EOS/pad text dropped (the toy's
``</answer>`` stop token stays, since its grader reads it).

vLLM is optional (``pip install saetune[vllm]``); with ``data_parallel_size=N`` the vLLM backend
runs N engines in N spawned processes, each seeing ``tensor_parallel_size`` GPUs of its own
(``CUDA_VISIBLE_DEVICES`` is split between them), and deals the prompts out round-robin.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from .errors import SaetuneError

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 32768


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. ``temperature == 0`` is greedy decoding (``top_p`` unused)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's EOS
    max_total_tokens: int = 0  # prompt + response at most this many tokens (0: only the model's context)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SaetuneError(f"temperature={self.temperature}; it must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise SaetuneError(f"top_p={self.top_p}; it must lie in (0, 1]")
        if self.max_new_tokens < 1:
            raise SaetuneError(f"max_new_tokens={self.max_new_tokens}; it must be at least 1")
        if self.max_total_tokens < 0:
            raise SaetuneError(f"max_total_tokens={self.max_total_tokens}; it must be 0 (no cap) or positive")


@dataclass
class Completion:
    """One sampled response: its text, how many tokens were generated, whether it hit the cap."""

    text: str
    n_tokens: int
    truncated: bool = False  # no stop token before max_new_tokens (or the context end)
    token_ids: list[int] = field(default_factory=list, repr=False)


class Backend(Protocol):
    """What the evaluation loop needs from a generation engine."""

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 seeds: Sequence[int]) -> list[Completion]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Prompt rendering
# --------------------------------------------------------------------------------------------

TEMPLATES = ("chat", "r1zero", "raw")


def render_prompt(tokenizer, problem: str, template: str) -> str:
    """The prompt text for one problem.

    ``chat``: the tokenizer's chat template with one user turn and the generation prompt (how
    Resa and lighteval evaluate); ``r1zero``: Resa's training text format up to the thought,
    ``{R1_ZERO_SYSTEM}User:\\n {problem}\\n\\nAssistant:\\n <think>``; ``raw``: the problem as is.
    """
    from .data import R1_ZERO_SYSTEM, chat_text

    if template == "chat":
        return chat_text(tokenizer, problem)
    if template == "r1zero":
        return f"{R1_ZERO_SYSTEM}User:\n {problem}\n\nAssistant:\n <think>"
    if template == "raw":
        return problem
    raise SaetuneError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, prompt: str, template: str) -> list[int]:
    """Token ids of a rendered prompt; a chat template already holds its special tokens."""
    return tokenizer(prompt, add_special_tokens=(template != "chat"), verbose=False)["input_ids"]


def check_prompt_fits(which: str, n_tokens: int, max_positions: int) -> None:
    """Refuse a prompt (``which``: e.g. "prompt 3") of ``n_tokens`` tokens that leaves no room to generate in a
    context of ``max_positions``."""
    if n_tokens >= max_positions:
        raise SaetuneError(f"{which} is {n_tokens} tokens long, but the model's context holds "
                           f"{max_positions} positions, which leaves no room to generate; shorten it to fewer than "
                           f"{max_positions} tokens")


def collect_stop_ids(tokenizer, model_eos: Any, extra: Sequence[int]) -> list[int]:
    """Token ids that end a response: ``model_eos`` (the model's generation-config EOS, an id or a list), the
    tokenizer's EOS, then ``extra``, in first-occurrence order without repeats."""
    ids: list[int] = []
    for src in (model_eos, tokenizer.eos_token_id, *extra):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(tokenizer, model=None) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token (the usual stand-in for
    decoder-only models that ship without a pad token).

    ``model`` only names the model in the error; it is not consulted for an id.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        owner = f" (for {type(model).__name__})" if model is not None else ""
        raise SaetuneError(f"the tokenizer {type(tokenizer).__name__}{owner} has neither a pad nor an EOS token, "
                           "and batched generation needs one to pad rows; set tokenizer.pad_token (or "
                           "tokenizer.eos_token) before generating")
    return pad_id


def cut_response(token_ids: Sequence[int], stop_ids: Sequence[int], drop_ids: Sequence[int],
                 hit_cap: bool) -> tuple[list[int], int, bool]:
    """``(kept ids, n generated tokens, truncated)`` for one generated row.

    Keeps tokens up to and including the first stop token; EOS/pad ids (``drop_ids``) are not
    part of the text. ``n_tokens`` counts what the model produced, the stop token included.
    """
    stops = set(stop_ids)
    for j, t in enumerate(token_ids):
        if t in stops:
            kept = list(token_ids[:j + 1])
            if t in set(drop_ids):
                kept = kept[:-1]
            return kept, j + 1, False
    return list(token_ids), len(token_ids), hit_cap


# --------------------------------------------------------------------------------------------
# Hugging Face generate
# --------------------------------------------------------------------------------------------

def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention)`` long [B, T_max] for a ``generate`` batch: each row at the right, ``pad_id`` (attention 0)
    before it (HF derives position ids from the attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r))
            attention[i, width - len(r):] = 1
    return ids, attention


def hf_generate(model, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, pad_id: int,
                stop_ids: Sequence[int], seed: int | None = None, max_new_tokens: int | None = None,
                stopping_criteria: Any = None) -> list[list[int]]:
    """One HF ``model.generate`` call over ``prompt_ids`` as a left-padded batch; each row's new tokens.

    The HF generation path for evaluation (:class:`HFBackend`), RL's rollouts and the toy's evaluation; steering
    (:func:`saetune.steering.generate`) calls ``generate`` itself, for the KV cache:

    - rows are left-padded with ``pad_id`` under an attention mask (HF derives position ids from the mask);
    - ``params.temperature == 0`` is greedy; otherwise sampling at ``temperature`` and ``top_p`` with no top-k cut
      (``top_k=0``: HF's default would be 50; Resa's vLLM sampling has none);
    - ``stop_ids`` end a row (HF's ``eos_token_id``); ``max_new_tokens`` (default ``params.max_new_tokens``) caps
      every row; ``stopping_criteria`` (a ``StoppingCriteriaList``) is handed to ``generate`` as is;
      ``params.max_total_tokens`` is the caller's to apply (through ``max_new_tokens``);
    - ``seed``: ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's random state is untouched and a
      seed gives the same samples (same hardware, same threads); ``None`` leaves the RNG alone (greedy draws none).

    Returns the new tokens as ``generate`` gives them: one length for the whole batch, a row that stopped early
    filled with ``pad_id``; callers cut each row at its stop (:func:`cut_response`,
    ``saetune.rl.rollout.cut_at_stop``).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    input_ids, attention = left_pad(prompt_ids, pad_id)  # (B, T)
    width = input_ids.shape[1]
    sampling = params.temperature > 0
    cfg = GenerationConfig(
        do_sample=sampling, temperature=params.temperature if sampling else None,
        top_p=params.top_p if sampling else None, top_k=0 if sampling else None,
        max_new_tokens=params.max_new_tokens if max_new_tokens is None else max_new_tokens,
        eos_token_id=list(stop_ids), pad_token_id=pad_id)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):  # the caller's random state is untouched
        if seed is not None:
            torch.manual_seed(seed)
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=cfg, stopping_criteria=stopping_criteria)  # (B, T + new)
    return gen[:, width:].tolist()


class HFBackend:
    """Batched ``model.generate`` with left padding; ``batch_size`` sequences per call.

    ``template`` is only used to decide whether the tokenizer adds special tokens (a chat
    template already has them). New tokens are capped so that prompt + response fits the
    model's ``max_position_embeddings`` (with a warning, once); a prompt that fills the context
    by itself is refused, naming it.
    """

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 32, template: str = "chat"):
        if batch_size < 1:
            raise SaetuneError(f"batch_size={batch_size}; it must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.template = batch_size, template
        self.pad_id = pad_token_id(tokenizer, model)
        self.device = next(model.parameters()).device
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self._warned_cap = False

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        if len(seeds) != len(prompts):
            raise SaetuneError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        out: list[Completion] = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._batch(list(prompts[i:i + self.batch_size]), params, int(seeds[i]), start=i)
        return out

    def _batch(self, prompts: list[str], params: SamplingParams, seed: int, start: int = 0) -> list[Completion]:
        ids = [encode_prompt(self.tokenizer, p, self.template) for p in prompts]
        width = max(len(x) for x in ids)
        longest = start + max(range(len(ids)), key=lambda r: len(ids[r]))
        max_new = params.max_new_tokens
        if self.max_positions:
            room = int(self.max_positions) - width
            check_prompt_fits(f"prompt {longest}", width, int(self.max_positions))
            if room < max_new and not self._warned_cap:
                self._warned_cap = True  # once per backend: every batch of an evaluation would repeat it
                warnings.warn(f"prompt {longest} is {width} tokens long: with max_new_tokens {max_new} it would run "
                              f"past the model's {self.max_positions} positions, so its batch generates at most "
                              f"{room} new tokens (responses that reach the cap are marked truncated)", stacklevel=3)
            max_new = min(max_new, room)
        if params.max_total_tokens:  # the batch's longest prompt decides (left padding: one width per batch)
            check_prompt_fits(f"prompt {longest}", width, params.max_total_tokens)
            max_new = min(max_new, params.max_total_tokens - width)
        stop = collect_stop_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None),
                         params.stop_token_ids)
        new = hf_generate(self.model, ids, params, self.pad_id, stop, seed, max_new)  # (B, new)
        drop = {i for i in (self.tokenizer.eos_token_id, self.pad_id) if i is not None}
        out = []
        for row in new:
            kept, n, truncated = cut_response(row, stop, sorted(drop), hit_cap=True)
            text = self.tokenizer.decode(kept, skip_special_tokens=False)
            out.append(Completion(text=text, n_tokens=n, truncated=truncated, token_ids=kept))
        return out

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------

def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SaetuneError("backend 'vllm' needs vLLM, which is not installed; install it with "
                           "`pip install saetune[vllm]` (Linux + CUDA), or use backend 'hf'") from None
    return vllm


def _vllm_params(params: SamplingParams, seed: int, stop_ids: Sequence[int], prompt_len: int = 0):
    from vllm import SamplingParams as VSP
    greedy = params.temperature == 0
    max_tokens = params.max_new_tokens
    if params.max_total_tokens:
        max_tokens = min(max_tokens, params.max_total_tokens - prompt_len)
    return VSP(n=1, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
               max_tokens=max_tokens, seed=seed, stop_token_ids=list(stop_ids) or None,
               skip_special_tokens=False)


class _VLLMEngine:
    """One vLLM engine in this process."""

    def __init__(self, model_path: str, tensor_parallel_size: int, dtype: str, gpu_memory_utilization: float,
                 seed: int, trust_remote_code: bool, max_model_len: int | None, template: str):
        vllm = _require_vllm()
        self.template = template
        kwargs: dict[str, Any] = dict(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                      gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                      trust_remote_code=trust_remote_code)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int],
                 use_tqdm: bool = False) -> list[Completion]:
        stop = collect_stop_ids(self.tokenizer, None, params.stop_token_ids)
        drop = {i for i in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if i is not None}
        # token ids, not strings: vLLM would add a second BOS to a chat-templated prompt
        requests = [{"prompt_token_ids": encode_prompt(self.tokenizer, p, self.template)} for p in prompts]
        if params.max_total_tokens:  # each request's new tokens: what its prompt leaves of the total
            for i, r in enumerate(requests):
                check_prompt_fits(f"prompt {prompts[i][:60]!r}", len(r["prompt_token_ids"]), params.max_total_tokens)
        sps = [_vllm_params(params, int(s), stop, len(r["prompt_token_ids"])) for s, r in zip(seeds, requests)]
        max_len = getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "max_model_len", None)
        if max_len:  # vLLM stops a response at the context end itself (finish_reason 'length' → truncated)
            for i, r in enumerate(requests):
                check_prompt_fits(f"prompt {prompts[i][:60]!r}", len(r["prompt_token_ids"]), int(max_len))
        outs = self.llm.generate(requests, sps, use_tqdm=use_tqdm)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            kept, n, _ = cut_response(ids, stop, sorted(drop), hit_cap=False)
            res.append(Completion(text=self.tokenizer.decode(kept, skip_special_tokens=False), n_tokens=n,
                                  truncated=c.finish_reason == "length", token_ids=kept))
        return res


def _dp_worker(rank: int, gpus: str, engine_kwargs: dict, requests, results) -> None:
    """A data-parallel rank: its own GPUs, its own engine, jobs from ``requests`` until ``None``."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        engine = _VLLMEngine(**engine_kwargs)
        results.put((rank, "ready", None))
    except BaseException as e:  # reported to the parent, which raises
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
        return
    while (job := requests.get()) is not None:
        prompts, params, seeds = job
        try:
            results.put((rank, "ok", engine.generate(prompts, params, seeds)))
        except BaseException as e:
            results.put((rank, "error", f"{type(e).__name__}: {e}"))


class VLLMBackend:
    """vLLM offline inference; ``data_parallel_size`` engines in spawned processes when > 1."""

    name = "vllm"

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.9, seed: int = 0,
                 trust_remote_code: bool = False, max_model_len: int | None = None, template: str = "chat",
                 steering: Any = None):
        if steering is not None:  # see saetune.steering: vLLM has no supported per-token hidden-state hook
            from .steering import VLLM_STEERING_REFUSAL
            raise SaetuneError(VLLM_STEERING_REFUSAL)
        _require_vllm()
        if tensor_parallel_size < 1 or data_parallel_size < 1:
            raise SaetuneError(f"tensor_parallel_size={tensor_parallel_size} and data_parallel_size="
                               f"{data_parallel_size} must both be at least 1")
        kwargs = dict(model_path=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                      trust_remote_code=trust_remote_code, max_model_len=max_model_len, template=template)
        self.dp = data_parallel_size
        self._procs: list = []
        if self.dp == 1:
            self._engine = _VLLMEngine(**kwargs)
            self.tokenizer = self._engine.tokenizer
            return
        self._start_workers(kwargs, tensor_parallel_size)
        from .models import load_tokenizer
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)

    def _start_workers(self, kwargs: dict, tp: int) -> None:
        import multiprocessing as mp
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        need = self.dp * tp
        if len(gpus) < need:
            raise SaetuneError(f"data_parallel_size={self.dp} × tensor_parallel_size={tp} needs {need} GPUs; "
                               f"{len(gpus)} are visible")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._requests = [ctx.Queue() for _ in range(self.dp)]
        for r in range(self.dp):
            p = ctx.Process(target=_dp_worker, daemon=True, args=(
                r, ",".join(gpus[r * tp:(r + 1) * tp]), kwargs, self._requests[r], self._results))
            p.start()
            self._procs.append(p)
        for _ in range(self.dp):
            rank, status, payload = self._results.get()
            if status != "ready":
                self.close()
                raise SaetuneError(f"vLLM data-parallel rank {rank} failed to start: {payload}")

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        if self.dp == 1:
            return self._engine.generate(prompts, params, seeds)
        idx = [list(range(r, len(prompts), self.dp)) for r in range(self.dp)]
        for r in range(self.dp):
            self._requests[r].put(([prompts[i] for i in idx[r]], params, [seeds[i] for i in idx[r]]))
        out: list[Completion | None] = [None] * len(prompts)
        for _ in range(self.dp):
            rank, status, payload = self._results.get()
            if status != "ok":
                raise SaetuneError(f"vLLM data-parallel rank {rank} failed: {payload}")
            for i, c in zip(idx[rank], payload):
                out[i] = c
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for q in getattr(self, "_requests", []):
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._procs = []
