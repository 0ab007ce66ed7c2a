"""accel's KV cache: preallocated, appended in place, per-layer state, per-head lengths.

``AccelCache`` is a ``transformers.Cache`` (the public extension point), made of ``AccelLayer``s.
Each layer keeps its keys/values in buffers of shape [B, Hkv, capacity, D]. New tokens are written
into the free tail of the buffer; no step re-concatenates the cache (HF's ``DynamicLayer`` copies the
whole cache every step). When the buffer is full it grows geometrically (x1.5, rounded to 256 tokens),
so over a generation of N tokens only O(log N) copies happen. ``AccelCache(reserve=n)`` preallocates
room for ``n`` tokens up front (the CLI passes prompt length + max_new_tokens).

Sliding-window layers (Gemma3, Mistral) keep a bounded buffer: the last ``window-1`` tokens are
moved to the front when the buffer fills, and ``update`` returns exactly what HF's
``DynamicSlidingWindowLayer`` returns, so masks and outputs are identical.

Per-head variable lengths: every layer carries ``head_lengths`` [B, Hkv] (int32), the number of
valid tokens of each KV head. In the dense layout all heads share one length; KV-compression
policies shrink heads individually and ``nbytes()`` reports what is actually held.

Compressed layers: ``compress(...)`` turns a full-attention layer into a ``RaggedKV`` (one row pool
per layer, a segment per KV head, ``accel.cache.ragged``) and frees the dense buffers, so the bytes
held really follow the per-head budgets. A compressed layer appends decode tokens to every head's
segment; KV-cache policies evict from it. ``update`` then returns the row pools as [1, 1, R, D]
views: only accel's attention reads them (through the per-head offsets).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_ROUND = 256


def _round_up(n: int, m: int = _ROUND) -> int:
    return ((n + m - 1) // m) * m


class AccelLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = True

    def __init__(self, sliding_window: int | None = None, reserve: int = 0, growth: float = 1.5):
        super().__init__()
        self.sliding_window = int(sliding_window) if sliding_window else None
        self.is_sliding = self.sliding_window is not None
        self.reserve = int(reserve)
        self.growth = float(growth)
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.start = 0  # first stored token in the buffer
        self.end = 0  # one past the last stored token
        self.cumulative_length = 0  # tokens ever appended (absolute position of the next token)
        self.head_lengths: torch.Tensor | None = None
        self.num_reallocations = 0
        self.ragged = None  # RaggedKV once a KV-cache policy compressed this layer
        #: bumped whenever stored tokens change other than by appending (reorder, batch selection, crop, reset,
        #: compression), so state a policy derives from the keys (e.g. Quest's page bounds) knows to rebuild
        self.version = 0
        #: [B] for each batch row, the row it was at the layer's last multi-token write (the prompt's prefill), kept
        #: through reorders (beam search) and batch selections, so per-row state a policy derived from the prompt
        #: (Flux's layer routes) follows its row; None before the first write
        self.rows: torch.Tensor | None = None
        #: multi-token writes so far (prompts and continued prompts): state read off a prompt records it, to know
        #: whether a later prompt was written without it
        self.prefills = 0

    # -- transformers' CacheLayerMixin API -------------------------------------------------------
    @property
    def keys(self):  # type: ignore[override]
        if self.ragged is not None:
            return self.ragged.k.view(1, 1, *self.ragged.k.shape)
        return None if self.k_buf is None else self.k_buf[:, :, self.start : self.end]

    @keys.setter
    def keys(self, value):
        if value is not None and self.k_buf is not None:
            self._replace(value, None)

    @property
    def values(self):  # type: ignore[override]
        if self.ragged is not None:
            return self.ragged.v.view(1, 1, *self.ragged.v.shape)
        return None if self.v_buf is None else self.v_buf[:, :, self.start : self.end]

    @values.setter
    def values(self, value):
        if value is not None and self.v_buf is not None:
            self._replace(None, value)

    def _replace(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Support external tools that assign ``layer.keys = tensor`` (e.g. compression presses)."""
        k = self.keys if k is None else k
        v = self.values if v is None else v
        n = k.shape[2]
        if v.shape[2] != n:  # the other half will be assigned next; keep both consistent then
            self._pending = (k, v)
            return
        cap = _round_up(max(n, 1))
        self.k_buf = torch.empty(k.shape[0], k.shape[1], cap, k.shape[3], dtype=k.dtype, device=k.device)
        self.v_buf = torch.empty_like(self.k_buf)
        self.k_buf[:, :, :n] = k
        self.v_buf[:, :, :n] = v
        self.start, self.end = 0, n
        self.head_lengths = torch.full((k.shape[0], k.shape[1]), n, dtype=torch.int32)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, Hkv, _, D = key_states.shape
        cap = _round_up(max(self.reserve, key_states.shape[2], 1))
        if self.is_sliding:
            cap = _round_up(max(2 * self.sliding_window, key_states.shape[2] + self.sliding_window))
        self.k_buf = torch.empty(B, Hkv, cap, D, dtype=key_states.dtype, device=key_states.device)
        self.v_buf = torch.empty(B, Hkv, cap, value_states.shape[3], dtype=value_states.dtype, device=value_states.device)
        self.start = self.end = 0
        self.head_lengths = torch.zeros(B, Hkv, dtype=torch.int32)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def _make_room(self, n_new: int) -> None:
        if self.end + n_new <= self.capacity:
            return
        if self.is_sliding:
            keep = min(self.end - self.start, self.sliding_window - 1)
            need = keep + n_new
            if need <= self.capacity:
                src = slice(self.end - keep, self.end)
                self.k_buf[:, :, :keep] = self.k_buf[:, :, src].clone()
                self.v_buf[:, :, :keep] = self.v_buf[:, :, src].clone()
                self.start, self.end = 0, keep
                return
            new_cap = _round_up(max(need, 2 * self.sliding_window))
            lo = self.end - keep
        else:
            need = self.end - self.start + n_new
            new_cap = _round_up(max(need, int(self.capacity * self.growth)))
            lo = self.start
        n_old = self.end - lo
        k_new = self.k_buf.new_empty(self.k_buf.shape[0], self.k_buf.shape[1], new_cap, self.k_buf.shape[3])
        v_new = self.v_buf.new_empty(self.v_buf.shape[0], self.v_buf.shape[1], new_cap, self.v_buf.shape[3])
        k_new[:, :, :n_old] = self.k_buf[:, :, lo : self.end]
        v_new[:, :, :n_old] = self.v_buf[:, :, lo : self.end]
        self.k_buf, self.v_buf = k_new, v_new
        self.start, self.end = 0, n_old
        self.num_reallocations += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.ragged is not None:
            for i in range(key_states.shape[2]):
                self.ragged.append(key_states[:, :, i : i + 1], value_states[:, :, i : i + 1], self.cumulative_length)
                self.cumulative_length += 1
            return self.keys, self.values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if q > 1 or self.rows is None:
            self.rows = torch.arange(key_states.shape[0])
            self.prefills += 1
        visible_before = self.end - self.start
        if self.is_sliding:
            visible_before = min(visible_before, self.sliding_window - 1)
        self._make_room(q)
        self.k_buf[:, :, self.end : self.end + q] = key_states
        self.v_buf[:, :, self.end : self.end + q] = value_states
        self.end += q
        self.cumulative_length += q
        lo = self.end - q - visible_before
        if self.is_sliding:
            # logically only the last window-1 tokens stay; storage is reclaimed lazily in _make_room
            self.start = max(self.start, self.end - (self.sliding_window - 1))
        self.head_lengths.fill_(self.end - self.start)
        return self.k_buf[:, :, lo : self.end], self.v_buf[:, :, lo : self.end]

    def room_for_one(self) -> int:
        """Make room for one more token and return the buffer position it goes to: for a kernel that writes the new
        keys and values itself (``accel.patching.fused.FusedDecode.run_stack``), followed by ``appended_one``."""
        self._make_room(1)
        return self.end

    def appended_one(self) -> None:
        """Account for one token written at position ``end`` by a kernel (what ``update`` does after its copy)."""
        self.end += 1
        self.cumulative_length += 1
        self.head_lengths.fill_(self.end - self.start)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        w = self.sliding_window
        kv_offset = max(self.cumulative_length - w + 1, 0)
        if self.cumulative_length >= w:
            return w - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.version += 1
        self.ragged = None
        self.rows = None
        self.start = self.end = 0
        self.cumulative_length = 0
        if self.head_lengths is not None:
            self.head_lengths.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.version += 1
        if self.rows is not None:
            self.rows = self.rows[beam_idx.cpu()]
        if self.ragged is not None:
            self.ragged.select_batch(beam_idx)
            self.head_lengths = self.ragged.lengths
            return
        if self.k_buf is not None:
            self.k_buf = self.k_buf.index_select(0, beam_idx.to(self.k_buf.device))
            self.v_buf = self.v_buf.index_select(0, beam_idx.to(self.v_buf.device))
            self.head_lengths = self.head_lengths.index_select(0, beam_idx.cpu())

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("AccelLayer.crop takes a negative number of tokens to remove, like DynamicLayer")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        self.version += 1
        if self.ragged is not None:
            from ..errors import AccelError

            raise AccelError("a compressed (KV-policy) cache layer cannot be cropped; start a new cache instead")
        if self.is_sliding and self.cumulative_length >= self.sliding_window:
            raise RuntimeError("cannot crop a sliding-window layer past its window")
        self.end -= n
        self.cumulative_length -= n
        self.head_lengths.fill_(self.end - self.start)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.version += 1
        if self.rows is not None:
            self.rows = self.rows.repeat_interleave(repeats)
        if self.ragged is not None:
            self.ragged.select_batch(torch.arange(self.ragged.shape[0]).repeat_interleave(repeats))
            self.head_lengths = self.ragged.lengths
            return
        if self.k_buf is not None:
            self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
            self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
            self.head_lengths = self.head_lengths.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.version += 1
        if self.rows is not None:
            self.rows = self.rows[indices.cpu()]
        if self.ragged is not None:
            idx = torch.arange(self.ragged.shape[0])[indices]
            self.ragged.select_batch(idx)
            self.head_lengths = self.ragged.lengths
            return
        if self.k_buf is not None:
            self.k_buf = self.k_buf[indices]
            self.v_buf = self.v_buf[indices]
            self.head_lengths = self.head_lengths[indices.cpu()]

    def offload(self):  # accel keeps its buffers where they are
        return None

    def prefetch(self):
        return None

    # -- accel API ---------------------------------------------------------------------------------
    def compress(self, keep: torch.Tensor, counts: torch.Tensor, caps: torch.Tensor,
                 scores: torch.Tensor | None = None) -> None:
        """Keep, per KV head, the tokens ``keep[b, h, :counts[b, h]]`` (indices into the current
        ``keys`` view) in a ragged pool with ``caps[b, h]`` rows per head, and free the dense buffers.

        ``scores`` ([B, Hkv, T], optional) seeds each kept token's eviction score."""
        from .ragged import RaggedKV

        if self.is_sliding:
            raise ValueError("sliding-window layers are bounded already; accel compresses full-attention layers only")
        if self.ragged is not None:
            raise ValueError("this layer is compressed already")
        self.version += 1
        keys, values = self.keys, self.values
        T = keys.shape[2]
        positions = (self.cumulative_length - T + torch.arange(T)).view(1, T).expand(keys.shape[0], T)
        self.ragged = RaggedKV.from_dense(keys, values, keep, counts, caps, positions=positions, scores=scores)
        self.k_buf = self.v_buf = None  # the memory of what was not kept is released here
        self.start = self.end = 0
        self.head_lengths = self.ragged.lengths

    def nbytes(self) -> int:
        """Bytes of KV actually held (valid tokens of every head), not the reserved capacity."""
        if self.ragged is not None:
            return self.ragged.nbytes()
        if self.k_buf is None:
            return 0
        per_token = self.k_buf.shape[3] * self.k_buf.element_size() + self.v_buf.shape[3] * self.v_buf.element_size()
        return int(self.head_lengths.sum().item()) * per_token

    def allocated_bytes(self) -> int:
        """Bytes really allocated for this layer (buffers with their spare room; pools and metadata)."""
        if self.ragged is not None:
            return self.ragged.allocated_bytes()
        if self.k_buf is None:
            return 0
        return self.k_buf.numel() * self.k_buf.element_size() + self.v_buf.numel() * self.v_buf.element_size()


class AccelCache(Cache):
    """A ``transformers.Cache`` of ``AccelLayer``s, one per decoder layer.

    Args:
        config: the model config; sliding-window layers are read from ``layer_types`` /
            ``sliding_window`` exactly as transformers' ``DynamicCache`` does.
        reserve: tokens to preallocate per layer (0 = size of the first update).
        num_layers: used when no config is given.
    """

    def __deepcopy__(self, memo):
        """A deep copy, with a deep copy of the policies' sequence state (``accel.cache.sequences``), so a branched
        conversation continues exactly as the original would."""
        import copy

        from . import sequences

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        sequences.copy_state(self, new, memo)
        return new

    def __init__(self, config=None, reserve: int = 0, num_layers: int | None = None):
        windows: list[int | None]
        if config is not None:
            from transformers.cache_utils import get_layer_types_and_kwargs

            dec = config.get_text_config(decoder=True)
            types, kwargs = get_layer_types_and_kwargs(dec)
            windows = []
            for t, kw in zip(types, kwargs):
                if t in ("full_attention",):
                    windows.append(None)
                elif t in ("sliding_attention", "chunked_attention") and kw.get("sliding_window"):
                    windows.append(int(kw["sliding_window"]))
                else:
                    from ..errors import UnsupportedModelError

                    raise UnsupportedModelError(
                        f"accel's cache does not support layer type {t!r} (only full and sliding attention)"
                    )
        else:
            windows = [None] * int(num_layers or 0)
        self.reserve = reserve
        super().__init__(layers=[AccelLayer(sliding_window=w, reserve=reserve) for w in windows])

    def nbytes(self) -> int:
        """KV bytes actually held by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    @property
    def num_reallocations(self) -> int:
        return sum(layer.num_reallocations for layer in self.layers)
