"""The local teacher's synchronous engine: batched generation, label scoring and answer logprobs.

Everything here is plain blocking Python over a transformers causal LM; ``LocalTeacher`` (``local.py``) runs it on a
worker thread for the async gateway, and the dataset builder / trainer call it directly.

Shared-prefix KV cache: when the rows of a batch start with the same tokens (a long fixed instruction, a 77-intent
taxonomy, few-shot examples), those tokens are run through the model once, at batch size 1, and their keys/values
are copied to every row. Rows then differ only in their suffix. The token ids fed to the model are the same with
and without the cache, so results agree up to float rounding.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distillgate.errors import UserError
from distillgate.teachers.base import TeacherCard

#: A prompt is raw text, or chat messages rendered with the model's chat template (generation prompt added).
Prompt = str | Sequence[Mapping[str, Any]]

#: Fewer shared tokens than this are not worth a separate prefix pass.
MIN_PREFIX_TOKENS = 8
#: Prefix keys/values kept between calls (least recently used dropped first). A SmolLM2-135M prefix costs about
#: 46 KB per token in float32, so four 1,000-token prefixes hold ~180 MB.
PREFIX_CACHE_ENTRIES = 4
#: A kept prefix is reused when a freshly computed one would be at most this many tokens longer.
PREFIX_REUSE_SLACK = 32

KV = list[tuple[torch.Tensor, torch.Tensor]]
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. ``temperature == 0`` means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def check(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2] (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs})")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            problems.append("stop takes at most 4 non-empty strings")
        if problems:
            raise UserError("invalid sampling parameters: " + "; ".join(problems),
                            hint="fix the listed values (OpenAI chat-completions semantics)")


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token, its log-probability under the model (temperature 1) and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token, logprob), best first


@dataclass
class Generation:
    """One finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class AnswerLogprobs:
    """Teacher log-probabilities over an answer given a prompt (for KD with the same tokenizer)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    token_logprobs: torch.Tensor  # (A,) log p(answer_t | prompt, answer_<t)
    top_ids: torch.Tensor  # (A, k)
    top_logprobs: torch.Tensor  # (A, k)


#: Called with (row index, new text) while generating; used for streaming.
DeltaCallback = Callable[[int, str], None]


@dataclass
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    max_new: int = 0


class LocalModel:
    """A causal LM and its tokenizer, with the batched operations a teacher needs. Not thread-safe: one caller."""

    def __init__(self, model: Any, tokenizer: Any, card: TeacherCard, *, model_name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._card = card
        self.model_name = model_name
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(gen_eos)
        self.eos_ids = frozenset(int(i) for i in eos if i is not None)
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self._prefixes: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.prefix_stats = {"hits": 0, "misses": 0}

    # ------------------------------------------------------------------ prompts
    def card(self) -> TeacherCard:
        return self._card

    def render(self, prompt: Prompt) -> str:
        """Chat messages -> the chat-templated text ending in the assistant generation prompt; text -> itself."""
        if isinstance(prompt, str):
            return prompt
        if not self.tokenizer.chat_template:
            raise UserError(f"model {self.model_name!r} has no chat template",
                            hint="send a plain-text prompt (completions) or use a chat model")
        text = self.tokenizer.apply_chat_template([dict(m) for m in prompt], tokenize=False,
                                                  add_generation_prompt=True)
        return str(text)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (the chat template already holds its special tokens)."""
        ids = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # --------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 *, prefix_cache: bool = True, on_delta: DeltaCallback | None = None) -> list[Generation]:
        """Generate one completion per prompt, all rows in one padded batch (rows may carry their own params).

        Rows sharing a leading token prefix get it computed once and kept for later calls (``prefix_cache``, see
        ``_shared_prefix``): a single chat request with a long system prompt reuses it too. With a ``seed``, a row's
        sampling is reproducible. ``on_delta(row, text)`` receives new text as it is produced.
        """
        if not prompts:
            return []
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(plist)} sampling params",
                            hint="pass one SamplingParams, or one per prompt")
        rows = []
        for prompt, p in zip(prompts, plist, strict=True):
            p.check()
            ids = self.encode(prompt)
            if not ids:
                raise UserError("empty prompt", hint="send at least one token of prompt text")
            room = self.context_length - len(ids)
            if room < 1:
                raise UserError(f"prompt has {len(ids)} tokens; the context holds {self.context_length}",
                                hint="shorten the prompt")
            gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            rows.append(_Row(ids, p, gen, max_new=min(p.max_tokens, room)))
        heads = ([self.head_length(pr, r.prompt_ids) for pr, r in zip(prompts, rows, strict=True)]
                 if prefix_cache else [])
        self._run(rows, prefix_cache=prefix_cache, on_delta=on_delta, heads=heads)
        return [
            Generation(r.text, r.out_ids, r.finish or "length", len(r.prompt_ids),
                       r.logprobs if r.params.logprobs else None)
            for r in rows
        ]

    def _run(self, rows: list[_Row], *, prefix_cache: bool, on_delta: DeltaCallback | None,
             heads: Sequence[int] = ()) -> None:
        from transformers import DynamicCache

        ids_list = [r.prompt_ids for r in rows]
        kv, plen = self._shared_prefix(ids_list, heads) if prefix_cache else ([], 0)
        cache = DynamicCache(ddp_cache_data=_expand(kv, len(rows))) if kv else DynamicCache()
        suffixes = [ids[plen:] for ids in ids_list]
        width = max(len(s) for s in suffixes)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((batch, plen + width), dtype=torch.long)
        attn[:, :plen] = 1
        positions = torch.ones((batch, width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            input_ids[i, width - len(s):] = torch.tensor(s)
            attn[i, plen + width - len(s):] = 1
            positions[i, width - len(s):] = torch.arange(plen, plen + len(s))
        next_pos = torch.tensor([len(ids) for ids in ids_list])  # (B,)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()  # (B, V)
        active = list(range(batch))
        while True:
            tokens = self._pick(rows, active, logits)
            still = []
            for j, i in enumerate(active):
                row = rows[i]
                self._advance(row, tokens[j])
                if on_delta is not None:
                    self._emit(i, row, on_delta)
                if row.finish is None:
                    still.append(j)
            if not still:
                return
            keep = torch.tensor(still)
            if len(still) < len(active):
                cache.batch_select_indices(keep)
                attn, next_pos = attn[keep], next_pos[keep]
                tokens = [tokens[j] for j in still]
                active = [active[j] for j in still]
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            out = self.model(input_ids=torch.tensor(tokens).unsqueeze(1), attention_mask=attn,
                             position_ids=next_pos.unsqueeze(1), past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()

    def head_length(self, prompt: Prompt, ids: Sequence[int]) -> int:
        """Tokens of ``ids`` that are the chat before its last message (a stable prefix to keep between calls).

        For ``[system, few-shot turns..., user]`` that is everything up to the last user turn: the part that repeats
        across rows. 0 for raw text, a single message, or when the rendered head is not a token prefix of ``ids``.
        """
        if isinstance(prompt, str) or len(prompt) < 2 or not self.tokenizer.chat_template:
            return 0
        text = self.tokenizer.apply_chat_template([dict(m) for m in prompt[:-1]], tokenize=False,
                                                  add_generation_prompt=False)
        head = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        n = len(head)
        return n if 0 < n < len(ids) and [int(i) for i in head] == list(ids[:n]) else 0

    def _shared_prefix(self, ids_list: Sequence[Sequence[int]], heads: Sequence[int] = ()) -> tuple[KV, int]:
        """Keys/values (batch size 1) of a prefix every row starts with, and its length; ``([], 0)`` if none.

        The candidate is the chat head every row shares (``heads``, see ``head_length``), else the rows' common token
        prefix. A prefix computed once is kept (``PREFIX_CACHE_ENTRIES``) and reused by later calls whose rows all
        start with it, unless a fresh prefix would be more than ``PREFIX_REUSE_SLACK`` tokens longer.
        """
        first = ids_list[0]
        candidate = 0
        if heads and all(h == heads[0] for h in heads) and heads[0] >= MIN_PREFIX_TOKENS \
                and all(list(ids[:heads[0]]) == list(first[:heads[0]]) for ids in ids_list):
            candidate = heads[0]
        elif len(ids_list) > 1:
            candidate = common_prefix_length(ids_list)
        best, best_key = 0, None
        for key in self._prefixes:
            n = len(key)
            if best < n and all(len(ids) > n and tuple(ids[:n]) == key for ids in ids_list):
                best, best_key = n, key
        if best_key is not None and best + PREFIX_REUSE_SLACK >= candidate:
            self._prefixes.move_to_end(best_key)
            self.prefix_stats["hits"] += 1
            return self._prefixes[best_key], best
        if candidate < MIN_PREFIX_TOKENS:
            return [], 0
        key = tuple(int(i) for i in first[:candidate])
        # the decoder body only: a prefix needs its keys/values, not the vocabulary logits of every position
        # (the LM head over ~400 positions is a fifth of the FLOPs of a retrieval prompt)
        out = self.model.model(input_ids=torch.tensor([list(key)]), use_cache=True)
        kv: KV = [(k, v) for k, v, *_ in out.past_key_values]
        self._prefixes[key] = kv
        while len(self._prefixes) > PREFIX_CACHE_ENTRIES:
            self._prefixes.popitem(last=False)
        self.prefix_stats["misses"] += 1
        return kv, candidate

    def clear_prefix_cache(self) -> None:
        self._prefixes.clear()

    def _pick(self, rows: list[_Row], active: list[int], logits: torch.Tensor) -> list[int]:
        logprobs = torch.log_softmax(logits, dim=-1)  # (b, V)
        picked: list[int] = []
        for j, i in enumerate(active):
            row, p = rows[i], rows[i].params
            if p.temperature == 0.0:
                token = int(torch.argmax(logits[j]))
            else:
                probs = torch.softmax(logits[j] / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= p.top_p
                    sorted_p[drop] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                token = int(torch.multinomial(probs, 1, generator=row.generator))
            if p.logprobs:
                top: tuple[tuple[int, str, float], ...] = ()
                if p.top_logprobs:
                    vals, idx = torch.topk(logprobs[j], p.top_logprobs)
                    top = tuple((int(t), self._piece(int(t)), float(v)) for v, t in zip(vals, idx, strict=True))
                row.logprobs.append(TokenLogprob(token, self._piece(token), float(logprobs[j, token]), top))
            picked.append(token)
        return picked

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def _advance(self, row: _Row, token: int) -> None:
        row.out_ids.append(token)
        if token in self.eos_ids:
            row.finish = "stop"
            row.text = self.decode(row.out_ids[:-1])
            return
        row.text = self.decode(row.out_ids)
        for s in row.params.stop:
            at = row.text.find(s)
            if at >= 0:
                row.text, row.finish = row.text[:at], "stop"
                return
        if len(row.out_ids) >= row.max_new:
            row.finish = "length"

    @staticmethod
    def _emit(index: int, row: _Row, on_delta: DeltaCallback) -> None:
        text = row.text
        safe = len(text)
        if row.finish is None:
            while safe and text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
                safe -= 1
            for s in row.params.stop:  # hold back what may become a stop string
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - n:safe] == s[:n]:
                        safe -= n
                        break
        if safe > row.emitted:
            on_delta(index, text[row.emitted:safe])
            row.emitted = safe

    # ------------------------------------------------------------ label scoring
    def score_labels(self, prompt: Prompt, labels: Sequence[str], *, append_eos: bool = True) -> dict[str, float]:
        """The model's distribution over ``labels`` as continuations of ``prompt`` (sums to 1)."""
        return self.score_labels_batch([prompt], labels, append_eos=append_eos)[0]

    def score_labels_batch(self, prompts: Sequence[Prompt], labels: Sequence[str], *, append_eos: bool = True,
                           prefix_cache: bool = True, rows_per_pass: int = 4,
                           length_normalise: bool = False) -> list[dict[str, float]]:
        """Label distributions for many prompts: p(label | prompt) ∝ exp(Σ_t log p(label token_t | ...)).

        With ``length_normalise`` the score of a label is its *mean* token log-probability instead of the sum, so
        that long labels are not penalised for their length (see ``label_logprob_sums``).
        """
        sums, lengths = self.label_logprob_sums(prompts, labels, append_eos=append_eos, prefix_cache=prefix_cache,
                                                rows_per_pass=rows_per_pass)
        norm = torch.tensor(lengths, dtype=torch.float32) if length_normalise else None
        results: list[dict[str, float]] = []
        for scores in sums:
            if norm is not None:
                scores = scores / norm
            probs = torch.softmax(scores.float(), dim=0)
            results.append({label: float(p) for label, p in zip(labels, probs, strict=True)})
        return results

    @torch.inference_mode()
    def label_logprob_sums(self, prompts: Sequence[Prompt], labels: Sequence[str], *, append_eos: bool = True,
                           prefix_cache: bool = True,
                           rows_per_pass: int = 4) -> tuple[list[torch.Tensor], list[int]]:
        """Per prompt, the (L,) summed token log-probabilities of each label as the continuation; and each label's
        token count (EOS included).

        Each label is tokenised (followed by EOS when ``append_eos``, so that "card" and "card payment" are
        told apart). All labels of a row are scored in one forward pass: their tokens are laid out as a token
        trie after the prompt, with a tree attention mask, so a token shared by several labels is computed once.
        The prompts' shared prefix (chat head or common tokens) is computed once and kept for later calls
        (``prefix_cache``).
        """
        if len(set(labels)) != len(labels) or not labels:
            raise UserError("labels must be a non-empty list of distinct strings", hint="remove duplicate labels")
        label_ids = []
        for label in labels:
            ids = [int(i) for i in self.tokenizer(label, add_special_tokens=False)["input_ids"]]
            if append_eos:
                ids.append(self.eos_id)
            if not ids:
                raise UserError(f"label {label!r} has no tokens", hint="use non-empty labels")
            label_ids.append(ids)
        trie = _Trie.build(label_ids)
        ids_list = [self.encode(p) for p in prompts]
        if not ids_list:
            return [], [len(ids) for ids in label_ids]
        heads = [self.head_length(p, ids) for p, ids in zip(prompts, ids_list, strict=True)] if prefix_cache else []
        prefix_kv, plen = self._shared_prefix(ids_list, heads) if prefix_cache else ([], 0)
        out: list[torch.Tensor] = []
        for start in range(0, len(ids_list), rows_per_pass):
            chunk = [ids[plen:] for ids in ids_list[start:start + rows_per_pass]]
            out.extend(self._score_chunk(chunk, prefix_kv, plen, trie))
        return out, [len(ids) for ids in label_ids]

    def _score_chunk(self, suffixes: list[list[int]], prefix_kv: KV,
                     plen: int, trie: _Trie) -> list[torch.Tensor]:
        """Score every label for each row; returns one (L,) tensor of summed label log-probs per row."""
        from transformers import DynamicCache

        batch, n_nodes = len(suffixes), len(trie.tokens)
        width = max(len(s) for s in suffixes)
        q = width + n_nodes
        input_ids = torch.full((batch, q), self.pad_id, dtype=torch.long)
        positions = torch.zeros((batch, q), dtype=torch.long)
        mask = torch.zeros((batch, 1, q, plen + q), dtype=torch.bool)
        mask[:, :, :, :plen] = True
        node_tokens = torch.tensor(trie.tokens, dtype=torch.long)
        tree = trie.ancestor_mask()  # (N, N) node attends to node
        for b, s in enumerate(suffixes):
            pad = width - len(s)
            input_ids[b, pad:width] = torch.tensor(s)
            positions[b, pad:width] = torch.arange(plen, plen + len(s))
            input_ids[b, width:] = node_tokens
            end = plen + len(s)
            positions[b, width:] = end + torch.tensor(trie.depths)
            causal = torch.tril(torch.ones((len(s), len(s)), dtype=torch.bool))
            mask[b, 0, pad:width, plen + pad:plen + width] = causal
            mask[b, 0, width:, plen + pad:plen + width] = True
            mask[b, 0, width:, plen + width:] = tree
            mask[b, 0, :pad, plen + pad] = True  # padded queries attend somewhere; their outputs are ignored
        cache = DynamicCache(ddp_cache_data=_expand(prefix_kv, batch)) if prefix_kv else DynamicCache()
        hidden = self.model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True).last_hidden_state  # (B, Q, H)
        # logits are needed where a next token is predicted: the last prompt token and every inner trie node
        parents = torch.tensor([width - 1] + [width + i for i in trie.inner], dtype=torch.long)
        logprobs = torch.log_softmax(self.model.lm_head(hidden[:, parents, :]).float(), dim=-1)  # (B, 1+I, V)
        slot = {node: k + 1 for k, node in enumerate(trie.inner)}
        parent_slot = torch.tensor([0 if par < 0 else slot[par] for par in trie.parents])
        node_lp = logprobs[:, parent_slot, node_tokens]  # (B, N)
        label_lp = node_lp @ trie.path_matrix().to(node_lp.dtype).T  # (B, L)
        return list(label_lp)

    # ---------------------------------------------------------- answer logprobs
    @torch.inference_mode()
    def answer_logits(self, prompt: Prompt, answer: str) -> tuple[list[int], torch.Tensor]:
        """Answer token ids and the full next-token logits at each answer position: (A, V) float32."""
        prompt_ids = self.encode(prompt)
        answer_ids = [int(i) for i in self.tokenizer(answer, add_special_tokens=False)["input_ids"]]
        if not answer_ids:
            raise UserError("empty answer", hint="pass at least one token of answer text")
        ids = torch.tensor([prompt_ids + answer_ids])
        logits = self.model(input_ids=ids).logits[0].float()  # (T, V)
        return answer_ids, logits[len(prompt_ids) - 1:-1]

    def answer_logprobs(self, prompt: Prompt, answer: str, *, top_k: int = 20) -> AnswerLogprobs:
        """Per-token log-probabilities of ``answer`` after ``prompt`` plus the top-k alternatives at each step."""
        answer_ids, logits = self.answer_logits(prompt, answer)
        logprobs = torch.log_softmax(logits, dim=-1)  # (A, V)
        token_lp = logprobs.gather(1, torch.tensor(answer_ids).unsqueeze(1)).squeeze(1)
        top_lp, top_ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        return AnswerLogprobs(self.encode(prompt), answer_ids, token_lp, top_ids, top_lp)


def _expand(kv: KV, batch: int) -> KV:
    """Fresh per-row copies of batch-1 keys/values (the kept originals are never appended to)."""
    return [(k.expand(batch, -1, -1, -1).clone(), v.expand(batch, -1, -1, -1).clone()) for k, v in kv]


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving every row at least one token of its own."""
    shortest = min(len(r) for r in rows)
    n = 0
    first = rows[0]
    while n < shortest - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@dataclass
class _Trie:
    """Label token sequences merged into a trie, nodes in breadth-first order."""

    tokens: list[int]
    parents: list[int]  # -1 for a root child
    depths: list[int]
    ends: list[int]  # label index -> node where the label ends
    inner: list[int]  # nodes with children (their logits are needed)

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]]) -> _Trie:
        index: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        longest = max(len(s) for s in sequences)
        for depth in range(longest):
            for seq in sequences:
                if depth < len(seq):
                    key = tuple(seq[:depth + 1])
                    if key not in index:
                        index[key] = len(tokens)
                        tokens.append(seq[depth])
                        parents.append(index[key[:-1]] if depth else -1)
                        depths.append(depth)
        ends = [index[tuple(s)] for s in sequences]
        if len(set(ends)) != len(ends):
            raise UserError("two labels tokenise to the same tokens", hint="make the labels distinct")
        has_child = set(p for p in parents if p >= 0)
        return cls(tokens, parents, depths, ends, sorted(has_child))

    def ancestor_mask(self) -> torch.Tensor:
        n = len(self.tokens)
        mask = torch.zeros((n, n), dtype=torch.bool)
        for node in range(n):
            cur = node
            while cur >= 0:
                mask[node, cur] = True
                cur = self.parents[cur]
        return mask

    def path_matrix(self) -> torch.Tensor:
        n = len(self.tokens)
        mat = torch.zeros((len(self.ends), n), dtype=torch.bool)
        for li, end in enumerate(self.ends):
            cur = end
            while cur >= 0:
                mat[li, cur] = True
                cur = self.parents[cur]
        return mat


def is_finite_distribution(probs: Mapping[str, float]) -> bool:
    """True when ``probs`` are finite, non-negative and sum to 1 (within 1e-5)."""
    values = list(probs.values())
    return all(math.isfinite(v) and v >= 0 for v in values) and abs(sum(values) - 1.0) < 1e-5
