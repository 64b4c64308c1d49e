"""One Moshi step per 80 ms frame: the temporal transformer over a ring KV cache, then the depformer's
dep_q codebook steps, with the reference's per-stream delays. Used by the `moshi.step` stage.

Speed on a CPU comes from what is not done: attention reads only the slots filled so far (at most the
context), caches are allocated once per stream, tokens stay Python ints between steps, the module tree
is bypassed for plain tensor ops, and weights are laid out once for fast one-vector products (float32:
in place; bfloat16: a oneDNN-packed copy). All streaming state is LmStreamState.

Many conversations step at once through `step_many`: one LmStreamState each, one batch of rows through
the projections, norms and depformer, attention per conversation over its own KV cache. Every row is
computed so that its result does not depend on the batch (see `_exact_rows`), so a conversation gets the
same tokens alone or beside others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rtpipe.stages.moshi.lm import LmModel
from rtpipe.stages.moshi.sampling import SamplingParams, sample_token
from rtpipe.stages.moshi.transformer import (
    ACTIVATION_FNS,
    ActivationGating,
    RmsNorm,
    TransformerLayer,
    rope_frequencies,
    sin_embedding,
)

UNGENERATED = -2  # a delay-buffer slot no token has been written to yet

# a norm or an activation on one vector [dim], or on rows [B, dim] (each row as it would be alone)
VectorFn = Callable[[torch.Tensor], torch.Tensor]
# prepare(weight [out, in]) -> the operand matvec takes; matvec(x [in], operand) -> [out]
Prepare = Callable[[torch.Tensor], torch.Tensor]
Matvec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# rows(x [B, in], operand) -> [B, out], each row equal to matvec(x[b], operand)
Rows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# attend(qkv [B, 3 * heads * head_dim]) -> attended [B, heads * head_dim], each row over its own cache
Attend = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LmStreamState:
    """Everything one conversation carries from frame to frame; a new one starts the conversation over."""

    step: int  # frames consumed so far (the temporal position of the next step)
    delay_buffer: list[list[int]]  # [text + n_q][max_delay + 2] tokens, indexed by position % size
    kv_cache: torch.Tensor  # [layers, 2 (keys, values), heads, context, head_dim], ring by step
    depformer_kv: torch.Tensor  # [depformer layers, 2, heads, dep_q, head_dim], refilled each frame
    generator: torch.Generator | None = None
    seed: int | None = None
    sampling: SamplingParams | None = None  # None: the streamer's

    def describe(self) -> dict:
        return {
            "step": self.step,
            "cached_steps": min(self.step, self.kv_cache.shape[3]),
            "context": self.kv_cache.shape[3],
            "seed": self.seed,
        }


@dataclass
class _Layer:
    norm1: VectorFn
    in_proj: torch.Tensor | list[torch.Tensor]
    out_proj: torch.Tensor | list[torch.Tensor]
    norm2: VectorFn
    ff_in: torch.Tensor | list[torch.Tensor]
    ff_out: torch.Tensor | list[torch.Tensor]
    gated: bool
    activation: VectorFn
    scale1: torch.Tensor | None = None
    scale2: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What one step produced: the model's tokens (text first), and logits when asked for."""

    tokens: list[int]
    text_logits: torch.Tensor | None = None
    audio_logits: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class LmStreamer:
    """Runs an LmModel one frame at a time. Not thread-safe; one LmStreamState per conversation.
    Build it after the weights are loaded: it lays out (and for bfloat16 packs) them once, here."""

    def __init__(self, model: LmModel, sampling: SamplingParams | None = None, context: int | None = None):
        c = model.config
        self.model = model
        self.config = c
        self.sampling = sampling or SamplingParams()
        context = context or c.context
        if context is None:
            raise ValueError("streaming needs a context (the KV cache's size)")
        self.context: int = context
        self.dtype = model.dtype
        self.device = model.device
        self.head_dim = c.dim // c.num_heads
        self.dep_head_dim = c.depformer_dim // c.depformer_num_heads
        self.rope_freqs = (
            rope_frequencies(self.head_dim, c.max_period, self.device) if c.positional_embedding == "rope" else None
        )
        prepare, self.matvec, self._matmul = _matvec_kernel(model)
        self._exact: dict[tuple, int] = {}  # (shape, dtype) -> rows one matmul call keeps exact
        self.layers = [_unpack_layer(layer, c.gating, prepare) for layer in model.transformer.layers]
        self.dep_layers = [_unpack_layer(layer, c.depformer_gating, prepare) for layer in model.depformer.layers]
        self.out_norm = _norm_fn(model.out_norm)
        self.emb = [_weight(e) for e in model.emb]
        self.text_emb = model.text_emb.weight
        self.text_linear = prepare(model.text_linear.weight)
        self.dep_in = [prepare(_weight(m)) for m in model.depformer_in]
        self.dep_emb = [model.depformer_text_emb.weight] + [_weight(e) for e in model.depformer_emb]
        self.heads = [prepare(_weight(m)) for m in model.linears]
        self.dep_pos = None
        if c.depformer_pos_emb == "sin":
            positions = torch.arange(c.dep_q, device=self.device)
            self.dep_pos = sin_embedding(positions, c.depformer_dim, c.depformer_max_period).to(self.dtype)
        self.initial = [c.text_card] + [c.card] * c.n_q
        self._position = torch.zeros((), dtype=torch.float32, device=self.device)
        self._dep_scratch: torch.Tensor | None = None  # the depformer's KV for a batch, see _dep_kv

    # --- state ---
    def new_state(self, seed: int | None = None) -> LmStreamState:
        c = self.config
        size = c.max_delay + 2
        kv = torch.zeros(
            c.num_layers, 2, c.num_heads, self.context, self.head_dim, dtype=self.dtype, device=self.device
        )
        dep_kv = torch.zeros(
            c.depformer_num_layers,
            2,
            c.depformer_num_heads,
            c.dep_q,
            self.dep_head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return LmStreamState(0, [[UNGENERATED] * size for _ in range(c.num_codebooks)], kv, dep_kv, generator, seed)

    def restart(self, state: LmStreamState, seed: int | None = None) -> None:
        """Starts `state`'s conversation over in place, reseeded with `seed` (None: no generator), as
        new_state(seed) would but keeping its caches: a step reads only cache slots its own
        conversation wrote, so nothing is cleared or allocated. Keeps `state.sampling`."""
        state.step = 0
        for row in state.delay_buffer:
            row[:] = [UNGENERATED] * len(row)
        self.reseed(state, seed)

    def reseed(self, state: LmStreamState, seed: int | None) -> None:
        """Gives `state` a generator seeded with `seed` (None: none, sampling draws from torch's)."""
        state.seed = seed
        state.generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    # --- one frame ---
    @torch.inference_mode()
    def step(self, state: LmStreamState, user_codes: Sequence[int]) -> list[int] | None:
        """Feeds the user's codes for one frame ([user_q] ints); returns the model's tokens for the
        frame that is now complete, [text, dep_q audio codes], or None while the delays fill (the
        first max(delays) steps)."""
        out = self.step_full(state, user_codes)
        return out.tokens or None

    @torch.inference_mode()
    def step_full(
        self,
        state: LmStreamState,
        user_codes: Sequence[int],
        keep_logits: bool = False,
    ) -> StepOutput:
        """step(), also giving this step's logits and the raw tokens sampled (before the delays are
        undone): out.extra = {"inputs": what the transformer read, "sampled": what it chose}."""
        inputs = self._feed(state, user_codes)
        sampled, text_logits, audio_logits = self._generate(state, inputs, keep_logits)
        tokens = self._advance(state, sampled)
        return StepOutput(tokens, text_logits, audio_logits, {"inputs": inputs, "sampled": sampled})

    @torch.inference_mode()
    def step_many(self, states: Sequence[LmStreamState], user_codes: Sequence[Sequence[int]]) -> list[list[int] | None]:
        """step() for several conversations at once, one batch: states[b] reads user_codes[b]. Each
        result equals what step(states[b], user_codes[b]) would give (the same tokens, bit for bit);
        one conversation takes step()'s one-vector path. The states must be distinct."""
        if len(states) == 1:
            return [self.step(states[0], user_codes[0])]
        inputs = [self._feed(state, codes) for state, codes in zip(states, user_codes)]
        sampled = self._generate_rows(states, inputs)
        return [self._advance(state, row) or None for state, row in zip(states, sampled)]

    def _feed(self, state: LmStreamState, user_codes: Sequence[int]) -> list[int]:
        """Writes the user's codes into the delay buffer -> what the transformer reads at this step."""
        c = self.config
        delays = c.delays
        buffer = state.delay_buffer
        size = len(buffer[0])
        t = state.step
        first_user = 1 + c.dep_q
        for j in range(c.user_q):
            k = first_user + j
            buffer[k][(t + delays[k]) % size] = int(user_codes[j])
        return [self.initial[k] if t <= delays[k] else buffer[k][t % size] for k in range(c.num_codebooks)]

    def _advance(self, state: LmStreamState, sampled: list[int]) -> list[int]:
        """Stores this step's sampled tokens and moves on -> the completed frame's tokens ([] while the
        delays fill)."""
        c = self.config
        delays = c.delays
        buffer = state.delay_buffer
        size = len(buffer[0])
        t = state.step
        state.step = t + 1
        first_user = 1 + c.dep_q
        for k in range(first_user):
            buffer[k][(t + 1) % size] = sampled[k]
        if t + 1 <= c.max_delay:
            return []
        base = t + 1 - c.max_delay
        return [buffer[k][(base + delays[k]) % size] for k in range(first_user)]

    def _generate(
        self, state: LmStreamState, inputs: list[int], keep_logits: bool
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """The text token and dep_q audio codes sampled at this step, and with
        `keep_logits` the text logits [text_card] and audio logits [dep_q, card] (float32)."""
        c = self.config
        s = state.sampling or self.sampling
        hidden = self._temporal(state, inputs)
        mv = self.matvec
        text_logits = mv(hidden, self.text_linear)
        token = sample_token(text_logits, s.text_temperature, s.text_top_k, state.generator)
        tokens = [token]
        audio_logits: list[torch.Tensor] | None = [] if keep_logits else None
        dep_kv = state.depformer_kv
        for k in range(c.dep_q):
            x = mv(hidden, self.dep_in[k if len(self.dep_in) > 1 else 0])
            x = x + self.dep_emb[k][token]
            if self.dep_pos is not None:
                x = x + self.dep_pos[k]
            for i, layer in enumerate(self.dep_layers):
                x = _layer_step(layer, x, k, dep_kv[i], k, k + 1, None, c.depformer_num_heads, self.dep_head_dim, mv)
            logits = mv(x, self.heads[k])
            if audio_logits is not None:
                audio_logits.append(logits.float())
            token = sample_token(logits, s.temperature, s.top_k, state.generator)
            tokens.append(token)
        sampled = torch.stack(tokens).tolist()
        if audio_logits is not None:
            return sampled, text_logits.float(), torch.stack(audio_logits)
        return sampled, None, None

    def _generate_rows(self, states: Sequence[LmStreamState], inputs: list[list[int]]) -> list[list[int]]:
        """_generate for B conversations at once (no logits kept) -> each one's sampled tokens."""
        c = self.config
        sampling = [state.sampling or self.sampling for state in states]
        greedy_text = all(s.text_temperature <= 0 for s in sampling)
        greedy_audio = all(s.temperature <= 0 for s in sampling)
        hidden = self._temporal_rows(states, inputs)
        rows = self._rows
        logits = rows(hidden, self.text_linear)
        if greedy_text:  # argmax row by row is the arg-max of each row alone (the first of ties)
            token = logits.argmax(dim=-1)
        else:
            token = torch.stack(
                [
                    sample_token(logits[b], s.text_temperature, s.text_top_k, state.generator)
                    for b, (s, state) in enumerate(zip(sampling, states))
                ]
            )
        tokens = [token]
        n = len(states)
        heads, head_dim = c.depformer_num_heads, self.dep_head_dim
        dep_kv = self._dep_kv(n)
        for k in range(c.dep_q):
            x = rows(hidden, self.dep_in[k if len(self.dep_in) > 1 else 0])
            x = x + self.dep_emb[k][token]
            if self.dep_pos is not None:
                x = x + self.dep_pos[k]
            for i, layer in enumerate(self.dep_layers):

                def attend(qkv: torch.Tensor, kv: torch.Tensor = dep_kv[i], k: int = k) -> torch.Tensor:
                    # all conversations are at depformer step k: one product per (conversation, head)
                    q, key, v = qkv.view(n, 3, heads, head_dim).transpose(0, 1).reshape(3, n * heads, head_dim)
                    return _attend(q, key, v, kv, k, k + 1, head_dim).view(n, heads * head_dim)

                x = _layer_rows(layer, x, k, attend, rows)
            logits = rows(x, self.heads[k])
            if greedy_audio:
                token = logits.argmax(dim=-1)
            else:
                token = torch.stack(
                    [
                        sample_token(logits[b], s.temperature, s.top_k, state.generator)
                        for b, (s, state) in enumerate(zip(sampling, states))
                    ]
                )
            tokens.append(token)
        return torch.stack(tokens, dim=1).tolist()

    def _dep_kv(self, n: int) -> torch.Tensor:
        """The depformer's keys and values for n conversations, [layers, 2, n * heads, dep_q, D]: scratch
        refilled every frame (step k reads only steps 0..k of this frame), so one serves every batch."""
        c = self.config
        rows = n * c.depformer_num_heads
        if self._dep_scratch is None or self._dep_scratch.shape[2] < rows:
            self._dep_scratch = torch.zeros(
                c.depformer_num_layers, 2, rows, c.dep_q, self.dep_head_dim, dtype=self.dtype, device=self.device
            )
        return self._dep_scratch[:, :, :rows]

    def _temporal_rows(self, states: Sequence[LmStreamState], inputs: list[list[int]]) -> torch.Tensor:
        """_temporal for B conversations -> out_norm(hidden) [B, dim], row b as _temporal gives it."""
        c = self.config
        index = torch.tensor(inputs, device=self.device)  # [B, streams]
        valid = index >= 0  # a negative token adds nothing (as _temporal skips it)
        safe = index.clamp(min=0)
        tables = [*self.emb, self.text_emb]
        columns = [*range(1, c.n_q + 1), 0]  # _temporal's order: audio streams, then text
        x = torch.zeros(len(states), c.dim, dtype=self.dtype, device=self.device)
        for table, k in zip(tables, columns):
            x = x + torch.where(valid[:, k, None], table[safe[:, k]], 0)
        rotors: list[torch.Tensor | None] = []
        slots, filled = [], []
        for state in states:
            t = state.step
            rotor = None
            if self.rope_freqs is not None:  # as _temporal computes it, one conversation at a time
                self._position.fill_(t)
                angles = self.rope_freqs * self._position
                rotor = torch.polar(torch.ones_like(angles), angles)
            rotors.append(rotor)
            slots.append(t % self.context)
            filled.append(min(t + 1, self.context))
        heads, head_dim = c.num_heads, self.head_dim
        for i, layer in enumerate(self.layers):

            def attend(qkv: torch.Tensor, i: int = i) -> torch.Tensor:
                # each conversation over its own cache, its own length: one at a time
                return torch.stack(
                    [
                        _attend_one(qkv[b], state.kv_cache[i], slots[b], filled[b], rotors[b], heads, head_dim)
                        for b, state in enumerate(states)
                    ]
                )

            x = _layer_rows(layer, x, 0, attend, self._rows)
        return self.out_norm(x)

    def _rows(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [B, in] times the operand w -> [B, out], row b equal to matvec(x[b], w) bit for bit: as
        many rows per call as this machine's kernel keeps exact for w's shape (see _exact_rows)."""
        n = x.shape[0]
        if n == 1:
            return self.matvec(x[0], w)[None]
        key = (tuple(w.shape), w.dtype, w.layout)
        per_call = self._exact.get(key)
        if per_call is None:
            per_call = self._exact[key] = _exact_rows(w, x.shape[1], self.matvec, self._matmul)
        x = x.contiguous()
        if per_call >= n:
            return self._matmul(x, w)
        parts = []
        for start in range(0, n, per_call):
            chunk = x[start : start + per_call]
            parts.append(self._matmul(chunk, w) if len(chunk) > 1 else self.matvec(chunk[0], w)[None])
        return torch.cat(parts)

    def _temporal(self, state: LmStreamState, inputs: list[int]) -> torch.Tensor:
        """The temporal transformer at position state.step -> out_norm(hidden) [dim]."""
        c = self.config
        x = None
        for k in range(c.n_q):
            if inputs[k + 1] >= 0:
                row = self.emb[k][inputs[k + 1]]
                x = row if x is None else x + row
        if inputs[0] >= 0:
            x = self.text_emb[inputs[0]] if x is None else x + self.text_emb[inputs[0]]
        if x is None:
            x = torch.zeros(c.dim, dtype=self.dtype, device=self.device)
        t = state.step
        rotor = None
        if self.rope_freqs is not None:
            self._position.fill_(t)
            angles = self.rope_freqs * self._position
            rotor = torch.polar(torch.ones_like(angles), angles)
        slot = t % self.context
        filled = min(t + 1, self.context)
        for i, layer in enumerate(self.layers):
            x = _layer_step(
                layer, x, 0, state.kv_cache[i], slot, filled, rotor, c.num_heads, self.head_dim, self.matvec
            )
        return self.out_norm(x)


def _layer_step(
    layer: _Layer,
    x: torch.Tensor,
    weights: int,
    kv: torch.Tensor,
    slot: int,
    filled: int,
    rotor: torch.Tensor | None,
    heads: int,
    head_dim: int,
    mv: Matvec,
) -> torch.Tensor:
    """One layer on one position x [dim]: writes its key/value at `slot` of kv [2, H, slots, D] and
    attends over the first `filled` slots (all in the window, so no mask is needed)."""
    in_proj = layer.in_proj[weights] if isinstance(layer.in_proj, list) else layer.in_proj
    out_proj = layer.out_proj[weights] if isinstance(layer.out_proj, list) else layer.out_proj
    qkv = mv(layer.norm1(x), in_proj)
    attended = _attend_one(qkv, kv, slot, filled, rotor, heads, head_dim)
    update = mv(attended, out_proj)
    x = x + (update if layer.scale1 is None else layer.scale1 * update)
    ff_in = layer.ff_in[weights] if isinstance(layer.ff_in, list) else layer.ff_in
    ff_out = layer.ff_out[weights] if isinstance(layer.ff_out, list) else layer.ff_out
    h = mv(layer.norm2(x), ff_in)
    if layer.gated:
        half = h.shape[-1] // 2
        h = layer.activation(h[:half]) * h[half:]
    else:
        h = layer.activation(h)
    update = mv(h, ff_out)
    return x + (update if layer.scale2 is None else layer.scale2 * update)


def _attend_one(
    qkv: torch.Tensor,
    kv: torch.Tensor,
    slot: int,
    filled: int,
    rotor: torch.Tensor | None,
    heads: int,
    head_dim: int,
) -> torch.Tensor:
    """One position's attention, qkv [3 * heads * head_dim] -> [heads * head_dim]: rotates q and k by
    `rotor`, writes k and v at `slot` of kv [2, heads, slots, D], attends over the first `filled`."""
    qkv = qkv.view(3, heads, head_dim)
    if rotor is not None:
        qk = qkv[:2]
        pairs = torch.view_as_complex(qk.float().view(2, heads, head_dim // 2, 2))
        qk = torch.view_as_real(pairs * rotor).view(2, heads, head_dim).to(qkv.dtype)
        q, k = qk[0], qk[1]
    else:
        q, k = qkv[0], qkv[1]
    return _attend(q, k, qkv[2], kv, slot, filled, head_dim).view(-1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, slot: int, filled: int, head_dim: int
) -> torch.Tensor:
    """q, k, v [N, D] (N: heads, or conversations x heads) -> [N, 1, D]: writes k and v at `slot` of
    kv [2, N, slots, D] and attends over its first `filled` slots (all in the window: no mask)."""
    n = q.shape[0]
    kv[0, :, slot] = k
    kv[1, :, slot] = v
    # One query per head: two batched products beat SDPA's CPU kernel once thousands of slots fill.
    # Each of the N products is computed alone, so a head's result does not depend on N.
    scores = torch.bmm(q.reshape(n, 1, head_dim), kv[0, :, :filled].transpose(1, 2))
    if scores.dtype == torch.float32:
        weights_ = torch.softmax(scores.mul_(head_dim**-0.5), dim=-1)
    else:  # bfloat16: normalise in float32 as SDPA does
        weights_ = torch.softmax(scores.mul_(head_dim**-0.5), dim=-1, dtype=torch.float32)
        weights_ = weights_.to(scores.dtype)
    return torch.bmm(weights_, kv[1, :, :filled])


def _layer_rows(layer: _Layer, x: torch.Tensor, weights: int, attend: Attend, rows: Rows) -> torch.Tensor:
    """_layer_step on rows x [B, dim], one position of B conversations: the projections and norms as
    one batch, `attend` over each conversation's own cache. Row b equals _layer_step on x[b]."""
    in_proj = layer.in_proj[weights] if isinstance(layer.in_proj, list) else layer.in_proj
    out_proj = layer.out_proj[weights] if isinstance(layer.out_proj, list) else layer.out_proj
    update = rows(attend(rows(layer.norm1(x), in_proj)), out_proj)
    x = x + (update if layer.scale1 is None else layer.scale1 * update)
    ff_in = layer.ff_in[weights] if isinstance(layer.ff_in, list) else layer.ff_in
    ff_out = layer.ff_out[weights] if isinstance(layer.ff_out, list) else layer.ff_out
    h = rows(layer.norm2(x), ff_in)
    if layer.gated:
        half = h.shape[-1] // 2
        # each half a strided view: the activation runs row by row, as on one vector (on a contiguous
        # [B, half] it would run over B * half values, and a vector kernel's scalar tail, which rounds
        # some activations differently, would fall on other elements)
        h = layer.activation(h[:, :half]) * h[:, half:]
    else:
        h = _each_row(layer.activation, h)
    update = rows(h, ff_out)
    return x + (update if layer.scale2 is None else layer.scale2 * update)


def _each_row(fn: VectorFn, x: torch.Tensor) -> torch.Tensor:
    """fn on each row of x [B, n] as on one vector: at once when n fills whole vector registers (no
    scalar tail), else row by row."""
    if x.shape[-1] % 64 == 0:
        return fn(x)
    return torch.stack([fn(row) for row in x])


def _weight(module: nn.Module) -> torch.Tensor:
    """An nn.Linear's or nn.Embedding's weight (to a type checker a ModuleList holds plain Modules)."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise TypeError(f"expected an nn.Linear or nn.Embedding, got a {type(module).__name__}")
    return module.weight


def _unpack_layer(layer: nn.Module, gating: str, prepare: Prepare) -> _Layer:
    """The weights of one TransformerLayer, laid out by `prepare`, and its norms and activation."""
    if not isinstance(layer, TransformerLayer):
        raise TypeError(f"expected a TransformerLayer, got a {type(layer).__name__}")
    attn = layer.self_attn
    in_proj = [prepare(_weight(m)) for m in attn.in_projs]
    out_proj = [prepare(_weight(m)) for m in attn.out_projs]
    ff_in: torch.Tensor | list[torch.Tensor]
    ff_out: torch.Tensor | list[torch.Tensor]
    act: VectorFn
    if gating == "none":
        ff_in, ff_out = prepare(layer.linear1.weight), prepare(layer.linear2.weight)
        gated, act = False, F.gelu
    elif isinstance(layer.gating, nn.ModuleList):
        gatings = [_activation_gating(g) for g in layer.gating]
        ff_in = [prepare(g.linear_in.weight) for g in gatings]
        ff_out = [prepare(g.linear_out.weight) for g in gatings]
        gated, act = True, ACTIVATION_FNS[gating]
    else:
        gating_module = _activation_gating(layer.gating)
        ff_in = prepare(gating_module.linear_in.weight)
        ff_out = prepare(gating_module.linear_out.weight)
        gated, act = True, ACTIVATION_FNS[gating]
    return _Layer(
        _norm_fn(layer.norm1),
        in_proj if len(in_proj) > 1 else in_proj[0],
        out_proj if len(out_proj) > 1 else out_proj[0],
        _norm_fn(layer.norm2),
        ff_in,
        ff_out,
        gated,
        act,
        layer.layer_scale_1.scale if layer.layer_scale_1 is not None else None,
        layer.layer_scale_2.scale if layer.layer_scale_2 is not None else None,
    )


def _activation_gating(module: nn.Module | None) -> ActivationGating:
    if not isinstance(module, ActivationGating):
        raise TypeError(f"expected an ActivationGating, got a {type(module).__name__}")
    return module


def _exact_rows(w: torch.Tensor, features: int, matvec: Matvec, matmul: Rows, most: int = 8) -> int:
    """How many rows (1 to `most`) one matmul(x, w) call may take with every row equal, bit for bit,
    to matvec(x[b], w). A BLAS picks its kernel by shape (MKL: a vector kernel for up to 3 rows, a
    blocked one from 4, rounding differently), never by value: probed once per shape with random rows."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(most, features, generator=generator).to(dtype=w.dtype, device=w.device)
    alone = torch.stack([matvec(row, w) for row in x])
    exact = 1
    for n in range(2, most + 1):
        if not torch.equal(matmul(x[:n], w), alone[:n]):
            break
        exact = n
    return exact


def _matvec_kernel(model: LmModel) -> tuple[Prepare, Matvec, Rows]:
    """(prepare(weight) -> operand, matvec(x [in], operand) -> [out], matmul(x [B, in], operand) ->
    [B, out]): the fastest one-vector product this machine offers for the model's dtype, and the
    same product on rows. On CPU, bfloat16 uses oneDNN with the weight packed once into its blocked
    layout (several times faster than unpacked); float32 re-lays each weight input-major in place (the
    same values and state_dict, a faster gemv)."""
    if model.device.type != "cpu":
        return (lambda w: w.detach()), F.linear, F.linear
    if model.dtype == torch.bfloat16:
        try:
            if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                raise RuntimeError("no oneDNN bfloat16")
            pack = torch.ops.mkldnn._reorder_linear_weight
            linear = torch.ops.mkldnn._linear_pointwise
            probe = torch.ones(4, 8, dtype=torch.bfloat16)
            linear(torch.ones(1, 8, dtype=torch.bfloat16), pack(probe, 1), None, "none", [], "")
        except (AttributeError, RuntimeError):
            return (lambda w: w.detach()), F.linear, F.linear

        def mv_packed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return linear(x.view(1, -1), w, None, "none", [], "").view(-1)

        def mm_packed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return linear(x, w, None, "none", [], "")

        return (lambda w: pack(w.detach(), 1)), mv_packed, mm_packed
    if model.dtype == torch.float32:

        def relayout(w: torch.Tensor) -> torch.Tensor:
            if w.stride(0) != 1:
                w.data = w.data.t().contiguous().t()
            return w.detach()

        return relayout, F.linear, F.linear
    return (lambda w: w.detach()), F.linear, F.linear


def _norm_fn(norm: nn.Module) -> VectorFn:
    """A closure applying `norm` to one vector [dim] with few small ops (a dot product, not mean(x**2)),
    or to rows [B, dim], each as alone."""
    if isinstance(norm, RmsNorm):
        eps = norm.eps
        size = float(norm.alpha.shape[-1])
        if norm.float32:
            gain = norm.alpha.detach().view(-1).float()

            def rms_f32(x: torch.Tensor) -> torch.Tensor:
                xf = x.float()
                y = xf * (torch.rsqrt(_squares(xf).div_(size).add_(eps)) * gain)
                return y if x.dtype == torch.float32 else y.to(x.dtype)

            return rms_f32
        gain = norm.alpha.detach().view(-1)
        return lambda x: x * (torch.rsqrt(_squares(x).div_(size).add_(eps)) * gain)
    return norm  # a LayerNorm's kernel normalises each row alone


def _squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of one vector [dim] (0-d), or of each row of [B, dim] ([B, 1]), one torch.dot
    each: a batched sum rounds differently from dot, and a row must give what it gives alone."""
    if x.dim() == 1:
        return torch.dot(x, x)
    return torch.stack([torch.dot(row, row) for row in x])[:, None]
