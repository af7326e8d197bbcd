"""Generation: continue many prompts with one model, each row seeded on its own.

Shared by every stage that samples (00, 01, 02, 07, 08) through `generate` or, where rows arrive
while others run (02's rollouts), through a `Sampler`:

  generate      outputs of a list of prompts, in their order (a Sampler run over them)
  Sampler       continuous batching: batch_size KV slots, each step one forward over every live
                row; a finished row's slot takes the next waiting row at once. Each distinct
                prompt is computed once and its keys and values held once for all its live rows
                (_shared_prefix_attention reads them once per step for all of them), and a
                prompt that shares a beginning with one computed before computes only the rest
                (the few-shot exemplars of every problem, 02's contexts of one answer)
  sample_rows   the next token of each row from its logits and its own uniform draw: greedy,
                or nucleus (top-p) by inverting the row's CDF; the nucleus is found among the
                top 64 (then 1,024) probabilities and inverted there, with the ids of a full
                sort and a CDF over the whole vocabulary
  end_ids       every id that ends a turn
  _generate_static  the previous generate (one left-padded batch that shrinks as rows finish),
                for the models the slots cannot serve: layers that are not full attention
                (sliding window, linear attention) or an attention kernel that takes no mask

A row's text depends on its prompt, its seed and the model only: row i draws its step-t token
with uniform t of a CPU generator seeded by seeds[i], whatever the batch, the order of the work,
the number of processes or whether its prompt was shared.
"""
import contextlib
import functools
import math
from collections import OrderedDict, deque

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from common import position_ids


def sample_rows(logits, temperature: float, top_p: float, u):
    """One next token per row. logits (B, V); u (B,) uniforms in [0, 1). Greedy when
    temperature == 0; otherwise the smallest set of most likely tokens whose mass reaches top_p
    (the nucleus), sampled by inverting each row's CDF at its own u, so a row's draw depends on
    its logits and its seed only, never on the other rows."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    ids = None
    if top_p < 1.0:
        probs, ids = _nucleus(probs, top_p)  # (B, k): the nucleus, in vocabulary order
    # Invert in vocabulary order: sorted order could be reshuffled by near-ties between batches
    cdf = probs.cumsum(-1)  # (B, k)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (B, 1): first cdf > u
    pick = pick.clamp_(max=cdf.shape[-1] - 1)
    return (pick if ids is None else ids.gather(-1, pick))[:, 0]


def _nucleus(probs, top_p: float):
    """The nucleus of each row of probs (B, V): (kept (B, k), ids (B, k)), ids ascending, kept the
    probability of ids where it is in the nucleus and 0 where not. Token i (in descending order)
    is in iff the mass before it is < top_p. Sorting the whole vocabulary each step is the
    costly part; the nucleus usually lies within the top few dozen tokens, so look there first:
    when the mass before a row's k-th largest already reaches top_p, the top k decide the row
    (topk's values are the sort's first k, and the cumulative sum of the first k is the same
    numbers: on CPU it accumulates one element at a time in double). The CDF over the k ids in
    vocabulary order is the CDF over the whole vocabulary with the tokens outside set to 0 (at
    the tokens in: adding 0 changes no sum), so sample_rows draws the ids it drew from that."""
    V = probs.shape[-1]
    for k in (min(64, V), min(1024, V), V):
        top, idx = probs.topk(k, -1) if k < V else probs.sort(-1, descending=True)  # (B, k)
        before = top.cumsum(-1) - top  # (B, k) mass of the more likely tokens
        if k == V or bool((before[:, -1] >= top_p).all()):
            ids, order = idx.sort(-1)
            return (top * (before < top_p)).gather(-1, order), ids


@functools.lru_cache(maxsize=8)
def _may_end_stop(tok, stop: tuple[str, ...], vocab: int) -> list[bool]:
    """[vocab] bools: tokens that could complete a stop string (their text holds a stop string's
    last character, or a partial UTF-8 byte), so a row's tail is decoded only after them."""
    if any(not s or s[-1].isspace() for s in stop):  # spaces decode apart from context: check all
        return [True] * vocab
    n = min(vocab, len(tok))
    pieces = tok.batch_decode([[i] for i in range(n)])
    ends = {s[-1] for s in stop} | {"\ufffd"}
    return [any(c in p for c in ends) for p in pieces] + [True] * (vocab - n)


def end_ids(model, tok) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and each eos id of the model's generation
    config (Llama-3-Instruct lists <|end_of_text|> and <|eot_id|>; its chat turns end with the
    second), as transformers' own generate stops at."""
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if cfg is None else [cfg] if isinstance(cfg, int) else list(cfg)
    return sorted({int(i) for i in ids} | ({tok.eos_token_id} - {None}))


class _RowEnd:
    """Where a row's generated ids end: an end id, a stop string, or max_new_tokens."""

    def __init__(self, model, tok, stop: tuple[str, ...], max_new_tokens: int):
        self.tok, self.stop, self.max_new_tokens = tok, tuple(stop), max_new_tokens
        self.ends = set(end_ids(model, tok))
        self.window = max((len(s) for s in stop), default=0) + 2  # tokens that hold a stop string
        self.may_stop = None

    def check(self, ids: list[int], vocab: int) -> str | None:
        """ids: a row's generated ids, the newest last -> "eos", "stop", "length" or None."""
        token = ids[-1]
        if token in self.ends:
            return "eos"
        if self.stop:
            if self.may_stop is None:
                self.may_stop = _may_end_stop(self.tok, self.stop, vocab)
            if self.may_stop[token]:  # decode only tails that may complete a stop string
                tail = self.tok.decode(ids[-self.window:])
                if any(s in tail for s in self.stop):
                    return "stop"
        return "length" if len(ids) >= self.max_new_tokens else None

    def output(self, ids: list[int], finish: str) -> dict:
        """{"ids": generated ids (the end id kept if produced), "text": decoded text cut at a stop
        string, "finish": "eos" | "stop" | "length" (cut by max_new_tokens: truncated)}."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            text = text.split(s)[0]
        return {"ids": ids, "text": text, "finish": finish}


def _uniforms(seed: int, n: int) -> list[float]:
    """The n uniforms a row draws its tokens with: a CPU generator of its own, seeded by it."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()


def slots_supported(model) -> bool:
    """The Sampler holds every layer's keys and values at full length, and its decode steps
    attend through _shared_prefix_attention: it serves models whose layers are all full
    attention, loaded with sdpa or eager attention (its prompts run through the model's own
    attention, and the flash-attention kernels were never checked against it)."""
    layers = DynamicCache(config=model.config).layers
    return (model.config._attn_implementation in ("sdpa", "eager")
            and all(type(layer) is DynamicLayer for layer in layers))


class _KVBuffer(CacheLayerMixin):
    """One attention layer's keys and values, allocated once: (b, kv_heads, capacity, head_dim)
    each. A forward writes its q new positions in place at [:, :, length:length + q] and attends
    to the views [:, :, :length + q]: the shapes transformers' DynamicLayer builds with torch.cat,
    so the same attention, without copying the layer's whole cache every step. The Sampler
    computes a prompt through it (b = 1, capacity = the prompt), after `seed`ing it with the
    keys and values of a beginning computed before."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        """Shapes, dtype and device (and under TP this rank's heads) as the first forward gives."""
        self.keys = key_states.new_empty((*key_states.shape[:2], self.capacity,
                                          key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], self.capacity,
                                              value_states.shape[-1]))
        self.is_initialized = True

    def seed(self, keys, values):
        """Start from positions computed before: keys, values (h, k, d) -> positions [0, k)."""
        self.lazy_initialization(keys[None], values[None])
        k = keys.shape[1]
        self.keys[0, :, :k], self.values[0, :, :k], self.length = keys, values, k

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states (b, h, q, d_k), value_states (b, h, q, d_v) -> every position so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # (kv_length, kv_offset), as DynamicLayer

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices` (n,), moved to the front of the same buffers; only the filled
        positions are copied, and no second buffer is allocated."""
        n, end = len(indices), self.length
        self.keys[:n, :, :end] = self.keys[indices, :, :end]
        self.values[:n, :, :end] = self.values[indices, :, :end]
        self.keys, self.values = self.keys[:n], self.values[:n]


def _kv_cache(model, capacity: int):
    """A transformers Cache for `model`, laid out from its config as the model's own default
    DynamicCache (one layer per decoder layer), with every full-attention layer a _KVBuffer. The
    other kinds (sliding-window, linear-attention, shared-KV layers) keep transformers' own
    layer: their memory is bounded by the window or the state size."""
    layers = DynamicCache(config=model.config).layers
    return Cache(layers=[_KVBuffer(capacity) if type(layer) is DynamicLayer else layer
                         for layer in layers])


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                             **kwargs):
    """The Sampler's decode attention (the attention implementation "shared_prefix"): each row
    attends to its prompt, whose keys and values are held once for all the rows that share it,
    and to its own positions, in one softmax over both.

    query (b, H, 1, d): the b live rows' new positions, H = h x g query heads (head j reads kv
    head j // g, as repeat_kv); key, value (b, h, kv, d): each row's own positions
    (_SlotLayer.update). kwargs["shared_prefix"] is the Sampler's step: G groups of rows, group
    k's prompt in this layer's prefix_keys / prefix_values [k] (G, h, P, d); `pack` (G x r,): the
    row at each of a group's r places (a group with fewer rows repeats row 0 there, and nothing
    reads what it gives), `unpack` (b,): each row's place. attention_mask (b, 1, 1, P + kv): the
    prompt positions and own positions each row sees. A group's rows multiply their queries with
    the prompt's keys in one matrix product, (r x g, d) @ (d, P): the prompt is read once per
    group, not once per row (64 rows of one 730-token prompt: 64 times fewer bytes).

        s = [q K_prompt^T, q K_own^T] x scaling      (b, h, g, P + kv), masked to -inf
        p = softmax(s)                               float32, over the prompt and the own part
        o = p[..., :P] V_prompt + p[..., P:] V_own   (b, h, g, d)
    """
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap") or \
            kwargs.get("s_aux") is not None:
        raise NotImplementedError("shared_prefix attention: full attention only (slots_supported)")
    step = kwargs["shared_prefix"]
    layer = step["layers"][module.layer_idx]
    b, H, _, d = query.shape
    h, kv = key.shape[1], key.shape[2]
    g, G, r, P = H // h, step["groups"], step["places"], step["prompt_len"]
    pack, unpack = step["pack"], step["unpack"]

    def grouped(x):  # (b, h, g, n) -> (G, h, r x g, n): each group's rows side by side
        return x[pack].view(G, r, h, g, -1).transpose(1, 2).reshape(G, h, r * g, x.shape[-1])

    def per_row(y):  # (G, h, r x g, n) -> (b, h, g, n)
        return y.view(G, h, r, g, -1).transpose(1, 2).reshape(G * r, h, g, y.shape[-1])[unpack]

    q = query.reshape(b, h, g, d)
    s_prompt = per_row(grouped(q) @ layer.prefix_keys[:G, :, :P].transpose(-1, -2))  # (b,h,g,P)
    s_own = q @ key.transpose(-1, -2)  # (b, h, g, kv)
    s = torch.cat([s_prompt, s_own], -1).float().mul_(scaling)
    p = s.masked_fill_(~attention_mask, -math.inf).softmax(-1).to(query.dtype)
    p_prompt, p_own = p.split([P, kv], -1)
    out = per_row(grouped(p_prompt) @ layer.prefix_values[:G, :, :P]) + p_own @ value
    return out.reshape(b, 1, H, d), None  # (b, q_len, H, d), as sdpa_attention_forward


AttentionInterface.register("shared_prefix", _shared_prefix_attention)


@contextlib.contextmanager
def _attention(model, implementation: str):
    """Run the model's attention layers with `implementation` inside the block (they look it
    up in their config at every forward)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _grown(old, rows: int, length: int, like):
    """Zeros (rows, h, length, d) shaped and typed as `like` (h, k, d): keys and values each
    after their own (their head dims may differ), with `old`'s content kept. Zeros,
    not empty: attention weighs unfilled columns by exactly 0, but 0 x NaN (what fresh memory
    can hold) is NaN."""
    new = like.new_zeros((rows, like.shape[0], length, like.shape[-1]))
    if old is not None:
        new[:old.shape[0], :, :old.shape[2]] = old
    return new


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values in the Sampler, each position held once:

      prefix_keys / prefix_values  (groups, kv_heads, prompt capacity, head_dim): group k holds
                                   one prompt, for all the live rows that share it
      keys / values                (slots, kv_heads, max_new_tokens, head_dim): slot s holds its
                                   row's own positions (the tokens fed back) from column 0 on

    A decode step writes row s's new key at column lens[s] and returns [:b, :, :kv], the b live
    slots, kv = longest + 1; _shared_prefix_attention reads both parts."""

    def __init__(self, step: dict):
        super().__init__()
        self.step = step  # shared by all layers: the Sampler's, see _decode
        self.keys = self.values = self.prefix_keys = self.prefix_values = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states (b, h, 1, d) of the b live slots -> their own keys and values (b, h, kv, d)."""
        rows, lens, kv = self.step["rows"], self.step["lens"], self.step["kv"]
        self.keys[rows, :, lens] = key_states[:, :, 0]  # (b, h, d) at column lens[s] of slot s
        self.values[rows, :, lens] = value_states[:, :, 0]
        b = len(rows)
        return self.keys[:b, :, :kv], self.values[:b, :, :kv]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.step["kv"], 0

    def get_seq_length(self) -> int:
        return self.step["kv"] - 1

    def get_max_length(self) -> int:
        return -1 if self.keys is None else self.keys.shape[2]

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("the Sampler allocates its slots before the first step")


class Sampler:
    """Continuous batching over `batch_size` KV slots, each distinct prompt computed and held once.

        sampler = Sampler(model, tok, batch_size=64, temperature=0.7, top_p=0.95,
                          max_new_tokens=256, stop=("Question:",))
        sampler.add(key, prompt_ids, seed)        # any number, also between results
        for key, out in sampler.results():        # each row as soon as it has finished
            ...                                   # may add() more rows here

    A row waits in a queue until a slot is free. Joining, it takes its prompt's keys and values
    (computed once per distinct prompt: `_prompt`), samples its first token from the prompt's
    last logits, and from then on takes part in every decode step: one forward of (b, 1) tokens,
    the b live rows side by side in slots [0, b). A row that finishes frees its slot for the
    next waiting one in the same step; with nobody waiting, the last live slots move into the
    holes so that the live rows stay [0, b). `refill=False` admits rows only into an empty
    batch (static batches, as before); `share_prompts=False` computes every row's prompt anew.

    Memory: the live rows' prompts are held once each, in the group slots (_SlotLayer), and the
    rows' slots hold only their own positions: n rows of one P-token prompt hold P + n x
    max_new_tokens positions, where a static batch held n x (P + max_new_tokens). The prompts
    kept for reuse hold at most an eighth of the positions the slots would hold unshared (least
    recently used first out), besides those that queued rows still need. Under --tp every rank
    runs the same rows in the same order (the bookkeeping is on the host and deterministic)."""

    def __init__(self, model, tok, batch_size: int, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, stop: tuple[str, ...] = (), share_prompts: bool = True,
                 refill: bool = True):
        self.model, self.slots = model, max(1, batch_size)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.share, self.refill = share_prompts, refill
        self.row_end = _RowEnd(model, tok, stop, max_new_tokens)
        self.device = next(model.parameters()).device
        self.queue = deque()  # (key, prompt ids, seed) waiting for a slot
        self.waiting = {}  # prompt ids (tuple) -> rows of it in the queue
        self.prompts = OrderedDict()  # prompt ids (tuple) -> (kv [(k, v) (h, P, d)], logits (V,))
        self.live = []  # per slot [0, b): [key, generated ids, uniforms, prompt ids]
        self.lens, self.next, self.group = [], [], []  # per slot: own positions filled; the
        # token it feeds next; its group
        self.groups = {}  # prompt ids -> [group, live rows], for the prompts of live rows
        self.group_len, self.free_groups = [], []  # per group: prompt length (0: free); free ones
        self.step = {"rows": None, "lens": None, "kv": 1}  # the decode step's (_decode)
        self.cache = Cache(layers=[_SlotLayer(self.step) for _ in
                                   range(model.config.get_text_config().num_hidden_layers)])
        self.allocated, self.finished = 0, deque()  # row slots allocated; finished rows
        self.prompt_capacity = 0  # positions of each group slot
        self.computed = 0  # prompt positions run through the model (the rest were reused)

    def add(self, key, prompt: list[int], seed: int = 0):
        ids = tuple(prompt)
        self.queue.append((key, ids, seed))
        self.waiting[ids] = self.waiting.get(ids, 0) + 1

    @torch.no_grad()
    def results(self):
        """Yield (key, output) for every added row (rows added meanwhile included), in the
        order they finish. output: _RowEnd.output."""
        while self.queue or self.live or self.finished:
            if self.refill or not self.live:
                while self.queue and len(self.live) < self.slots:
                    self._join(*self.queue.popleft())
            while self.finished:
                yield self.finished.popleft()
            if self.live:
                self._decode()
                while self.finished:
                    yield self.finished.popleft()

    def _prompt(self, ids: tuple):
        """(kv, logits) of a prompt: its keys and values per layer [(k, v) (h, P, d)] and its last
        position's logits (V,). Computed once and kept while rows wait for it; a prompt that
        begins like a kept one (the longest common beginning, k positions) computes only its
        own positions [k, P): the keys and values of a position depend on it and the ones
        before it only."""
        if self.share and ids in self.prompts:
            self.prompts.move_to_end(ids)
            return self.prompts[ids]
        k, base = 0, None
        for other in self.prompts if self.share else ():
            n = _common_length(ids, other)
            if n > k:
                k, base = n, other
        k = min(k, len(ids) - 1)  # the last position is run for its logits
        cache = Cache(layers=[_KVBuffer(len(ids)) for _ in self.cache.layers])
        if k:
            for layer, (keys, values) in zip(cache.layers, self.prompts[base][0]):
                layer.seed(keys[:, :k], values[:, :k])
        logits = self.model(input_ids=torch.tensor([ids[k:]], device=self.device),
                            position_ids=torch.arange(k, len(ids), device=self.device)[None],
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        self.computed += len(ids) - k
        entry = ([(layer.keys[0], layer.values[0]) for layer in cache.layers], logits)
        if self.share:
            self.prompts[ids] = entry
            self._evict()
        return entry

    def _evict(self):
        """Forget the least recently used prompts that no waiting row needs, while the kept ones
        hold more than an eighth of the positions the slots would hold unshared (and more than
        two prompts)."""
        budget = self.allocated * (self.prompt_capacity + self.max_new_tokens) // 8
        held = sum(len(ids) for ids in self.prompts)
        for ids in list(self.prompts):
            if held <= budget or len(self.prompts) <= 2:
                break
            if not self.waiting.get(ids):
                held -= len(ids)
                del self.prompts[ids]

    def _join(self, key, ids: tuple, seed: int, slot: int | None = None) -> bool:
        """Row `key` takes its prompt's keys and values and its first token, and then `slot`
        (default: a new one after the live ones), unless that token already ends it."""
        kv, logits = self._prompt(ids)
        self.waiting[ids] -= 1
        if not self.waiting[ids]:
            del self.waiting[ids]
        u = _uniforms(seed, self.max_new_tokens) if self.temperature > 0 else None
        token = sample_rows(logits[None], self.temperature, self.top_p,
                            None if u is None else torch.tensor(u[:1], device=self.device))
        row = [key, [int(token)], u, ids]
        if (why := self.row_end.check(row[1], logits.shape[-1])) is not None:
            self.finished.append((key, self.row_end.output(row[1], why)))
            return False
        rows = len(self.live) + (slot is None)
        if rows > self.allocated:  # grow (rarely: a few times a run), as the rows at hand need
            self.allocated = min(self.slots, max(rows + len(self.queue), self.allocated))
            for layer, (keys, values) in zip(self.cache.layers, kv):
                # a row feeds back at most max_new_tokens - 1 tokens: the last one ends it
                layer.keys = _grown(layer.keys, self.allocated, self.max_new_tokens, keys)
                layer.values = _grown(layer.values, self.allocated, self.max_new_tokens, values)
        if slot is None:
            slot = len(self.live)
            self.live.append(None), self.lens.append(0), self.next.append(0)
            self.group.append(0)
        self.live[slot], self.lens[slot], self.next[slot] = row, 0, row[1][0]
        self.group[slot] = self._enter_group(ids, kv)
        return True

    def _enter_group(self, ids: tuple, kv) -> int:
        """The group of prompt `ids` for one more live row; its first row takes a free group
        and copies the prompt's keys and values into it."""
        if ids in self.groups:
            self.groups[ids][1] += 1
            return self.groups[ids][0]
        g = self.free_groups.pop() if self.free_groups else len(self.group_len)
        if g == len(self.group_len):
            self.group_len.append(0)
        layers = self.cache.layers
        groups = 0 if layers[0].prefix_keys is None else layers[0].prefix_keys.shape[0]
        if g >= groups or len(ids) > self.prompt_capacity:  # grow: rarely, geometrically
            groups = min(self.slots, max(g + 1, 2 * groups))
            self.prompt_capacity = max(len(ids), self.prompt_capacity * 3 // 2)
            for layer, (keys, values) in zip(layers, kv):
                layer.prefix_keys = _grown(layer.prefix_keys, groups, self.prompt_capacity, keys)
                layer.prefix_values = _grown(layer.prefix_values, groups, self.prompt_capacity,
                                             values)
        for layer, (keys, values) in zip(layers, kv):
            layer.prefix_keys[g, :, :len(ids)] = keys
            layer.prefix_values[g, :, :len(ids)] = values
        self.group_len[g], self.groups[ids] = len(ids), [g, 1]
        return g

    def _leave_group(self, slot: int):
        """Slot `slot`'s row has finished: its group has one row less, and none frees it."""
        entry = self.groups[self.live[slot][3]]
        entry[1] -= 1
        if not entry[1]:
            del self.groups[self.live[slot][3]]
            self.group_len[entry[0]] = 0
            self.free_groups.append(entry[0])

    def _decode(self):
        """One forward of the b live rows' next tokens; each samples its following one. The
        step tells _SlotLayer where each row writes and _shared_prefix_attention which rows
        share a prompt: the G groups in use, each with r places (its rows, padded)."""
        b, dev = len(self.live), self.device
        lens = torch.tensor(self.lens, device=dev)  # (b,) own positions filled: where each writes
        kv = max(self.lens) + 1
        G = max(self.group) + 1
        members = [[] for _ in range(G)]
        for s, g in enumerate(self.group):
            members[g].append(s)
        r = max(map(len, members))
        pack = [m[k] if k < len(m) else 0 for m in members for k in range(r)]  # (G x r,)
        unpack = [0] * b  # (b,)
        for g, m in enumerate(members):
            for k, s in enumerate(m):
                unpack[s] = g * r + k
        prompt_len = torch.tensor([self.group_len[g] for g in self.group], device=dev)  # (b,)
        P = max(self.group_len[:G])
        sees_prompt = torch.arange(P, device=dev)[None, :] < prompt_len[:, None]  # (b, P)
        sees_own = torch.arange(kv, device=dev)[None, :] <= lens[:, None]  # (b, kv)
        mask = torch.cat([sees_prompt, sees_own], 1)[:, None, None, :]  # (b, 1, 1, P + kv)
        self.step.update(rows=torch.arange(b, device=dev), lens=lens, kv=kv, groups=G, places=r,
                         prompt_len=P, pack=torch.tensor(pack, device=dev),
                         unpack=torch.tensor(unpack, device=dev))
        # the layers ride in the step only for this forward: held there for good, they and the
        # step would form a cycle (step -> layers -> step) that keeps a finished Sampler's
        # buffers alive until Python's cycle collector runs (08: ~1 GB more per answer)
        self.step["layers"] = self.cache.layers
        try:
            with _attention(self.model, "shared_prefix"):
                logits = self.model(input_ids=torch.tensor(self.next, device=dev)[:, None],
                                    position_ids=(prompt_len + lens)[:, None], attention_mask=mask,
                                    past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                                    shared_prefix=self.step).logits[:, -1]  # (b, V)
        finally:
            del self.step["layers"]
        u = None
        if self.temperature > 0:
            u = torch.tensor([row[2][len(row[1])] for row in self.live], device=dev)  # (b,)
        tokens = sample_rows(logits, self.temperature, self.top_p, u).tolist()  # the host sync
        holes = []
        for s, token in enumerate(tokens):
            row = self.live[s]
            row[1].append(token)
            self.lens[s] += 1
            self.next[s] = token
            if (why := self.row_end.check(row[1], logits.shape[-1])) is not None:
                self.finished.append((row[0], self.row_end.output(row[1], why)))
                self._leave_group(s)
                holes.append(s)
        self._fill(holes)

    def _fill(self, holes: list[int]):
        """Finished slots take waiting rows in place (refill); the holes left are closed by
        moving the last live slot into each, largest hole first, so the live rows stay [0, b)."""
        left = []
        for s in holes:
            while self.refill and self.queue:
                if self._join(*self.queue.popleft(), slot=s):
                    break
            else:
                left.append(s)
        for s in sorted(left, reverse=True):
            last = len(self.live) - 1  # live: every larger hole is gone already
            if s != last:
                n = self.lens[last]
                for layer in self.cache.layers:
                    layer.keys[s, :, :n] = layer.keys[last, :, :n]
                    layer.values[s, :, :n] = layer.values[last, :, :n]
                self.live[s], self.lens[s], self.next[s], self.group[s] = \
                    self.live[last], self.lens[last], self.next[last], self.group[last]
            self.live.pop(), self.lens.pop(), self.next.pop(), self.group.pop()


def _common_length(a: tuple, b: tuple) -> int:
    """Length of the longest common beginning of two id tuples (binary search on slices: each
    comparison runs in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
def generate(model, tok, prompts: list[list[int]], seeds: list[int] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
             stop: tuple[str, ...] = (), batch_size: int | None = None,
             share_prompts: bool = True, refill: bool = True) -> list[dict]:
    """Continue each prompt (token ids, BOS included) with at most max_new_tokens tokens, at most
    batch_size rows at a time (default: all); a row stops at any end id (end_ids), at any stop
    string, or after max_new_tokens. Row i draws its step-t token with uniform t of its own CPU
    generator seeded by seeds[i], so its text does not depend on the device or the batch.
    Returns, in the prompts' order, [{"ids": generated ids (the end id kept if produced), "text":
    decoded text cut at a stop string, "finish": "eos" | "stop" | "length" (cut by
    max_new_tokens: truncated)}]. Runs a Sampler (share_prompts, refill: see there), or
    _generate_static where the slots cannot serve the model (slots_supported)."""
    seeds = list(seeds) if seeds is not None else [0] * len(prompts)
    batch_size = batch_size or max(1, len(prompts))
    kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop)
    if not slots_supported(model):
        return [out for s in range(0, len(prompts), batch_size) for out in _generate_static(
            model, tok, prompts[s:s + batch_size], seeds[s:s + batch_size], **kw)]
    sampler = Sampler(model, tok, batch_size, share_prompts=share_prompts, refill=refill, **kw)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        sampler.add(i, prompt, seed)
    outs = [None] * len(prompts)
    for i, out in sampler.results():
        outs[i] = out
    return outs


@torch.no_grad()
def _generate_static(model, tok, prompts: list[list[int]], seeds: list[int],
                     temperature: float, top_p: float, max_new_tokens: int,
                     stop: tuple[str, ...]) -> list[dict]:
    """generate as one static batch: left padding and a KV cache allocated once (_KVBuffer; a
    sliding-window or linear-attention layer keeps transformers' own). A finished row stays in
    the batch, its tokens ignored, until a quarter of the batch has finished; then the finished
    rows leave the batch and the cache together. One host sync per step."""
    device = next(model.parameters()).device
    row_end = _RowEnd(model, tok, stop, max_new_tokens)
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
    # the attention mask of every step, written once: the prompts' padding, then ones
    mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)  # (B, P + N)
    mask[:, :P] = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    pos = position_ids(mask[:, :P])  # (B, P): a row's first real token is position 0
    u = None
    if temperature > 0:
        u = torch.tensor([_uniforms(s, max_new_tokens) for s in seeds],
                         device=device)  # (B, max_new_tokens)
    ids = [[] for _ in range(B)]  # generated ids of each prompt, on the host
    finish = ["length"] * B
    live = list(range(B))  # the prompt of each batch row
    live_idx = torch.arange(B, device=device)  # (b,) the same, on the device
    running = [True] * B  # per batch row: False once finished (until the row leaves)
    past = _kv_cache(model, P + max_new_tokens)
    for t in range(max_new_tokens):
        # logits_to_keep=1: only the last position's logits, (b, 1, V); a 256 x 800-token
        # prefill at vocabulary 128,256 would otherwise build 52 GB of bf16 logits
        logits = model(input_ids=input_ids, attention_mask=mask[:, :P + t],
                       position_ids=pos, past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (b, V)
        nxt = sample_rows(logits, temperature, top_p, None if u is None else u[live_idx, t])
        for i, token in enumerate(nxt.tolist()):  # the step's one host sync
            if running[i]:
                ids[live[i]].append(token)
                if (why := row_end.check(ids[live[i]], logits.shape[-1])) is not None:
                    finish[live[i]], running[i] = why, False
        done = running.count(False)
        if done == len(running):
            break
        # Leaving costs a copy of the filled cache of every row that stays; waiting for a
        # quarter of the batch repays it within ~6 steps and keeps the copies few.
        if 4 * done >= len(running):
            keep = [i for i, r in enumerate(running) if r]
            keep_idx = torch.tensor(keep, device=device)
            past.batch_select_indices(keep_idx)
            live, running = [live[i] for i in keep], [True] * len(keep)
            live_idx, nxt = live_idx[keep_idx], nxt[keep_idx]
            mask, pos = mask[keep_idx], pos[keep_idx]
        input_ids = nxt[:, None]  # (b, 1): the cache holds everything before it
        pos = pos[:, -1:] + 1  # (b, 1)
    return [row_end.output(row_ids, why) for row_ids, why in zip(ids, finish)]
